"""`ServeSettings`: defaults, env (`VEQ_*`), validation, and flags over env via `from_cli`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from server.settings import (
    ServeSettings,
    SettingsError,
    add_serve_arguments,
    default_model_name,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("VEQ_"):
            monkeypatch.delenv(name)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults() -> None:
    s = ServeSettings()
    # calib None: the model's own source (`veq.api.default_calib`: shapes for mini).
    assert (s.model, s.method, s.bits, s.group_size, s.calib) == ("mini", "veq", 4, 128, None)
    assert (s.host, s.port, s.device, s.gamma, s.samples) == ("127.0.0.1", 8000, "auto", "auto", 32)
    assert s.api_key is None and s.admin_key is None
    assert s.served_model_name == "mini" and s.model_id == "mini"
    assert s.allow_remote_images is False and s.allowed_media_domains == []
    assert s.max_body_bytes == 20 * 1024 * 1024 and s.max_image_pixels == 4096 * 4096
    assert s.quantized


def test_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEQ_BITS", "3")
    monkeypatch.setenv("VEQ_API_KEY", "sekret")
    monkeypatch.setenv("VEQ_GROUP_SIZE", "channel")
    monkeypatch.setenv("VEQ_GAMMA", "12.5")
    monkeypatch.setenv("VEQ_ALLOW_REMOTE_IMAGES", "true")
    monkeypatch.setenv("VEQ_ALLOWED_MEDIA_DOMAINS", "Images.Example.com, cdn.example.org.,")
    monkeypatch.setenv("VEQ_CACHE_DIR", "/tmp/veq-cache")
    s = ServeSettings()
    assert s.bits == 3 and s.group_size is None and s.gamma == 12.5
    assert isinstance(s.api_key, SecretStr) and s.api_key.get_secret_value() == "sekret"
    assert "sekret" not in repr(s) and "sekret" not in s.model_dump_json()
    assert s.allow_remote_images is True
    assert s.allowed_media_domains == ["images.example.com", "cdn.example.org"]
    assert s.cache_dir == Path("/tmp/veq-cache")


def test_domains_as_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEQ_ALLOWED_MEDIA_DOMAINS", '["a.example", "*.b.example"]')
    assert ServeSettings().allowed_media_domains == ["a.example", "b.example"]


def test_empty_key_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEQ_API_KEY", "")
    assert ServeSettings().api_key is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("bits", 5),
        ("bits", 1),
        ("group_size", 48),
        ("method", "magic"),
        ("gamma", -1.0),
        ("gamma", "fast"),
        ("device", "tpu"),
        ("port", 70000),
        ("max_batch", 0),
        ("remote_timeout_s", 0),
        ("allowed_media_domains", ["https://example.com/x"]),
        ("allowed_media_domains", ["exa mple.com"]),
        ("samples", 0),
    ],
)
def test_bad_values_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        ServeSettings(**{field: value})


def test_unknown_field_refused() -> None:
    with pytest.raises(ValidationError):
        ServeSettings(bitz=3)


def test_bits_16_is_unquantized() -> None:
    assert not ServeSettings(bits=16).quantized


@pytest.mark.parametrize(
    "model, name",
    [
        ("mini", "mini"),
        ("Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen/Qwen3-VL-30B-A3B-Instruct"),
        ("/srv/models/my-moe/", "my-moe"),
        ("./ckpt", "ckpt"),
        ("~/models/x", "x"),
    ],
)
def test_served_name_never_leaks_a_path(model: str, name: str) -> None:
    assert default_model_name(model) == name
    assert ServeSettings(model=model).served_model_name == name


def test_served_name_explicit() -> None:
    assert ServeSettings(model="/a/b", served_model_name="prod").model_id == "prod"


def test_flags_win_env_fills_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEQ_BITS", "3")
    monkeypatch.setenv("VEQ_PORT", "9000")
    monkeypatch.setenv("VEQ_ALLOW_REMOTE_IMAGES", "1")
    s = ServeSettings.from_cli(
        _parse("--bits", "2", "--group-size", "channel", "--host", "0.0.0.0")
    )
    assert s.bits == 2  # flag over env
    assert s.port == 9000  # env, no flag
    assert s.allow_remote_images is True  # env, and the absent flag did not reset it
    assert s.group_size is None and s.host == "0.0.0.0"
    assert s.max_queue == 64  # default


def test_boolean_flag_overrides_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEQ_ALLOW_REMOTE_IMAGES", "1")
    assert ServeSettings.from_cli(_parse("--no-allow-remote-images")).allow_remote_images is False


def test_symmetry_flags_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServeSettings.from_cli(_parse()).symmetric is None  # each width's default
    monkeypatch.setenv("VEQ_SYMMETRIC", "false")
    assert ServeSettings.from_cli(_parse()).symmetric is False
    assert ServeSettings.from_cli(_parse("--symmetric")).symmetric is True
    monkeypatch.setenv("VEQ_SYMMETRIC", "true")
    assert ServeSettings.from_cli(_parse("--asymmetric")).symmetric is False
    with pytest.raises(SystemExit):  # one or the other
        _parse("--symmetric", "--asymmetric")


def test_from_cli_dict_ignores_none_and_foreign_keys() -> None:
    s = ServeSettings.from_cli({"bits": None, "command": "serve", "run": print, "port": 1234})
    assert s.bits == 4 and s.port == 1234


def test_from_cli_error_is_one_line_naming_flag_and_env() -> None:
    with pytest.raises(SettingsError) as exc:
        ServeSettings.from_cli({"bits": 5, "group_size": "7"})
    text = str(exc.value)
    assert "\n" not in text
    assert "--bits / VEQ_BITS" in text and "--group-size / VEQ_GROUP_SIZE" in text


def test_every_field_has_a_flag_and_a_description() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    flags = {a.dest for a in parser._actions}
    for name, info in ServeSettings.model_fields.items():
        assert name in flags
        assert info.description and "\n" not in info.description
