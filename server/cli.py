"""The `veq` command: a thin argparse layer over `veq` (quantize, eval) and `server` (serve, bench).

It lives on the top floor because `serve` needs the server; the library never imports it.
Every failure ends as one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from server.settings import add_serve_arguments
from veq import __version__
from veq.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

METHODS = ("rtn", "awq", "gptq", "mbq", "veq-me", "veq-ma", "veq")
METHODS_HELP = """methods (--method):
  rtn      round to nearest per group; no calibration data
  awq      AWQ: per-channel scales searched on calibration activations, then clipping
  gptq     GPTQ: Hessian error feedback, static-group act-order (llm-compressor's default)
  mbq      MBQ: AWQ whose loss weights answer tokens 1, vision tokens the per-layer
           gradient ratio r_l, prompt tokens 0
  veq-me   the paper's VEQ-ME: AWQ whose expert scale search is weighted by expert
           importance S_i = γ·N_text + β·N_vision
  veq-ma   the paper's VEQ-MA: GPTQ on Hessians weighted per token and expert by
           c = p^λ·α (p: router softmax before top-k; α: γ for text, 1 for vision)
  veq      (default) ME's importance-weighted shared scales, then GPTQ on MA's weighted
           Hessians, with act-order. Beyond the paper (which evaluates ME and MA apart):
           the combination; the modality weight tempered to γ^τ (--tau; 0.5 at 2 bits,
           0.25 above, where the paper's γ over-weights text); λ = 2 (the router weight
           scales an expert's output error, which the squared error counts twice); its
           scale searches weigh tokens by the same c as its Hessians (--no-weighted-search:
           every routed token once); and its GPTQ aims halfway at the 16-bit model's
           outputs from the quantized model's inputs (--fp-target 0.5, GPTAQ's asymmetric
           calibration; 0 turns it off); at 2 bits in groups of 128 or more, its scales are
           then trained end to end towards the 16-bit model's answers on the calibration
           set, codes fixed (--tune-epochs 2, EfficientQAT's E2E-QP); optionally, Hessian
           tokens weighted by gradient saliency (--saliency) or γ per layer
           (--gamma-per-layer). Any GPTQ-family method can search each group's range under
           the Hessian instead of min-max (--range-search), aim at the 16-bit outputs
           (--fp-target), or quantize attention before collecting the experts' statistics
           (--true-sequential); any calibrated method can tune its scales end to end
           (--tune-epochs)

defaults: W4 g128, symmetric codes at 4 and 8 bits (asymmetric at 2 and 3), γ measured
('auto') with one backward pass per calibration sample, λ = 1 for veq-ma and 2 for veq,
fp target 0.5 for veq and 0 for gptq and veq-ma, scale tuning 2 epochs for veq at 2 bits
in groups of 128 or more (or per channel) and off otherwise, act-order on, GPTQ damping 1 %,
128 samples."""
CALIB_HELP = (
    "calibration source: builtin (photographs + text-only turns), shapes (the bundled model's "
    "task), a JSONL file, or hf:NAME[:SPLIT] (default: the model's own: shapes for mini, else "
    "builtin)"
)


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
    p.add_argument("--calib", default=None, help=CALIB_HELP)
    _add_symmetry(p)


def _add_symmetry(p: argparse.ArgumentParser) -> None:
    codes = p.add_mutually_exclusive_group()
    codes.add_argument(
        "--symmetric",
        dest="symmetric",
        action="store_const",
        const=True,
        default=None,
        help=f"symmetric codes, no zero points (default at {_default_widths(True)} bits)",
    )
    codes.add_argument(
        "--asymmetric",
        dest="symmetric",
        action="store_const",
        const=False,
        help=f"a zero point per group (default at {_default_widths(False)} bits)",
    )


def _default_widths(symmetric: bool) -> str:
    from veq.recipe import DEFAULT_SYMMETRIC

    return ", ".join(str(b) for b, sym in DEFAULT_SYMMETRIC.items() if sym == symmetric) or "no"


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
            lam=args.lam,
            tau=args.tau,
            saliency=args.saliency,
            range_search=args.range_search,
            gamma_per_layer=args.gamma_per_layer,
            weighted_search=args.weighted_search,
            check_scales=args.check_scales,
            fp_target=args.fp_target,
            true_sequential=args.true_sequential,
            tune_epochs=args.tune_epochs,
            tune_lr=args.tune_lr,
            symmetric=args.symmetric,
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


def _comma(text: str, parse: Callable[[str], Any], what: str) -> tuple[Any, ...]:
    try:
        values = tuple(parse(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of {what}: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"empty list of {what}")
    return values


def _ints(text: str) -> tuple[int, ...]:
    return _comma(text, int, "integers")


def _floats(text: str) -> tuple[float, ...]:
    return _comma(text, float, "numbers")


def _bits_list(text: str) -> tuple[int, ...]:
    bits = _ints(text)
    bad = [b for b in bits if b not in SUPPORTED_BITS]
    if bad:
        raise argparse.ArgumentTypeError(f"bits must be among {SUPPORTED_BITS}, got {bad}")
    return bits


def _methods(text: str) -> tuple[str, ...]:
    methods = _comma(text, str.strip, "methods")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {METHODS}")
    return methods


def _eval(args: argparse.Namespace) -> int:
    import json
    import logging
    from pathlib import Path

    from pydantic import ValidationError

    from veq.calib.data import CalibrationError
    from veq.checkpoint import CheckpointError
    from veq.models import UnsupportedModelError
    from veq.reference.quality import quality_table, run_quality, settings_grid

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    settings = settings_grid(
        args.methods, args.bits, args.group_size, args.mixed_precision, symmetric=args.symmetric
    )
    try:
        rows = run_quality(
            args.model,
            settings,
            calib_seeds=args.calib_seed,
            progress=not args.quiet,
            samples=args.samples,
            seed=args.seed,
            calib=args.calib,
            calib_samples=args.calib_samples,
            cache_dir=args.cache_dir,
            device=args.device,
        )
    except ValidationError as exc:
        raise CLIError("; ".join(e["msg"] for e in exc.errors())) from None
    except (UnsupportedModelError, CalibrationError, CheckpointError, ValueError, OSError) as exc:
        raise CLIError(str(exc).splitlines()[0]) from None
    print(quality_table(rows))
    if args.json:
        out = Path(args.json)
        tmp = out.with_name(out.name + ".tmp")
        try:
            tmp.write_text(json.dumps([r.as_dict() for r in rows], indent=1) + "\n")
            tmp.replace(out)
        except OSError as exc:
            raise CLIError(f"cannot write {out}: {exc.strerror or exc}") from None
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
    from veq.portability import TARGETS, Scheme, why_not

    src, out = Path(args.model), Path(args.out)
    if not src.is_dir() or not verify(src):
        raise CLIError(f"{args.model} is not a complete veq checkpoint (manifest check failed)")
    if out.exists() and any(out.iterdir()):
        raise CLIError(f"{args.out} exists and is not empty")
    try:
        scheme = Scheme.from_directory(src)
    except (ValueError, KeyError, OSError) as exc:
        raise CLIError(f"{args.model}: unreadable quantization_config ({exc})") from None
    target = args.target
    if target is not None:
        reason = why_not(target, scheme)
        if reason is not None:
            raise CLIError(
                f"{TARGETS[target]} cannot load this {scheme.label} checkpoint: {reason}"
            )
    # Our checkpoints *are* compressed-tensors directories: export is a verified copy.
    with atomic_directory(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    print(f"wrote {out} (compressed-tensors pack-quantized, {scheme.label})")
    if target == "vllm" and why_not("vllm-old", scheme) is not None:
        print(f"note: {TARGETS['vllm']} needed ({why_not('vllm-old', scheme)})")
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


# --- veq bench ---------------------------------------------------------------------------------

_BENCH_URL = "http://127.0.0.1:8000"


def _spawn_bits(text: str) -> tuple[int, ...]:
    """`bits=16,4,3` (or `16,4,3`) → (16, 4, 3)."""
    key, sep, value = text.partition("=")
    if not sep:
        key, value = "bits", key
    if key.strip() != "bits":
        raise argparse.ArgumentTypeError(f"expected bits=B[,B...], got {text!r}")
    try:
        bits = tuple(int(b) for b in value.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of bits: {value!r}") from None
    bad = [b for b in bits if b not in (*SUPPORTED_BITS, 16)]
    if not bits or bad:
        raise argparse.ArgumentTypeError(
            f"bits must be among {(*SUPPORTED_BITS, 16)}, got {list(bad or bits)}"
        )
    return bits


def _bench_command() -> str:
    """This command line for the report, keys redacted (`veq bench` when not run as `veq`)."""
    import shlex

    argv = sys.argv[1:]
    if argv[:1] != ["bench"]:
        return "veq bench"
    shown = []
    for i, arg in enumerate(argv):
        secret = i > 0 and argv[i - 1] in ("--api-key", "--admin-key")
        if arg.startswith(("--api-key=", "--admin-key=")):
            arg = arg.split("=", 1)[0] + "=***"
        shown.append("***" if secret else arg)
    return shlex.join(["veq", *shown])


def _bench(args: argparse.Namespace) -> int:
    import os
    import time
    from pathlib import Path

    from server.loadtest import BenchError, ServeSpec
    from server.loadtest.report import write_report
    from server.loadtest.session import BenchOptions, Setting, run_bench

    for flag, value, low in (
        ("--concurrency", args.concurrency, 1),
        ("--requests", args.requests, 1),
        ("--max-tokens", args.max_tokens, 1),
        ("--warmup", args.warmup, 0),
    ):
        if value is not None and value < low:
            raise CLIError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (
        ("--duration", args.duration),
        ("--sample-interval", args.sample_interval),
        ("--ready-timeout", args.ready_timeout),
    ):
        if value is not None and value <= 0:
            raise CLIError(f"{flag} must be positive, got {value}")
    if args.compare is not None and len(args.compare) < 2:
        raise CLIError("--compare takes two or more URLs (one server: --url)")
    api_key = args.api_key or os.environ.get("VEQ_API_KEY") or None
    if args.spawn:
        queue = args.concurrency if args.concurrency > 64 else None
        settings = [
            Setting(
                spawn=ServeSpec(
                    model=args.model or "mini",
                    bits=bits,
                    method=args.method,
                    group_size=args.group_size,
                    cache_dir=args.cache_dir,
                    device=args.device,
                    threads=args.threads,
                    max_queue=queue,
                    max_model_len=args.max_model_len,
                    api_key=api_key,
                )
            )
            for bits in args.spawn
        ]
    else:
        urls = args.compare or [args.url or _BENCH_URL]
        settings = [Setting(url=u) for u in urls]
    out = Path(args.out or time.strftime("veq-bench-%Y%m%d-%H%M%S"))
    opts = BenchOptions(
        out=out,
        concurrency=args.concurrency,
        requests=args.requests,
        duration=args.duration if args.requests is None else None,
        max_tokens=args.max_tokens,
        stream=not args.no_stream,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        model=None if args.spawn else args.model,
        api_key=api_key,
        admin_key=args.admin_key or os.environ.get("VEQ_ADMIN_KEY") or None,
        warmup=args.warmup,
        sample_interval=args.sample_interval,
        ready_timeout=args.ready_timeout,
        progress=not args.no_progress,
        command=_bench_command(),
    )
    try:
        result = run_bench(settings, opts, write_report)
    except BenchError as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    for s in result.settings:
        t = s.load.summary()
        weight = (s.stats or {}).get("weight_bytes", s.target.card.get("weight_bytes"))
        p50 = t["ttft_s"]["p50"]
        print(
            f"{s.target.label}: {t['ok']}/{t['requests']} ok, {t['req_per_s']:.2f} req/s, "
            f"{t['output_tok_per_s']:.1f} output tok/s, TTFT p50 "
            + ("–" if p50 is None else f"{1000 * p50:.0f} ms")
            + ("" if weight is None else f", weights {weight / 2**20:.2f} MiB")
        )
    print(f"report: {out / 'report.md'} (and report.json, report.png)")
    if result.interrupted:
        print(f"veq: interrupted; partial report in {out}", file=sys.stderr)
        return 130
    dead = [s for s in result.settings if s.load.results and not any(r.ok for r in s.load.results)]
    if dead:
        first = dead[0].load.results[0]
        status = f"HTTP {first.status}" if first.status else "no response"
        why = f"every request to {dead[0].target.label} failed ({status}: {first.error})"
        print(f"veq: error: {why}", file=sys.stderr)
        return 1
    return 0


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="load-test a running server and report memory and speed",
        description="Send concurrent image+text chat requests to one server (--url), several "
        "(--compare) or to `veq serve` processes it starts one setting at a time (--spawn), "
        "sample /admin/stats, and write DIR/report.json, report.md and report.png: req/s, "
        "output tok/s, TTFT and latency percentiles, errors, weight bytes against the "
        "packed-size formula, memory ratios and the KV-cache room the savings free. Ctrl-C "
        "writes the partial report.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help=f"a running server (default {_BENCH_URL})")
    where.add_argument("--compare", nargs="+", metavar="URL", help="several running servers")
    where.add_argument(
        "--spawn",
        type=_spawn_bits,
        metavar="bits=B[,B...]",
        help="start one `veq serve` per bit width in turn (e.g. bits=16,4,3)",
    )
    p.add_argument("--api-key", help="API key of the server(s) [env VEQ_API_KEY]")
    p.add_argument(
        "--admin-key", help="admin key, for memory figures from /admin/stats [env VEQ_ADMIN_KEY]"
    )
    p.add_argument(
        "--model",
        help="model id to request (default: the first listed); with --spawn, the model to "
        "serve (default mini)",
    )
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=int, help="requests per setting")
    amount.add_argument(
        "--duration", type=float, default=60.0, help="seconds per setting (default 60)"
    )
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request")
    p.add_argument("--no-stream", action="store_true", help="non-streaming requests")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="fixed-length answers: every request generates --max-tokens (vLLM's ignore_eos)",
    )
    p.add_argument("--seed", type=int, default=0, help="request mix seed")
    p.add_argument("--out", help="report directory (default veq-bench-<date>-<time>)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per setting")
    p.add_argument(
        "--sample-interval", type=float, default=1.0, help="seconds between /admin/stats samples"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    spawn = p.add_argument_group("with --spawn")
    spawn.add_argument("--method", choices=METHODS, default="rtn", help="(default rtn)")
    spawn.add_argument(
        "--group-size", type=_group_size, default=128, help="32, 64, 128 or 'channel'"
    )
    spawn.add_argument("--cache-dir", help="checkpoint cache (default: the server's)")
    spawn.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    spawn.add_argument("--threads", type=int, help="server CPU threads")
    spawn.add_argument("--max-model-len", type=int, help="server max tokens per sequence")
    spawn.add_argument(
        "--ready-timeout",
        type=float,
        default=1800.0,
        help="seconds to wait for each server to load (default 1800)",
    )
    p.set_defaults(run=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veq",
        description="Quantize Mixture-of-Experts vision-language models with VEQ and serve them "
        "over an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"veq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "quantize",
        help="calibrate and quantize a model, write a checkpoint",
        epilog=METHODS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    p.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GPTQ-family act-order with static groups (gptq, veq-ma, veq; default on)",
    )
    p.add_argument(
        "--lam",
        type=float,
        default=None,
        help="exponent λ on router affinity in c = p^λ·α (veq-ma default 1, veq default 2)",
    )
    p.add_argument(
        "--tau",
        type=float,
        default=None,
        help="veq: modality weight tempered to γ^τ (default 0.5 at 2 bits, 0.25 above; "
        "1 = the paper's γ)",
    )
    p.add_argument(
        "--range-search",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="GPTQ family: shrink each group's range to minimise its error under the Hessian "
        "(default off; helps gptq at 2 and 3 bits on mini, costs veq)",
    )
    p.add_argument(
        "--gamma-per-layer",
        action="store_true",
        help="veq: weigh each layer's text tokens by that layer's measured γ (default: the "
        "model's mean γ)",
    )
    p.add_argument(
        "--weighted-search",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="veq: weigh the scale searches' tokens by the Hessians' c = p^λ·α (default on; "
        "off: every routed token once, as VEQ-ME does)",
    )
    p.add_argument(
        "--check-scales",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="veq: fold a searched scale only if GPTQ on the full Hessians does better with it "
        "than without (default off: worse on mini, BENCHMARKS 'Quality levers')",
    )
    p.add_argument(
        "--fp-target",
        type=float,
        default=None,
        metavar="STRENGTH",
        help="GPTQ family: aim each linear at the 16-bit model's outputs from the quantized "
        "model's inputs (GPTAQ), this far towards the least-squares weight, 0..1 (default 0.5 "
        "for veq, 0 for gptq and veq-ma)",
    )
    p.add_argument(
        "--tune-epochs",
        type=int,
        default=None,
        metavar="N",
        help="after the layer loop, train every scale (codes fixed) for N passes over the "
        "calibration set towards the 16-bit model's answers (end-to-end scale tuning; default "
        "2 for veq at 2 bits in groups of 128 or more, else 0)",
    )
    p.add_argument(
        "--tune-lr",
        type=float,
        default=2e-3,
        metavar="LR",
        help="Adam learning rate of scale tuning, relative to each scale (default 0.002)",
    )
    p.add_argument(
        "--true-sequential",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="quantize each layer's attention first and collect the MLP's or experts' "
        "statistics after it (one more pass per layer; default off)",
    )
    p.add_argument(
        "--saliency",
        type=float,
        default=0.0,
        metavar="TAU",
        help="veq: weigh Hessian tokens by gradient saliency to this power (default 0: off)",
    )
    p.add_argument("--out", help="output directory (default: the cache)")
    p.add_argument("--cache-dir", help="cache directory (default: $VEQ_CACHE_DIR or ~/.cache/veq)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="calibration device (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_quantize)

    p = sub.add_parser("export", help="copy a quantized checkpoint out in a serving format")
    p.add_argument("--model", required=True, help="quantized checkpoint directory (or cache entry)")
    p.add_argument("--format", choices=("compressed-tensors",), default="compressed-tensors")
    p.add_argument(
        "--for",
        dest="target",
        choices=("vllm", "sglang"),
        help="refuse, with the reason, a checkpoint this server cannot load",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=_export)

    p = sub.add_parser(
        "eval",
        help="quality table of methods × bits on a ShapesVQA reference model",
        description="Quantize the model with each method at each width (cached, like `veq "
        "quantize`), score it on held-out ShapesVQA questions and compare it with the 16-bit "
        "model: accuracy per family, answer NLL, KL to 16-bit, weight bytes.",
    )
    p.add_argument("--model", default="mini", help="'mini' (bundled) or a ShapesVQA model dir")
    p.add_argument("--methods", type=_methods, default=",".join(METHODS), help="comma list")
    p.add_argument("--bits", type=_bits_list, default=(4, 3, 2), help="comma list of 2, 3, 4, 8")
    p.add_argument(
        "--group-size", type=_group_size, default=128, help="32, 64, 128 or 'channel' (default 128)"
    )
    p.add_argument(
        "--mixed-precision",
        type=_floats,
        default=(),
        metavar="AVG[,AVG]",
        help="also run every method with expert mixed precision at these average bits",
    )
    _add_symmetry(p)
    p.add_argument("--seed", type=int, default=0, help="held-out set offset (default 0)")
    p.add_argument("--samples", type=int, default=600, help="held-out questions (default 600)")
    p.add_argument("--calib-seed", type=_ints, default=(0,), help="calibration seed(s), comma list")
    p.add_argument(
        "--calib",
        default="shapes",
        help="calibration source for every row (default shapes, the reference model's task)",
    )
    p.add_argument("--calib-samples", type=int, default=128, help="calibration samples")
    p.add_argument("--cache-dir", help="cache directory (default: $VEQ_CACHE_DIR or ~/.cache/veq)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="device (default: auto)")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_eval)

    p = sub.add_parser("models", help="list the bundled models")
    p.set_defaults(run=_models)

    p = sub.add_parser(
        "serve",
        help="quantize (or load from cache) and serve over an OpenAI-compatible HTTP API",
        description="Every flag can also be set by its VEQ_* environment variable; flags win.",
    )
    add_serve_arguments(p)
    p.set_defaults(run=_serve)

    _add_bench_parser(sub)
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
