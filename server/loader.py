"""Build the model runner the server serves: quantize (or load from the cache) and load.

`--bits 16` serves the unquantized model, the baseline of memory comparisons. Used at start-up
and by admin requantization jobs, with overrides of method/bits/group size/calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import veq
from server.engine.runner import ModelInfo, ModelRunner, weight_bytes
from veq.api import load_model, load_processor, resolve_device, resolve_model
from veq.portability import Scheme
from veq.recipe import Recipe


def build_runner(
    settings: Any,
    overrides: dict[str, Any] | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    progress: bool = True,
) -> ModelRunner:
    """`settings` carries model, method, bits, group_size, calib, samples, gamma, cache_dir,
    symmetric, device and served_model_name; `overrides` replaces method/bits/group_size/calib/
    symmetric."""
    o = overrides or {}
    method = o.get("method") or settings.method
    bits = int(o.get("bits") or settings.bits)
    group_size = o["group_size"] if "group_size" in o else settings.group_size
    calib = o.get("calib") or settings.calib
    symmetric = o["symmetric"] if "symmetric" in o else settings.symmetric
    path = resolve_model(settings.model)
    device = resolve_device(None if settings.device == "auto" else settings.device)
    name = settings.served_model_name or ("mini" if str(settings.model) == "mini" else path.name)
    if bits == 16:
        model = load_model(path, device).to(device)
        processor = load_processor(path)
        if on_layer is not None:
            on_layer(1, 1)
        info = ModelInfo(name, "none", 16, None, weight_bytes(model))
        return ModelRunner(model, processor, info)
    gamma = settings.gamma
    result = veq.quantize(
        path,
        method=method,
        bits=bits,
        group_size=group_size,
        calib=calib,
        samples=settings.samples,
        gamma=gamma,
        symmetric=symmetric,
        cache_dir=settings.cache_dir,
        device=device,
        progress=progress,
        on_layer=on_layer,
    )
    if on_layer is not None and result.cached:
        on_layer(1, 1)
    model, processor = veq.load(result.path, device=device)
    recipe = Recipe.model_validate(result.report["recipe"])
    info = ModelInfo(
        name,
        method,
        bits,
        group_size,
        weight_bytes(model),
        str(result.path),
        symmetric=Scheme.from_directory(result.path).symmetric,
        label=recipe.label,
    )
    return ModelRunner(model, processor, info)
