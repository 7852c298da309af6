"""Admin requantization under load, admin disabled, overload, and draining on shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

API_KEY, ADMIN_KEY = "test-key", "admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def wait_job(url: str, job_id: str, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{url}/admin/jobs/{job_id}", headers=ADMIN).json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise TimeoutError(job_id)


def test_requantize_4_3_2_under_load(server_factory, png):
    live = server_factory()
    url = live.url
    stop = threading.Event()
    outcomes: list[str] = []

    def worker(i: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        content = [
            {"type": "image_url", "image_url": {"url": png(seed=i)}},
            {"type": "text", "text": f"q{i}"},
        ]
        while not stop.is_set():
            try:
                r = client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": content}], max_tokens=6
                )
                outcomes.append("ok" if r.choices[0].finish_reason in ("stop", "length") else "bad")
            except Exception as exc:  # any failure is what this test is about
                outcomes.append(f"error: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        history = []
        for bits in (3, 2):
            time.sleep(1.0)
            before = len(outcomes)
            r = httpx.post(f"{url}/admin/requantize", json={"bits": bits}, headers=ADMIN)
            assert r.status_code == 202, r.text
            job = r.json()
            assert r.headers["location"] == f"/admin/jobs/{job['id']}"
            again = httpx.post(f"{url}/admin/requantize", json={"bits": 4}, headers=ADMIN)
            assert again.status_code in (202, 409)  # 409 while the first one runs
            if again.status_code == 202:
                pytest.fail("a second requantization was accepted while one was running")
            done = wait_job(url, job["id"])
            assert done["state"] == "succeeded", done
            assert done["progress"]["layers"] >= 1
            card = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
            assert card.json()["data"][0]["veq"]["bits"] == bits
            history.append(httpx.get(f"{url}/admin/stats", headers=ADMIN).json()["weight_bytes"])
            deadline = time.time() + 30
            while len(outcomes) < before + 8 and time.time() < deadline:
                time.sleep(0.1)  # answers keep coming after the swap
            assert len(outcomes) >= before + 8
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert outcomes and all(o == "ok" for o in outcomes), [o for o in outcomes if o != "ok"][:3]
    assert history[0] > history[1], history


def test_failed_job_keeps_the_old_model(server_factory):
    live = server_factory()
    r = httpx.post(
        f"{live.url}/admin/requantize",
        json={"bits": 3, "calib": "/nonexistent.jsonl"},
        headers=ADMIN,
    )
    assert r.status_code == 202
    done = wait_job(live.url, r.json()["id"])
    assert done["state"] == "failed" and "does not exist" in done["error"]
    card = httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert card.json()["data"][0]["veq"]["bits"] == 4


def test_requantize_to_asymmetric_codes(server_factory):
    live = server_factory()
    auth = {"Authorization": f"Bearer {API_KEY}"}
    before = httpx.get(f"{live.url}/v1/models", headers=auth).json()["data"][0]["veq"]
    assert before["symmetric"] is True and before["label"] == "rtn-w4g32-sym"  # the default
    r = httpx.post(
        f"{live.url}/admin/requantize", json={"bits": 4, "symmetric": False}, headers=ADMIN
    )
    assert r.status_code == 202 and r.json()["request"]["symmetric"] is False
    done = wait_job(live.url, r.json()["id"])
    assert done["state"] == "succeeded", done
    after = httpx.get(f"{live.url}/v1/models", headers=auth).json()["data"][0]["veq"]
    assert after["symmetric"] is False and after["label"] == "rtn-w4g32"
    stats = httpx.get(f"{live.url}/admin/stats", headers=ADMIN).json()
    assert stats["symmetric"] is False and stats["weight_bytes"] > before["weight_bytes"]
    bad = httpx.post(
        f"{live.url}/admin/requantize", json={"bits": 4, "symmetric": "yes please"}, headers=ADMIN
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"]


def test_admin_disabled_without_admin_key(server_factory):
    live = server_factory(admin_key=None)
    r = httpx.get(f"{live.url}/admin/stats", headers=ADMIN)
    assert r.status_code == 403 and "--admin-key" in r.json()["error"]["message"]


def test_full_queue_is_503_with_retry_after(server_factory):
    live = server_factory(max_queue=1, max_batch=1)

    async def burst():
        async with httpx.AsyncClient(timeout=60) as c:
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 32,
            }
            return await asyncio.gather(
                *[
                    c.post(
                        f"{live.url}/v1/chat/completions",
                        json=body,
                        headers={"Authorization": f"Bearer {API_KEY}"},
                    )
                    for _ in range(6)
                ]
            )

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert int(busy.headers["retry-after"]) >= 1
    assert busy.json()["error"]["type"] == "overloaded_error"


def test_sigterm_drains_in_flight_requests(tiny_dir, tmp_path, port):
    """SIGTERM while a request is generating: it completes, then the process exits cleanly."""
    p = port()
    env = {**os.environ, "VEQ_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [
        str(Path(sys.executable).with_name("veq")),
        "serve",
        "--model",
        str(tiny_dir),
        "--method",
        "rtn",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--samples",
        "2",
        "--gamma",
        "10",
        "--port",
        str(p),
        "--max-tokens-limit",
        "400",
        "--drain-timeout-s",
        "60",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{p}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.3)
        result: dict = {}

        def call() -> None:
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "long"}],
                "max_tokens": 300,
                "temperature": 0.8,
            }
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            result["status"] = r.status_code
            result["body"] = r.json()

        t = threading.Thread(target=call)
        t.start()
        time.sleep(1.0)  # the request is being decoded
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=120)
        assert result.get("status") == 200, result
        assert result["body"]["usage"]["completion_tokens"] > 0
        # uvicorn re-raises the signal once shut down cleanly: 143 / -SIGTERM is the clean exit.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
