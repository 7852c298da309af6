"""A real server on loopback over a tiny Qwen3-VL-MoE model directory, and request helpers."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image

from server.app import build_app
from server.settings import ServeSettings
from veq.models.processor import build_processor
from veq.testing import tiny_model

API_KEY, ADMIN_KEY = "test-key", "admin-key"


def _tiny_model_dir(path: Path) -> Path:
    """`path` holding `veq.testing.tiny_model("qwen3_vl_moe")` (fp32) and the processor."""
    processor = build_processor()
    tiny_model("qwen3_vl_moe", processor).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return _tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.app = build_app(settings)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{settings.port}"

    @property
    def state(self):
        return self.app.state.veq

    def start(self, timeout: float = 180) -> LiveServer:
        import httpx

        self.thread.start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.state.load_error:
                raise RuntimeError(self.state.load_error)
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def make_settings(model_dir: Path, cache: Path, **overrides) -> ServeSettings:
    values = dict(
        model=str(model_dir),
        method="rtn",
        bits=4,
        group_size=32,
        samples=2,
        gamma=10.0,
        cache_dir=str(cache),
        device="cpu",
        port=free_port(),
        api_key=API_KEY,
        admin_key=ADMIN_KEY,
        max_batch=16,
        max_queue=64,
        max_model_len=512,
        max_tokens_limit=64,
        drain_timeout_s=5.0,
    )
    values.update(overrides)
    return ServeSettings(**values)


@pytest.fixture(scope="module")
def live(tiny_dir, tmp_path_factory):
    server = LiveServer(make_settings(tiny_dir, tmp_path_factory.mktemp("cache"))).start()
    yield server
    server.stop()


def png_data_url(colour: tuple[int, int, int] | None = None, size: int = 64, seed: int = 0) -> str:
    if colour is None:
        pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    else:
        pixels = np.full((size, size, 3), colour, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="session")
def png():
    """`png(colour=None, size=64, seed=0)` -> a data: URL of a PNG."""
    return png_data_url


@pytest.fixture(scope="module")
def mini_server(tmp_path_factory):
    """The bundled `mini` served with `make serve`'s recipe (VEQ, 4 bits, g128, the model's own
    calibration source), on fewer calibration samples so that tests stay quick."""
    from veq.reference import MINI_DIR

    settings = make_settings(
        MINI_DIR,
        tmp_path_factory.mktemp("cache"),
        method="veq",
        bits=4,
        group_size=128,
        samples=8,
        gamma="auto",
    )
    server = LiveServer(settings).start()
    yield server
    server.stop()


@pytest.fixture
def server_factory(tiny_dir, tmp_path):
    """`server_factory(**settings)` -> a started LiveServer (stopped after the test);
    `server_factory(start=False, ...)` leaves starting it to the test."""
    started: list[LiveServer] = []

    def start(start: bool = True, **overrides) -> LiveServer:
        server = LiveServer(make_settings(tiny_dir, tmp_path / "cache", **overrides))
        started.append(server)
        return server.start() if start else server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def port():
    """`port()` -> a free loopback port."""
    return free_port
