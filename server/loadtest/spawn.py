"""Start one `veq serve` child process for a load test, and stop it cleanly.

Owns `ServeSpec` (the model and quantization to serve, and the serving knobs a load test sets)
and `spawn_server`, a context manager that picks a free loopback port and a random admin key,
starts `python -m server.cli serve` in its own session (so the terminal's Ctrl-C reaches the
load tester, which then still reads the server's final stats before stopping it), waits for
`/ready` with a timeout, and on exit sends SIGTERM, waits, then kills. The child's output goes
to a log file that error messages point to. Used by `veq bench --spawn` and `bench/serve.py`;
`spawn_process` gives any other server command (a peer such as `transformers serve`) the same
lifecycle, for `bench/peer.py`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.loadtest.probe import BenchError


@dataclass(frozen=True)
class ServeSpec:
    """What one spawned server serves; `None` leaves a `veq serve` default in place."""

    model: str = "mini"
    bits: int = 4
    method: str = "rtn"
    group_size: int | None = 128
    cache_dir: str | None = None  # None: the child's default ($VEQ_CACHE_DIR or ~/.cache/veq)
    device: str = "auto"
    threads: int | None = None
    max_batch: int | None = None
    max_queue: int | None = None
    max_model_len: int | None = None
    api_key: str | None = None

    def args(self) -> list[str]:
        group = "channel" if self.group_size is None else str(self.group_size)
        out = ["--model", self.model, "--bits", str(self.bits), "--method", self.method]
        out += ["--group-size", group, "--device", self.device]
        for flag, value in (
            ("--cache-dir", self.cache_dir),
            ("--threads", self.threads),
            ("--max-batch", self.max_batch),
            ("--max-queue", self.max_queue),
            ("--max-model-len", self.max_model_len),
        ):
            if value is not None:
                out += [flag, str(value)]
        return out


@dataclass
class SpawnedServer:
    """A running child: its URL, the admin key it was given, its process and log."""

    url: str
    admin_key: str
    process: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the server drains and exits), then SIGKILL after `timeout` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or [""])[-1][:200]


def _wait_ready(server: SpawnedServer, timeout: float, name: str, ready_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise BenchError(
                f"{name} exited with code {code} before it was ready: "
                f"{_last_line(server.log_path)} (log: {server.log_path})"
            )
        try:
            r = httpx.get(f"{server.url}{ready_path}", timeout=2.0)
            if r.status_code == 200:
                return
            if "failed to load" in r.text:
                raise BenchError(f"{r.json()['error']['message']} (log: {server.log_path})")
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    raise BenchError(
        f"{name} was not ready after {timeout:.0f} s (raise --ready-timeout; "
        f"log: {server.log_path})"
    )


@contextmanager
def spawn_process(
    cmd: list[str],
    port: int,
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    admin_key: str = "",
    name: str = "the server",
    ready_path: str = "/ready",
    ready_timeout: float = 1800.0,
) -> Iterator[SpawnedServer]:
    """Any HTTP server command listening on 127.0.0.1:`port` (a peer under the same load),
    ready once `ready_path` answers 200; stopped on exit, always."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = SpawnedServer(f"http://127.0.0.1:{port}", admin_key, process, log_path)
    try:
        _wait_ready(server, ready_timeout, name, ready_path)
        yield server
    finally:
        server.stop()


@contextmanager
def spawn_server(
    spec: ServeSpec, log_path: Path, ready_timeout: float = 1800.0
) -> Iterator[SpawnedServer]:
    """A `veq serve` of `spec` on a free loopback port, ready; stopped on exit, always."""
    port = free_port()
    admin_key = secrets.token_urlsafe(16)
    env = {k: v for k, v in os.environ.items() if k not in ("VEQ_API_KEY", "VEQ_ADMIN_KEY")}
    env["VEQ_ADMIN_KEY"] = admin_key  # by environment: argv is visible to every local user
    if spec.api_key:
        env["VEQ_API_KEY"] = spec.api_key
    cmd = [sys.executable, "-m", "server.cli", "serve", *spec.args()]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with spawn_process(
        cmd,
        port,
        log_path,
        env=env,
        admin_key=admin_key,
        name="veq serve",
        ready_timeout=ready_timeout,
    ) as server:
        yield server
