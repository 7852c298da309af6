"""The Python API: `veq.quantize(...)` and `veq.load(...)`. The CLI is a thin layer over it.

Owns resolving a model (path, Hugging Face id, bundled name, `synthetic:NAME[?...]` spec, or an
in-memory module with its processor), the calibration set, the cache key (model fingerprint +
recipe + calibration fingerprint), and the order of work: cache hit → done; else γ → calibrate →
save atomically. A synthetic model (`veq.models.synthetic`) resolves to a small directory
without weights; its fingerprint is its spec, and it is built (on the device) only on a miss.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from veq.calib.data import CalibSample, encode_conversation, fingerprint
from veq.calib.report import QuantReport
from veq.calib.sources import check_source, conversations
from veq.checkpoint import REPORT, load_checkpoint, save_checkpoint, verify
from veq.models import get_architecture, image_token_id, source_dtype, synthetic
from veq.recipe import Recipe
from veq.reference import MINI_CALIB, MINI_DIR

log = logging.getLogger(__name__)
# bench/gpu_suite.py reads the "... in X s" INFO lines below from `veq serve` logs to say where
# a run's time went; keep their wording (model ready / calibrated / checkpoint written / loaded).

CACHE_ENV = "VEQ_CACHE_DIR"

#: Models shipped inside the package, by the name every command accepts for `--model`.
BUNDLED: dict[str, Path] = {"mini": MINI_DIR}
#: The calibration source a bundled model's recipes use when none is named: its own task.
BUNDLED_CALIB: dict[str, str] = {"mini": MINI_CALIB}
#: The calibration source of every other model (`veq.calib.sources`).
DEFAULT_CALIB = "builtin"


def default_calib(model: nn.Module | str | Path) -> str:
    """The calibration source used for `model` when the caller names none."""
    if isinstance(model, (str, Path)):
        for name, path in BUNDLED.items():
            if str(model) == name or Path(model).resolve() == path.resolve():
                return BUNDLED_CALIB[name]
    return DEFAULT_CALIB


def resolve_model(model: str | Path) -> Path:
    """A bundled name, a `synthetic:NAME[?k=v&...]` spec (materialised as a directory without
    weights, see `veq.models.synthetic`), a local directory, or a Hugging Face id (downloaded
    only on demand)."""
    if synthetic.is_spec(model):
        return synthetic.materialize(str(model))
    if str(model) in BUNDLED:
        path = BUNDLED[str(model)]
        if not (path / "config.json").is_file():
            raise ValueError(f"the bundled model {model!r} is missing from this installation")
        return path
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists() or str(model).startswith((".", "/")) or str(model).count("/") != 1:
        raise ValueError(f"{model} is not a model directory (config.json + weights)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model)))


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$VEQ_CACHE_DIR`, else `~/.cache/veq`."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "veq")


def model_fingerprint(model: nn.Module | str | Path) -> str:
    """Cheap identity of a model: its config, and per tensor name, shape, dtype and sum (in
    memory) or per weight file name, size and head/tail bytes (on disk). A synthetic model (spec
    or materialised directory) is a pure function of its spec: that is its identity, so nothing
    is hashed over its (possibly 31 B) parameters."""
    if synthetic.is_spec(model):
        return synthetic.parse_spec(str(model)).fingerprint()
    if not isinstance(model, nn.Module) and synthetic.is_synthetic_dir(model):
        return synthetic.fingerprint(model)
    h = hashlib.sha256()
    if isinstance(model, nn.Module):
        h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
        for name, t in model.state_dict().items():
            h.update(f"{name}{tuple(t.shape)}{t.dtype}{float(t.float().sum()):.6e}".encode())
        return h.hexdigest()[:16]
    path = Path(model)
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read())
    return h.hexdigest()[:16]


@dataclass
class Quantized:
    """Where the checkpoint is and what made it."""

    path: Path
    report: dict[str, Any]
    cached: bool

    def summary(self) -> str:
        r = QuantReport(
            **{k: v for k, v in self.report.items() if k in QuantReport.__dataclass_fields__}
        )
        head = f"checkpoint: {self.path}" + (" (from cache)" if self.cached else "")
        return head + "\n" + r.summary()


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    return device


def load_processor(path: str | Path) -> Any:
    """The model's processor. Qwen3-VL processors load through veq's image-only subclass,
    with or without torchvision, so images are preprocessed the same way on every host."""
    from transformers import AutoProcessor

    from veq.models.processor import ImageOnlyQwen3VLProcessor

    config = Path(path) / "processor_config.json"
    qwen3_vl = ("ImageOnlyQwen3VLProcessor", '"Qwen3VLProcessor"')
    if config.is_file() and any(name in config.read_text() for name in qwen3_vl):
        return ImageOnlyQwen3VLProcessor.from_pretrained(str(path))
    try:
        processor = AutoProcessor.from_pretrained(str(path))
    except (ImportError, ValueError, OSError, TypeError, AttributeError):
        processor = None
    if processor is None or not hasattr(processor, "tokenizer"):
        # AutoProcessor fell back to a bare tokenizer (or failed on the video processor).
        return ImageOnlyQwen3VLProcessor.from_pretrained(str(path))
    return processor


def load_model(path: str | Path, device: torch.device) -> nn.Module:
    """A full-precision Hugging Face model (fp32 on CPU, its own dtype on GPU), on CPU.

    A synthetic directory is built with random weights directly on `device` instead (a 31 B
    model is never materialised on the host)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    t0 = time.perf_counter()
    if synthetic.is_synthetic_dir(path):
        model = synthetic.build_model(Path(path), device)
        log.info("model %s ready on %s in %.1f s", Path(path).name, device, _since(t0))
        return model
    dtype = torch.float32 if device.type == "cpu" else "auto"
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        try:
            model = auto.from_pretrained(str(path), dtype=dtype).eval()
        except ValueError:
            continue
        log.info("model %s ready on cpu in %.1f s", Path(path).name, _since(t0))
        return model
    raise ValueError(f"{path} is not a model transformers can load")


