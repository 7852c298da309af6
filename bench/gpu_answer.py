"""One served answer from the bundled model: `veq serve` on a device, one image+text request.

    python bench/gpu_answer.py --device cuda --cache-dir DIR [--out FILE.json]

Starts `veq serve --model mini` (VEQ W4 with the defaults; from the cache when `veq quantize`
filled it) through `server.loadtest.spawn`, waits for /ready, asks what colour a drawn circle
is with an OpenAI-shaped chat request (an inline PNG data URL of a red circle), checks the
response (HTTP 200, an answer naming red, usage counted) and stops the server. Prints and
writes what came back and the server's /admin/stats (weight bytes, device memory). Exit 1 on
anything else. Needs the server stack (bench/_gpu_env.sh) but not the `openai` package.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.loadtest.spawn import ServeSpec, spawn_server  # noqa: E402


def circle_png(colour: tuple[int, int, int] = (220, 30, 30)) -> str:
    # A dark canvas: the bundled model answers colours reliably there (its training draws).
    img = Image.new("RGB", (128, 128), (30, 30, 30))
    ImageDraw.Draw(img).ellipse((40, 40, 88, 88), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--out", type=Path, help="write the result here as JSON")
    ap.add_argument("--log", type=Path, default=Path("gpu-answer-serve.log"))
    ap.add_argument("--ready-timeout", type=float, default=240.0)
    args = ap.parse_args(argv)
    spec = ServeSpec(model="mini", bits=4, method="veq", device=args.device,
                     cache_dir=args.cache_dir)  # fmt: skip
    body = {
        "model": "mini",
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": circle_png()}},
            {"type": "text", "text": "What color is the circle?"},
        ]}],
    }  # fmt: skip
    t0 = time.perf_counter()
    result: dict = {"device": args.device}
    with spawn_server(spec, args.log, ready_timeout=args.ready_timeout) as server:
        result["ready_s"] = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        result["latency_s"] = round(time.perf_counter() - t1, 3)
        result["status"] = r.status_code
        result["response"] = r.json()
        stats = httpx.get(f"{server.url}/admin/stats", timeout=30,
                          headers={"Authorization": f"Bearer {server.admin_key}"})  # fmt: skip
        result["stats"] = stats.json() if stats.status_code == 200 else stats.text
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    choice = (result["response"].get("choices") or [{}])[0]
    answer = (choice.get("message") or {}).get("content")
    ok = (r.status_code == 200 and "red" in (answer or "").lower()
          and result["response"]["usage"]["completion_tokens"] > 0)  # fmt: skip
    print(f"answer: {answer!r} (expected 'red': {'ok' if ok else 'FAILED'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
