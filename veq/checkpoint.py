"""Quantized checkpoints on disk, and the cache that keys them.

Owns the directory format (docs/design.md §Weight formats): safetensors shards in which every
quantized linear is stored as compressed-tensors `pack-quantized` tensors (experts unfused as
`...mlp.experts.{e}.{gate,up,down}_proj.*`), `config.json` with a `quantization_config` that
compressed-tensors and vLLM read (plus a `veq` block), the processor files, `veq_report.json`,
and `manifest.json` with the SHA-256 of every file, written last. A directory is complete when
its manifest verifies; anything else (killed write, truncated shard) is rebuilt, never served.
Writes go to a temporary sibling directory renamed into place.

Loading swaps quantized linears for `veq.nn.QuantLinear` and fused experts for
`veq.nn.QuantMoEExperts` on a model built without allocating its full-precision weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from veq.calib.report import QuantResult
from veq.config import QuantConfig
from veq.format import pack_weight, unpack_weight
from veq.models import Architecture, get_architecture, get_module, set_module, source_dtype
from veq.quantizer import QuantizedWeight

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "veq_report.json"
_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


#: Files of the source model directory a quantized copy carries unchanged: what vLLM, SGLang
#: and transformers read besides weights and config (sampling defaults and EOS ids, processor,
#: tokenizer, chat template) and the remote code `auto_map` names (Kimi-VL).
SOURCE_FILES = (
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",
    "*.py",
)


class CheckpointError(ValueError):
    pass


def _set_dtype(config: dict[str, Any], dtype: torch.dtype) -> None:
    """Record `dtype` wherever the config names one (top level, text and vision configs)."""
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    for sub in config.values():
        if isinstance(sub, dict) and ("dtype" in sub or "torch_dtype" in sub):
            sub["dtype" if "dtype" in sub else "torch_dtype"] = name


# -- writing -------------------------------------------------------------------------------


def _weights_args(cfg: QuantConfig) -> dict[str, Any]:
    return {
        "num_bits": cfg.bits,
        "type": "int",
        "symmetric": cfg.symmetric,
        "strategy": "group" if cfg.group_size else "channel",
        "group_size": cfg.group_size,
        "dynamic": False,
        "observer": "minmax",
        "actorder": None,
    }


def quantization_config(
    model: nn.Module, arch: Architecture, result: QuantResult, calib_fingerprint: str
) -> dict[str, Any]:
    """compressed-tensors `quantization_config` with one config group per distinct setting.

    A uniform recipe targets every `Linear` not ignored (what vLLM expects of llm-compressor
    checkpoints); mixed precision lists each group's modules by exact name.
    """
    by_cfg: dict[QuantConfig, list[str]] = {}
    for name, qw in result.weights.items():
        by_cfg.setdefault(qw.cfg, []).append(name)
    uniform = len(by_cfg) == 1
    groups = {
        f"group_{i}": {
            "targets": ["Linear"] if uniform else sorted(names),
            "weights": _weights_args(cfg),
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
        for i, (cfg, names) in enumerate(sorted(by_cfg.items(), key=lambda kv: -kv[0].bits))
    }
    patterns = [re.compile(p[3:]) for p in arch.ignore if p.startswith("re:")]
    ignore = list(arch.ignore)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in result.weights:
            if name not in ignore and not any(p.match(name) for p in patterns):
                ignore.append(name)
    report = result.report
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "veq": {
            "format_version": FORMAT_VERSION,
            "architecture": arch.name,
            "method": report.method,
            "recipe": report.recipe,
            "gamma": report.gamma,
            "gamma_source": report.gamma_source,
            "lambda": report.recipe.get("lam", 1.0),
            "beta": report.beta,
            "calibration_fingerprint": calib_fingerprint,
            "bits": report.bits,
        },
    }


def _state_without_quantized(
    model: nn.Module, arch: Architecture, names: set[str], dtype: torch.dtype
) -> dict[str, Tensor]:
    """Full-precision tensors to keep, floating ones in `dtype`: everything except the quantized
    weights (and fused expert tensors, which are written unfused)."""
    fused_expert_params: set[str] = set()
    if arch.moe.layout == "fused":
        for name, module in model.named_modules():
            if name.endswith(f".{arch.moe.block}.{arch.moe.experts}") and hasattr(
                module, "gate_up_proj"
            ):
                fused_expert_params |= {f"{name}.gate_up_proj", f"{name}.down_proj"}
    # Weights the model class keeps in fp32 whatever the load dtype (DeepSeek-V3's router and
    # its score-correction bias, which Kimi K2.5 uses) stay fp32: rounding them to bf16 could
    # flip near-tied expert choices in the servers that load the checkpoint.
    fp32 = {
        name
        for m in model.modules()
        for attr in ("_keep_in_fp32_modules_strict", "_keep_in_fp32_modules")
        for name in getattr(m, attr, None) or ()
    }
    state = {}
    seen: set[tuple[int, int]] = set()
    # Tied tensors (lm_head = embed_tokens) are stored once; the loader re-ties them. Sorting
    # puts lm_head after the embeddings of every supported layout, so the embedding is kept.
    for key, tensor in sorted(
        model.state_dict().items(), key=lambda kv: kv[0].startswith("lm_head")
    ):
        if key in fused_expert_params:
            continue
        if key.endswith(".weight") and key[: -len(".weight")] in names:
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen and tensor.numel() > 1:
            continue
        seen.add(ident)
        tensor = tensor.detach()
        if tensor.is_floating_point():
            keep = any(key == n or key.endswith("." + n) for n in fp32)
            tensor = tensor.to(torch.float32 if keep else dtype)
        state[key] = tensor.cpu().contiguous()
    return state


def _shards(tensors: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    files = {
        p.relative_to(directory).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (directory / MANIFEST).write_text(
        json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1)
    )


def verify(directory: str | Path) -> bool:
    """True when the manifest exists and every file it lists has its size and checksum."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError):
        return False
    for rel, meta in files.items():
        path = directory / rel
        if (
            not path.is_file()
            or path.stat().st_size != meta["bytes"]
            or _sha256(path) != meta["sha256"]
        ):
            return False
    return True