def quantize(
    model: nn.Module | str | Path,
    *,
    processor: Any | None = None,
    method: str = "veq",
    bits: int = 4,
    group_size: int | None = 128,
    calib: str | None = None,
    samples: int = 128,
    seed: int = 0,
    gamma: float | str = "auto",
    mixed_precision: float | None = None,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_layer: Callable[[int, int], None] | None = None,
    **recipe_options: Any,
) -> Quantized:
    """Quantize `model` (directory, HF id, or module + `processor`) and write its checkpoint.

    With `out=None` the checkpoint goes to the cache (`cache_root()`), keyed by model, recipe and
    calibration set; a verified cache entry is returned without recomputation. `calib=None`
    uses the model's own source (`default_calib`).
    """
    calib = calib or default_calib(model)
    recipe = Recipe(
        method=method,
        bits=bits,
        group_size=group_size,
        gamma=gamma,
        mixed_precision=mixed_precision,
        **recipe_options,
    )
    dev = resolve_device(device)
    source: nn.Module | None
    loaded_here = False
    if isinstance(model, nn.Module):
        if processor is None:
            raise ValueError("quantizing an in-memory model needs its processor")
        source = model
        model_name = getattr(model.config, "_name_or_path", "") or model.config.model_type
        model_fp, config = model_fingerprint(source), source.config
    else:
        path = resolve_model(model)
        processor = processor or load_processor(path)
        model_name = path.name
        loaded_here = True
        # Key from the files on disk (or a synthetic model's spec): the model (62 GB at 30 B)
        # is loaded only on a cache miss, so a restart that hits the cache never reads it.
        from transformers import AutoConfig

        source, model_fp = None, model_fingerprint(path)
        config = AutoConfig.from_pretrained(str(path))
    dtype = source_dtype(config)
    if "scale_dtype" not in recipe_options:
        recipe = recipe.model_copy(
            update={"scale_dtype": "bfloat16" if dtype == torch.bfloat16 else "float16"}
        )
    probe = SimpleNamespace(config=config)  # the tables read the config only
    arch = get_architecture(probe)
    token = image_token_id(probe, arch)
    if recipe.data_free:
        check_source(calib)
        log.info("%s needs no calibration data: the calibration set is not read", recipe.label)
        calib_samples, calib_fp = [], "data-free"
    else:

        def encode() -> list[CalibSample]:
            return [
                encode_conversation(processor, c, token if token is not None else -1)
                for c in conversations(calib, samples, seed)
            ]

        # Memoized only for a model directory (its processor is the directory's); an in-memory
        # model comes with a processor object we cannot key soundly.
        calib_samples = (
            _memo(("calib", str(path), calib, _mtime(calib), samples, seed), encode)
            if loaded_here
            else encode()
        )
        calib_fp = fingerprint(calib_samples)
    identity = model_fp + recipe.model_dump_json() + calib_fp
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    target = (
        Path(out)
        if out is not None
        else cache_root(cache_dir) / f"{_slug(model_name)}-{recipe.label}-{key}"
    )
    if target.exists():
        if verify(target):
            log.info("using cached checkpoint %s", target)
            return Quantized(target, json.loads((target / REPORT).read_text()), cached=True)
        log.warning("cache entry %s is incomplete or corrupt; rebuilding it", target.name)

    # The calibration stack loads only here, on a cache miss: `veq.load` and a cache hit never
    # import a solver.
    from veq.calib.gamma import measure_saliency, resolve_gamma
    from veq.calib.methods import METHOD_CLASSES
    from veq.calib.pipeline import Calibrator
    from veq.calib.tune import TuneUnavailable, teacher_targets, tune_scales

    if source is None:
        source = load_model(path, dev)
    if recipe.data_free:
        fixed = recipe.gamma if recipe.gamma != "auto" else recipe.gamma_fallback
        g, g_source, ratios, detail = float(fixed), "unused (data-free)", None, {}
    else:
        g, g_source, ratios, detail = _memo(
            ("gamma", model_fp, calib_fp, recipe.gamma, recipe.gamma_fallback, dev.type),
            lambda: resolve_gamma(source, calib_samples, recipe.gamma, recipe.gamma_fallback, dev),
        )
    saliency = None
    if METHOD_CLASSES[recipe.method].needs_saliency(recipe):
        saliency = _memo(
            ("saliency", model_fp, calib_fp, dev.type),
            lambda: measure_saliency(source, calib_samples, device=dev),
        )
    calibrator = Calibrator(
        source,
        calib_samples,
        recipe,
        gamma=g,
        gamma_source=g_source,
        vision_ratios=ratios,
        layer_gammas=detail.get("per_layer") or None,
        saliency=saliency,
        device=dev,
        progress=progress,
        on_layer=on_layer,
    )
    calibrator.report.gamma_detail = detail
    calibrator.report.calib = "" if recipe.data_free else calib
    targets, skipped = None, ""
    if recipe.tune_epochs:
        # The 16-bit model's answers, before the layer loop overwrites its weights.
        try:
            targets = _memo(
                ("teacher", model_fp, calib_fp, dev.type),
                lambda: teacher_targets(source, calib_samples, device=dev),
            )
        except TuneUnavailable as exc:
            skipped = str(exc)
    result = calibrator.run()
    if targets is not None:
        try:
            result = tune_scales(
                source,
                result,
                calib_samples,
                targets,
                epochs=recipe.tune_epochs,
                lr=recipe.tune_lr,
                device=dev,
                progress=progress,
            )
        except TuneUnavailable as exc:
            skipped = str(exc)
    if skipped:
        log.warning("scale tuning skipped: %s", skipped)
        result.report.tuning = {"skipped": skipped}
    log.info(
        "calibrated %d layers (%s) in %.1f s",
        result.report.layers,
        recipe.label,
        result.report.seconds,
    )
    t0 = time.perf_counter()
    save_checkpoint(
        source,
        result,
        target,
        processor=processor,
        calib_fingerprint=calib_fp,
        device=dev,
        dtype=dtype,
        source_dir=path if loaded_here and path.is_dir() else None,
    )
    log.info("checkpoint written to %s in %.1f s", target.name, _since(t0))
    if loaded_here:
        # The caller loads the checkpoint next: free the full-precision model (on a GPU, 62 GB
        # at 30 B) and the host copy of the codes first, cycles included.
        del source, calibrator, result
        _release(dev)
    return Quantized(target, json.loads((target / REPORT).read_text()), cached=False)


#: This process's encoded calibration sets and measured γ, newest last. `veq eval` and the
#: quality bench quantize one model many times with the same data; both are pure functions of
#: their key (a JSONL calibration file's modification time is part of it).
_MEMO: OrderedDict[tuple, Any] = OrderedDict()
_MEMO_SIZE = 8


def _memo(key: tuple, make: Callable[[], Any]) -> Any:
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    value = _MEMO[key] = make()
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return value


def _mtime(calib: str) -> int | None:
    try:
        return os.stat(calib).st_mtime_ns
    except OSError:  # builtin, hf:NAME, or missing (conversations() reports that)
        return None


def _since(t0: float) -> float:
    return time.perf_counter() - t0


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load(
    path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[nn.Module, Any]:
    """A ready quantized model (quantized modules in place) and its processor."""
    dev = resolve_device(device)
    t0 = time.perf_counter()
    model = load_checkpoint(path, device=dev, dtype=dtype)
    log.info("checkpoint %s loaded on %s in %.1f s", Path(path).name, dev, _since(t0))
    return model, load_processor(path)


def _slug(name: str) -> str:
    return (
        "".join(c if c.isalnum() or c in "-_." else "-" for c in name.split("/")[-1])[:48]
        or "model"
    )
