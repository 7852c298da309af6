"""The `veq` command: a thin argparse layer over `veq` (quantize, eval) and `server` (serve, bench).

It lives on the top floor because `serve` needs the server; the library never imports it.
Every failure ends as one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

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
    p.add_argument("--gamma", default="auto", help="text/vision sensitivity: 'auto' or a number")
    p.add_argument("--out", help="output directory (default: the cache)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="calibration device (default: auto)")
    p.set_defaults(run=_not_yet("quantize", 3))

    p = sub.add_parser("export", help="write a cached checkpoint in a serving format")
    p.add_argument("--model", required=True, help="quantized checkpoint directory")
    p.add_argument("--format", choices=("compressed-tensors",), default="compressed-tensors")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=_not_yet("export", 3))

    p = sub.add_parser("eval", help="quality table of methods × bits on the reference model")
    p.add_argument("--model", default="mini")
    p.add_argument("--methods", default="rtn,awq,gptq,mbq,veq-me,veq-ma,veq")
    p.add_argument("--bits", default="4,3,2")
    p.add_argument("--group-size", type=_group_size, default=128)
    p.add_argument("--json", help="write the rows to this JSON file")
    p.set_defaults(run=_not_yet("eval", 4))

    p = sub.add_parser("models", help="list the bundled models")
    p.set_defaults(run=_not_yet("models", 4))

    p = sub.add_parser("serve", help="quantize (or load from cache) and serve over HTTP")
    _add_recipe(p, "weight bits; 16 serves the unquantized model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(run=_not_yet("serve", 6))

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
