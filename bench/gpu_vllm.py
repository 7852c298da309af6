"""vLLM smoke test: serve veq checkpoints of the bundled model with `vllm serve`, one chat each.

    python bench/gpu_vllm.py --cache-dir DIR --out answers.json     # on a GPU host with vllm

For each recipe (W4 with the default codes, W8 symmetric) it quantizes `mini` (cached), exports
it with `veq export --for vllm`, starts `vllm serve` on it, waits for /health, asks one image
question through the OpenAI API and writes what came back (or why not) to `--out`. Exit code 0
only when every checkpoint answered. Needs vllm importable; prints why and exits 2 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RECIPES = (("w4", ["--bits", "4"]), ("w8-sym", ["--bits", "8", "--symmetric"]))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _veq(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "server.cli", *args], check=True)


def _image() -> str:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (160, 160), (255, 255, 255))
    ImageDraw.Draw(im).ellipse((40, 40, 120, 120), fill=(220, 30, 30))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def serve_and_ask(model_dir: Path, log: Path, timeout: float) -> dict[str, Any]:
    import httpx

    port = _port()
    cmd = ["vllm", "serve", str(model_dir), "--port", str(port), "--max-model-len", "2048"]
    cmd += ["--gpu-memory-utilization", "0.3", "--served-model-name", "mini"]
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                tail = log.read_text().splitlines()[-3:]
                return {"ok": False, "error": f"vllm exited {proc.returncode}: {tail}"}
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            return {"ok": False, "error": f"not healthy after {timeout:.0f} s"}
        ready = time.perf_counter() - t0
        content = [
            {"type": "image_url", "image_url": {"url": _image()}},
            {"type": "text", "text": "What color is the circle?"},
        ]
        body = {"model": "mini", "messages": [{"role": "user", "content": content}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=body | {"max_tokens": 8}, timeout=60)
        answer = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
        return {
            "ok": r.status_code == 200,
            "status": r.status_code,
            "answer": answer,
            "ready_s": round(ready, 1),
            "body": None if answer else r.text[:300],
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=150, help="seconds for vllm to get healthy")
    args = p.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        print(f"vllm is not importable here ({exc}); nothing to check", file=sys.stderr)
        return 2
    results = {}
    for name, flags in RECIPES:
        out = args.out.parent / f"vllm-{name}"
        ckpt = args.cache_dir / f"mini-{name}"
        _veq("quantize", "--model", "mini", "--device", "cuda", "--out", str(ckpt), *flags)
        if out.exists():
            shutil.rmtree(out)
        _veq("export", "--model", str(ckpt), "--for", "vllm", "--out", str(out))
        results[name] = serve_and_ask(out, args.out.parent / f"vllm-{name}.log", args.timeout)
        print(name, json.dumps(results[name]))
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    sys.exit(main())
