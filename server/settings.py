"""The server's one settings object: `ServeSettings`, read from `VEQ_*` env and `veq serve` flags.

Owns every knob of `veq serve` (the recipe to serve, where to listen, the keys, the limits that
protect the server, the remote-image policy), each with a default, a validator where a bad value
would only fail later, and a one-line description that doubles as the flag's help text. Also
owns the merge rule between flags and env (`ServeSettings.from_cli`: flags win, env fills the
rest, defaults fill what neither names) and an optional `add_serve_arguments` that builds the
flags from the fields, so the two cannot drift apart.

It deliberately does not read settings at import time (no module-level instance: the app is
handed one), resolve `device="auto"`, derive the cache path (that is `veq.api.cache_root`), or
decide anything about a request (limits are enforced by the serving layer and `server.media`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from veq.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from veq.recipe import METHODS, Method

ENV_PREFIX = "VEQ_"
#: Bits `veq serve` accepts: the quantized widths, and 16 for the unquantized baseline.
SERVE_BITS: tuple[int, ...] = (*SUPPORTED_BITS, 16)
_NO_GROUP = ("none", "channel", "-1", "")
# A DNS name: dot-separated labels of letters, digits and inner hyphens (IDNA already applied).
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")

MiB = 1024 * 1024


class SettingsError(ValueError):
    """Bad settings, as one line naming the flag and env variable: `--bits / VEQ_BITS: ...`."""


class ServeSettings(BaseSettings):
    """Everything `veq serve` is told. Build with `ServeSettings()` (env + defaults) or
    `ServeSettings.from_cli(args)` (flags over env); after validation `served_model_name` is set.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    # --- What to serve -------------------------------------------------------------------------
    model: str = Field("mini", min_length=1, description="Model directory, HF id, or 'mini'.")
    method: Method = Field("veq", description=f"Quantization method: one of {', '.join(METHODS)}.")
    bits: int = Field(4, description="Weight bits: 2, 3, 4 or 8; 16 serves the unquantized model.")
    group_size: int | None = Field(
        128, description="Input features per scale: 32, 64, 128, or 'channel' (one per row)."
    )
    symmetric: bool | None = Field(
        None,
        description="Symmetric codes (--symmetric) or a zero point per group (--asymmetric); "
        "default: symmetric at 4 and 8 bits, asymmetric at 2 and 3.",
    )
    calib: str | None = Field(
        None,
        min_length=1,
        description="Calibration data: builtin, shapes, a JSONL file or hf:NAME; default: the "
        "model's own (shapes for mini, else builtin).",
    )
    samples: int = Field(32, ge=1, description="Calibration samples used when quantizing.")
    gamma: float | Literal["auto"] = Field(
        "auto", description="Text/vision sensitivity ratio γ, or 'auto' to measure it."
    )
    cache_dir: Path | None = Field(
        None, description="Quantized-checkpoint cache directory (default: ~/.cache/veq)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs: auto (CUDA when present), cpu or cuda."
    )

    # --- Where and for whom --------------------------------------------------------------------
    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0: any free port).")
    api_key: SecretStr | None = Field(
        None, description="Bearer key every route except /health and /ready requires."
    )
    admin_key: SecretStr | None = Field(
        None, description="Bearer key for /admin/*; without one, /admin/* answers 403."
    )
    served_model_name: str | None = Field(
        None, description="Model id clients send and /v1/models lists (default: from --model)."
    )

    # --- Capacity ------------------------------------------------------------------------------
    max_batch: int = Field(16, ge=1, description="Most sequences the engine runs in one step.")
    max_queue: int = Field(64, ge=1, description="Most waiting requests before 503 Retry-After.")
    max_model_len: int = Field(
        4096, ge=16, description="Most tokens per sequence: prompt (images included) + output."
    )
    max_tokens_limit: int = Field(
        1024, ge=1, description="Largest max_tokens (max_completion_tokens) a request may ask."
    )
    max_step_tokens: int | None = Field(
        None,
        ge=16,
        description="Tokens one engine step may compute: its decode rows plus chunks of prompts "
        "longer than this, so a long prompt does not stall decoding; default: 96 on CPU, "
        "2048 on CUDA.",
    )
    kv_cache_memory: int | None = Field(
        None,
        ge=1,
        description="Bytes preallocated for the KV cache, in slots of --max-model-len tokens; "
        "default: on CUDA what --gpu-memory-utilization leaves after the model, on CPU "
        "--max-batch slots.",
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Share of the GPU's memory this server may take (model + KV cache) when "
        "--kv-cache-memory is not given.",
    )
    cuda_graphs: bool = Field(
        False,
        description="Replay decode steps from CUDA graphs: batches padded to power-of-two "
        "buckets, one graph per batch and key-length bucket, captured on first use (CUDA only).",
    )

    # --- Input limits --------------------------------------------------------------------------
    max_images_per_request: int = Field(
        4, ge=0, description="Most images in one request, over all messages."
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Most pixels (width × height) of one decoded image."
    )
    max_image_bytes: int = Field(
        10 * MiB, ge=1, description="Most bytes of one encoded image (data: URL or download)."
    )
    max_body_bytes: int = Field(
        20 * MiB, ge=1024, description="Most bytes of one request body; more answers 413."
    )

    # --- Remote images -------------------------------------------------------------------------
    allow_remote_images: bool = Field(
        False, description="Fetch http(s) image URLs (public addresses only); off by default."
    )
    allowed_media_domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts remote images may come from (subdomains included); empty: any.",
    )
    remote_timeout_s: float = Field(
        5.0, gt=0, le=120, description="Seconds allowed for one remote image, redirects included."
    )

    # --- Compute ---------------------------------------------------------------------------------
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU intra-op threads for torch (default: torch's choice). On a shared host, "
        "1 avoids spinning threads fighting the load generator or other jobs.",
    )

    # --- Shutdown ------------------------------------------------------------------------------
    drain_timeout_s: float = Field(
        30.0, ge=0, description="Seconds SIGTERM waits for in-flight requests before exiting."
    )

    # --- Validators ----------------------------------------------------------------------------
    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in SERVE_BITS:
            raise ValueError(f"must be one of {', '.join(map(str, SERVE_BITS))}, got {v}")
        return v

    @field_validator("group_size", mode="before")
    @classmethod
    def _group_size_text(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() in _NO_GROUP):
            return None
        if isinstance(v, int) and v == -1:
            return None
        return v

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int | None) -> int | None:
        if v is not None and v not in SUPPORTED_GROUP_SIZES:
            sizes = ", ".join(map(str, SUPPORTED_GROUP_SIZES))
            raise ValueError(f"must be one of {sizes} or 'channel', got {v}")
        return v

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, v: float | str) -> float | str:
        if v != "auto" and (not math.isfinite(float(v)) or float(v) <= 0):
            raise ValueError(f"must be 'auto' or a positive number, got {v}")
        return v

    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: Any) -> Any:
        # `VEQ_API_KEY=` (set but empty) must not mean "the key is the empty string".
        if isinstance(v, str) and not v.strip():
            return None
        if isinstance(v, SecretStr) and not v.get_secret_value().strip():
            return None
        return v

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _empty_name_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("allowed_media_domains", mode="before")
    @classmethod
    def _split_domains(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    raise ValueError("must be a comma-separated list or a JSON list") from None
            return [part for part in text.split(",") if part.strip()]
        return v

    @field_validator("allowed_media_domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for raw in v:
            host = raw.strip().lower().rstrip(".")
            if host.startswith("*."):
                host = host[2:]  # "*.example.com" means what "example.com" means here
            if not host or "/" in host or ":" in host or "@" in host:
                raise ValueError(
                    f"{raw!r} is not a host name; give bare names like 'images.example.com'"
                )
            try:
                ascii_host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise ValueError(f"{raw!r} is not a valid host name") from None
            if not all(_LABEL.match(label) for label in ascii_host.split(".")):
                raise ValueError(f"{raw!r} is not a valid host name")
            if ascii_host not in out:
                out.append(ascii_host)
        return out

    @model_validator(mode="after")
    def _derive(self) -> ServeSettings:
        if self.served_model_name is None:
            self.served_model_name = default_model_name(self.model)
        # max_tokens_limit may exceed max_model_len: the serving layer checks prompt + max_tokens
        # against max_model_len per request, and failing start over it would punish
        # `VEQ_MAX_MODEL_LEN=512` alone.
        return self

    # --- Accessors -----------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """The id clients send as `model` and `/v1/models` lists (never None)."""
        return self.served_model_name or default_model_name(self.model)

    @property
    def quantized(self) -> bool:
        """False for `bits=16` (the unquantized baseline)."""
        return self.bits != 16

    # --- Flags over env ------------------------------------------------------------------------
    @classmethod
    def from_cli(cls, flags: argparse.Namespace | Mapping[str, Any]) -> ServeSettings:
        """Settings from `veq serve` flags over `VEQ_*` env over defaults.

        `flags` is the parsed namespace (or a dict). Keys that are not fields (`command`, `run`)
        are ignored, and so are None values: None means "flag not given", so env or the default
        fills it. Flags must therefore have no argparse default of their own (use
        `add_serve_arguments`, which uses `argparse.SUPPRESS`), and per-channel grouping is
        spelled as the string 'channel' (or 'none'), which the validator turns into None.
        Raises `SettingsError` with one line per bad value, naming flag and env variable.
        """
        given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags)
        kwargs = {k: v for k, v in given.items() if k in cls.model_fields and v is not None}
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            raise SettingsError(describe_errors(exc)) from None


def default_model_name(model: str) -> str:
    """The served id for `--model`: a local path gives its last component (paths never leak to
    clients); an HF id (`org/name`) or a bundled name (`mini`) is used as given."""
    text = model.strip()
    if text.startswith(("/", "./", "../", "~", ".\\")) or "\\" in text or text in (".", ".."):
        name = Path(text.rstrip("/\\")).expanduser().name
        return name or "model"
    return text


def flag_name(field: str) -> str:
    """`max_body_bytes` → `--max-body-bytes`."""
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    """`max_body_bytes` → `VEQ_MAX_BODY_BYTES`."""
    return ENV_PREFIX + field.upper()


def describe_errors(exc: ValidationError) -> str:
    """One line for a CLI: `--bits / VEQ_BITS: must be one of 2, 3, 4, 8, 16, got 5; ...`."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        msg = err["msg"].removeprefix("Value error, ")
        if loc and loc[0] in ServeSettings.model_fields:
            parts.append(f"{flag_name(loc[0])} / {env_name(loc[0])}: {msg}")
        else:
            parts.append(msg)
    return "; ".join(parts)


# Flags whose argparse `type` is not the field's own type. Everything else is passed as text and
# converted and validated by the settings themselves (one validator, one error message).
_FLAG_TYPES: dict[str, Any] = {
    "bits": int,
    "threads": int,
    "port": int,
    "samples": int,
    "max_batch": int,
    "max_queue": int,
    "max_model_len": int,
    "max_tokens_limit": int,
    "kv_cache_memory": int,
    "max_step_tokens": int,
    "gpu_memory_utilization": float,
    "max_images_per_request": int,
    "max_image_pixels": int,
    "max_image_bytes": int,
    "max_body_bytes": int,
    "remote_timeout_s": float,
    "drain_timeout_s": float,
}
_FLAG_CHOICES: dict[str, tuple[Any, ...]] = {
    "bits": SERVE_BITS,
    "method": METHODS,
    "device": ("auto", "cpu", "cuda"),
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one `--flag` per `ServeSettings` field, help from its description, default SUPPRESS
    (an absent flag leaves the attribute unset, so `from_cli` lets env or the default decide).
    Booleans become `--flag` / `--no-flag`. Pair with `ServeSettings.from_cli(args)`."""
    for name, info in ServeSettings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = "none" if default is None else default
        if isinstance(default, list):
            shown = ",".join(default) or "empty"
        help_text = f"{info.description} [env {env_name(name)}; default {shown}]"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
        if name == "symmetric":
            codes = parser.add_mutually_exclusive_group()
            for flag, value in (("--symmetric", True), ("--asymmetric", False)):
                codes.add_argument(
                    flag,
                    dest=name,
                    action="store_const",
                    const=value,
                    default=argparse.SUPPRESS,
                    help=help_text if value else "a zero point per group (see --symmetric)",
                )
            continue
        if info.annotation is bool:
            parser.add_argument(
                flag_name(name),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        parser.add_argument(
            flag_name(name),
            dest=name,
            type=_FLAG_TYPES.get(name, str),
            choices=_FLAG_CHOICES.get(name),
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=help_text,
        )
