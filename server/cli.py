"""The `veq` command: a thin argparse layer over `veq` (quantize, eval) and `server` (serve, bench).

It lives on the top floor because `serve` needs the server; the library never imports it.
Every failure ends as one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

from server.settings import add_serve_arguments
from veq import __version__
from veq.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

METHODS = ("rtn", "awq", "gptq", "mbq", "veq-me", "veq-ma", "veq")


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _group_size(text: str) -> int | None:
    if text in ("none", "channel", "-1"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a group size: {text!r}") from None
    if value not in SUPPORTED_GROUP_SIZES:
        raise argparse.ArgumentTypeError(
            f"group size must be one of {SUPPORTED_GROUP_SIZES} or 'channel', got {value}"
        )
    return value


def _add_recipe(p: argparse.ArgumentParser, bits_help: str) -> None:
    p.add_argument("--model", default="mini", help="model directory, HF id, or 'mini' (bundled)")
    p.add_argument("--method", choices=METHODS, default="veq", help="quantization method")
    p.add_argument("--bits", type=int, choices=(*SUPPORTED_BITS, 16), default=4, help=bits_help)
    p.add_argument(
        "--group-size", type=_group_size, default=128, help="32, 64, 128 or 'channel' (default 128)"
    )
    p.add_argument("--calib", default="builtin", help="builtin, a JSONL file, or an HF dataset")


def _not_yet(name: str, issue: int) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        raise CLIError(
            f"'veq {name}' is not yet available in this version (tracked in issue {issue})"
        )

    return run


def _gamma(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise CLIError(f"--gamma must be 'auto' or a number, got {text!r}") from None


def _quantize(args: argparse.Namespace) -> int:
    import logging

    from pydantic import ValidationError

    from veq.api import quantize
    from veq.calib.data import CalibrationError
    from veq.checkpoint import CheckpointError
    from veq.models import UnsupportedModelError

    if args.bits == 16:
        raise CLIError("--bits 16 means no quantization; choose 2, 3, 4 or 8")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = quantize(
            args.model,
            method=args.method,
            bits=args.bits,
            group_size=args.group_size,
            calib=args.calib,
            samples=args.samples,
            seed=args.seed,
            gamma=_gamma(args.gamma),
            mixed_precision=args.mixed_precision,
            act_order=args.act_order,
            out=args.out,
            cache_dir=args.cache_dir,
            device=args.device,
            progress=not args.quiet,
        )
    except ValidationError as exc:
        raise CLIError("; ".join(e["msg"] for e in exc.errors())) from None
    except (UnsupportedModelError, CalibrationError, CheckpointError, ValueError, OSError) as exc:
        raise CLIError(str(exc).splitlines()[0]) from None
    print(result.summary())
    return 0


def _models(_: argparse.Namespace) -> int:
    from safetensors import safe_open

    from veq.api import BUNDLED

    print(f"{'name':8s} {'parameters':>12s}  path")
    for name, path in BUNDLED.items():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            print(f"{name:8s} {'(missing)':>12s}  {path}")
            continue
        params = 0
        for f in files:
            with safe_open(str(f), framework="pt") as reader:
                params += sum(math.prod(reader.get_slice(k).get_shape()) for k in reader.keys())
        print(f"{name:8s} {params:>12,d}  {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from veq.checkpoint import atomic_directory, verify

    src, out = Path(args.model), Path(args.out)
    if not src.is_dir() or not verify(src):
        raise CLIError(f"{args.model} is not a complete veq checkpoint (manifest check failed)")
    if out.exists() and any(out.iterdir()):
        raise CLIError(f"{args.out} exists and is not empty")
    # Our checkpoints *are* compressed-tensors directories: export is a verified copy.
    with atomic_directory(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    print(f"wrote {out} (compressed-tensors pack-quantized)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from server.app import build_app
    from server.settings import ServeSettings, SettingsError

    try:
        settings = ServeSettings.from_cli(args)
    except SettingsError as exc:
        raise CLIError(str(exc).replace("\n", "; ")) from None
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = build_app(settings)
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown; the app's lifespan then drains
    # running requests for up to drain_timeout_s before the engine stops.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veq",
        description="Quantize Mixture-of-Experts vision-language models with VEQ and serve them "
        "over an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"veq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("quantize", help="calibrate and quantize a model, write a checkpoint")
    _add_recipe(p, "weight bits")
    p.add_argument("--samples", type=int, default=128, help="calibration samples")
    p.add_argument("--seed", type=int, default=0, help="calibration sample order")
    p.add_argument("--gamma", default="auto", help="text/vision sensitivity: 'auto' or a number")
    p.add_argument(
        "--mixed-precision",
        type=float,
        metavar="AVG_BITS",
        help="expert-importance bit allocation with this average over experts (e.g. 3 or 2.5)",
    )
    p.add_argument("--act-order", action="store_true", help="GPTQ act-order (static groups)")
    p.add_argument("--out", help="output directory (default: the cache)")
    p.add_argument("--cache-dir", help="cache directory (default: $VEQ_CACHE_DIR or ~/.cache/veq)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="calibration device (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_quantize)

    p = sub.add_parser("export", help="copy a quantized checkpoint out in a serving format")
    p.add_argument("--model", required=True, help="quantized checkpoint directory (or cache entry)")
    p.add_argument("--format", choices=("compressed-tensors",), default="compressed-tensors")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=_export)

    p = sub.add_parser("eval", help="quality table of methods × bits on the reference model")
    p.add_argument("--model", default="mini")
    p.add_argument("--methods", default="rtn,awq,gptq,mbq,veq-me,veq-ma,veq")
    p.add_argument("--bits", default="4,3,2")
    p.add_argument("--group-size", type=_group_size, default=128)
    p.add_argument("--json", help="write the rows to this JSON file")
    p.set_defaults(run=_not_yet("eval", 4))

    p = sub.add_parser("models", help="list the bundled models")
    p.set_defaults(run=_models)

    p = sub.add_parser(
        "serve",
        help="quantize (or load from cache) and serve over an OpenAI-compatible HTTP API",
        description="Every flag can also be set by its VEQ_* environment variable; flags win.",
    )
    add_serve_arguments(p)
    p.set_defaults(run=_serve)

    p = sub.add_parser("bench", help="load-test a running server and report memory and speed")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="seconds")
    p.set_defaults(run=_not_yet("bench", 7))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CLIError as exc:
        print(f"veq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("veq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