def _process_umask() -> int:
    # Read once, at import: setting it to read it back is process-wide, and the server writes
    # checkpoints from a requantization thread while others create files.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _process_umask()


def _publish_modes(directory: Path) -> None:
    """The modes a plain `mkdir`/`open` would give (mkdtemp and some writers use 0700/0600),
    so a server running as another user (a container's) can read the directory."""
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~_UMASK)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success it replaces `final` in one rename.
    On any exception (Ctrl-C included) the temporary directory is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        _publish_modes(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _copy_source_files(source: Path, out: Path) -> None:
    """The source directory's generation, processor and tokenizer files, and its remote code."""
    for path in sorted(source.iterdir()):
        if path.is_file() and any(path.match(p) for p in SOURCE_FILES):
            shutil.copy2(path, out / path.name)


def save_checkpoint(
    model: nn.Module,
    result: QuantResult,
    out: str | Path,
    *,
    processor: Any | None = None,
    calib_fingerprint: str = "",
    max_shard_bytes: int = 2 << 30,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    source_dir: str | Path | None = None,
) -> Path:
    """Write the quantized model directory atomically; returns its path.

    Codes are packed on `device` one weight at a time (on a GPU, a 30 B model's packing takes
    seconds instead of the host's tens of minutes), and the packed words kept on the host.
    Unquantized tensors are stored in `dtype` (default: the config's, `source_dtype`), the
    source checkpoint's, whatever dtype calibration ran in. The files of `source_dir` that
    servers read besides the weights (`SOURCE_FILES`) are copied over what `processor` writes."""
    out = Path(out)
    arch = get_architecture(model)
    dtype = dtype or source_dtype(model.config)
    tensors = _state_without_quantized(model, arch, set(result.weights), dtype)
    for name, qw in result.weights.items():
        for suffix, t in pack_weight(qw.to(device)).items():
            tensors[f"{name}.{suffix}"] = t.contiguous().cpu()
    config = model.config.to_dict()
    _set_dtype(config, dtype)
    config["quantization_config"] = quantization_config(model, arch, result, calib_fingerprint)
    with atomic_directory(out) as tmp:
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map |= {k: fname for k in shard}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
            )
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        report = result.report
        (tmp / REPORT).write_text(json.dumps(report.__dict__, indent=1, default=str))
        if processor is not None:
            processor.save_pretrained(str(tmp))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(tmp))
        if source_dir is not None:
            _copy_source_files(Path(source_dir), tmp)
        write_manifest(tmp)
    return out


# -- reading -------------------------------------------------------------------------------


