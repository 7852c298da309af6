"""Where a backward pass over the whole model runs: whether it fits on the calibration device,
and moving the model there and back.

The layer loop keeps the model on the host and streams one decoder layer at a time to the
device; the stages that differentiate through the whole model (γ and saliency in
`veq.calib.gamma`, scale tuning in `veq.calib.tune`) need all of it on the device at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psutil
import torch
from torch import Tensor, nn

from veq.calib.data import CalibSample
from veq.models import decoder_layers, get_architecture

#: Tensors kept for the backward pass per token and decoder layer, in hidden-size widths: 26 on
#: the Qwen3-VL-30B-A3B shapes (attention, norms, 8 routed experts; counted with saved-tensor
#: hooks), rounded up. The vision tower keeps none: nothing before the embeddings needs grad.
SAVED_WIDTHS = 32
#: Bytes per token and vocabulary entry at the loss: the logits, their fp32 copy, the saved
#: log-softmax and the gradients flowing back through them.
LOSS_BYTES = 16
#: Raised by the device when the pass does not fit or the device fails; either means "not
#: here", not a bug. (`torch.AcceleratorError`, CUDA runtime errors, is absent from older torch.)
DEVICE_ERRORS: tuple[type[Exception], ...] = tuple(
    e for e in (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", None)) if e is not None
)
GB = 1e9


def _elsewhere(model: nn.Module, device: torch.device) -> list[tuple[nn.Module, str, Tensor]]:
    """(module, name, tensor) for every parameter and buffer of `model` not on `device`."""
    return [
        (module, name, t)
        for module in model.modules()
        for name, t in (
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        )
        if t.device != device
    ]


def backward_bytes(model: nn.Module, samples: Sequence[CalibSample]) -> int:
    """Activation memory of the largest sample's backward pass, estimated from the shapes."""
    config = model.config.get_text_config()
    layers = len(decoder_layers(model, get_architecture(model)))
    width = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    tokens = max(s.inputs["input_ids"].shape[-1] for s in samples)
    per_token = layers * config.hidden_size * SAVED_WIDTHS * width + config.vocab_size * LOSS_BYTES
    return tokens * per_token


def need_bytes(model: nn.Module, samples: Sequence[CalibSample], device: torch.device) -> int:
    """What a backward pass adds on `device`: the parameters and buffers that are elsewhere (a
    tensor tied into several modules counts once), plus the pass's activations."""
    missing = {id(t): t for _, _, t in _elsewhere(model, device)}.values()
    return sum(t.numel() * t.element_size() for t in missing) + backward_bytes(model, samples)


def free_bytes(device: torch.device) -> int:
    """Memory this process can still allocate on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks PyTorch's allocator holds but does not use are free to this process too.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return psutil.virtual_memory().available


@contextmanager
def placed(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Inside the block every parameter and buffer of `model` is on `device`; on exit the
    original tensors are put back, also when the block fails. Nothing is copied back (the
    originals never left) and tied tensors stay tied: each is copied once."""
    found = _elsewhere(model, device)
    copies: dict[int, Tensor] = {}
    try:
        for module, name, t in found:
            if id(t) not in copies:
                copy = t.detach().to(device)
                copies[id(t)] = (
                    nn.Parameter(copy, t.requires_grad) if isinstance(t, nn.Parameter) else copy
                )
            setattr(module, name, copies[id(t)])
        yield
    finally:
        for module, name, t in found:
            setattr(module, name, t)


@contextmanager
def backward_room(
    model: nn.Module,
    samples: Sequence[CalibSample],
    device: torch.device,
    unavailable: type[Exception],
    extra_bytes: int = 0,
) -> Iterator[None]:
    """The model `placed` on `device` for backward passes over `samples`. Raises `unavailable`
    (one line) when they do not fit there with `extra_bytes` more, or when the device runs out
    of memory or fails inside the block."""
    need = need_bytes(model, samples, device) + extra_bytes
    free = free_bytes(device)
    if need > free:
        raise unavailable(
            f"the model does not fit for a backward pass on {device} "
            f"(about {need / GB:.1f} GB needed, {free / GB:.1f} GB free)"
        )
    try:
        with placed(model, device):
            yield
    except DEVICE_ERRORS as exc:
        # The first line says what failed; CUDA errors go on with debugging advice.
        what = str(exc).splitlines()[0]
        raise unavailable(
            f"{type(exc).__name__} on {device} during the backward pass: {what}"
        ) from exc