def read_tensors(directory: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Every tensor of the directory's safetensors files, read straight onto `device`."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors files in {directory.name}")
    out: dict[str, Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(torch.device(device))) as reader:
            for key in reader.keys():
                out[key] = reader.get_tensor(key)
    return out


def _module_configs(qc: dict[str, Any]) -> tuple[dict[str, QuantConfig], QuantConfig | None]:
    """Per-module QuantConfig from the config groups: exact names, or one default (`Linear`)."""
    by_name: dict[str, QuantConfig] = {}
    default = None
    for group in qc.get("config_groups", {}).values():
        w = group["weights"]
        cfg = QuantConfig(
            bits=w["num_bits"], group_size=w.get("group_size"), symmetric=w["symmetric"]
        )
        for target in group["targets"]:
            if target == "Linear":
                default = cfg
            else:
                by_name[target] = cfg
    return by_name, default


@dataclass(frozen=True)
class PackedEntry:
    """One quantized module's on-disk tensors (`weight_packed`, ...) and its scheme."""

    tensors: dict[str, Tensor]
    cfg: QuantConfig

    def unpack(self) -> QuantizedWeight:
        return unpack_weight(self.tensors, self.cfg)


def packed_weights(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, PackedEntry], dict[str, Tensor]]:
    """Every quantized module's packed tensors by module name (on `device`, unpacked only when
    asked: the int8 codes of a whole 30 B model would not fit beside it), and the rest."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{directory.name} is not a compressed-tensors quantized checkpoint")
    by_name, default = _module_configs(qc)
    tensors = read_tensors(directory, device)
    names = sorted({k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")})
    weights = {}
    for name in names:
        cfg = by_name.get(name, default)
        if cfg is None:
            raise CheckpointError(f"no quantization scheme covers {name}")
        weights[name] = PackedEntry(
            {s: tensors.pop(f"{name}.{s}") for s in _SUFFIXES if f"{name}.{s}" in tensors}, cfg
        )
    return weights, tensors


@contextmanager
def _params_on_meta() -> Iterator[None]:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def _model_class(config: Any) -> Callable[..., nn.Module]:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        try:
            auto._model_mapping[type(config)]
        except KeyError:
            continue
        return auto.from_config
    raise CheckpointError(f"no transformers model class for model_type {config.model_type!r}")


def load_checkpoint(
    directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """A ready model from a quantized directory: quantized modules in place, on `device`.

    `dtype` (default: float32 on CPU, the checkpoint's dtype on GPU) is the activation dtype.
    """
    from transformers import AutoConfig

    from veq.nn import QuantLinear, QuantMoEExperts

    directory = Path(directory)
    if not verify(directory):
        raise CheckpointError(f"{directory.name} is incomplete or corrupt (manifest check failed)")
    config = AutoConfig.from_pretrained(str(directory))
    stored_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dtype is None:
        dtype = (
            torch.float32
            if torch.device(device).type == "cpu"
            else (
                getattr(torch, str(stored_dtype).replace("torch.", ""))
                if stored_dtype
                else torch.bfloat16
            )
        )
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _params_on_meta():
        model = _model_class(config)(config)
    arch = get_architecture(model)
    # Packed words are read onto the device and unpacked/re-laid out there, one module (or one
    # layer's experts) at a time: on a GPU this is seconds for a 30 B model, on the host minutes.
    weights, tensors = packed_weights(directory, device)

    # Fused experts: collect per layer, build one QuantMoEExperts each.
    experts: dict[str, dict[int, dict[str, PackedEntry]]] = {}
    pattern = re.compile(
        rf"^(.*\.{re.escape(arch.moe.block)}\.{re.escape(arch.moe.experts)})\.(\d+)\.(gate|up|down)_proj$"
    )
    # Entries are popped as they are consumed, so each module's packed words are freed once its
    # kernel-layout buffers exist (the peak holds one layer's experts twice, not the model).
    while weights:
        name, qw = weights.popitem()
        m = pattern.match(name)
        if m and arch.moe.layout == "fused":
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = qw
            continue
        bias = tensors.pop(f"{name}.bias", None)
        set_module(model, name, QuantLinear.from_quantized(qw.unpack(), bias=bias, dtype=dtype))
    while experts:
        prefix, by_expert = experts.popitem()
        n = (
            len(get_module(model, prefix).gate_up_proj)
            if hasattr(get_module(model, prefix), "gate_up_proj")
            else len(by_expert)
        )
        missing = [e for e in range(n) if set(by_expert.get(e, {})) != {"gate", "up", "down"}]
        if missing:
            raise CheckpointError(f"{prefix}: experts {missing[:5]} are missing quantized weights")
        module = QuantMoEExperts.from_quantized(
            [by_expert[e]["gate"].unpack() for e in range(n)],
            [by_expert[e]["up"].unpack() for e in range(n)],
            [by_expert[e]["down"].unpack() for e in range(n)],
            dtype=dtype,
        )
        set_module(model, prefix, module)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"unexpected tensors in checkpoint: {result.unexpected_keys[:5]}")
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        # Tied weights (lm_head = embeddings) are the only legitimate gap.
        model.tie_weights()
        still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"checkpoint lacks tensors for {still_meta[:5]}")
    return model.to(device).eval()
