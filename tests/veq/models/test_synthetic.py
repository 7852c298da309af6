"""Synthetic models (`synthetic:NAME[?...]`): presets, spec parsing, weights, and the way through
`veq.api` (resolve, fingerprint, quantize with RTN, load) and the server."""

from __future__ import annotations

import base64
import io
import json
import re
import time

import pytest
import torch

import veq
from veq import api
from veq.models import synthetic
from veq.models.processor import build_processor

TINY = "synthetic:tiny"
BIG = "synthetic:qwen3-vl-30b-a3b"


@pytest.fixture(scope="module")
def tokenizer():
    return build_processor().tokenizer


@pytest.fixture(scope="module")
def tiny():
    return synthetic.build_model(TINY)


@pytest.fixture(scope="module")
def big_meta():
    return synthetic.meta_model(BIG)


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k in ("text_config", "vision_config", "rope_parameters"):
            out |= _keys(v, f"{prefix}{k}.")
    return out


def _tree(model: torch.nn.Module) -> set[str]:
    return {re.sub(r"\.\d+(?=\.|$)", ".*", name) for name, _ in model.named_modules()}


# -- presets ---------------------------------------------------------------------------------


def test_30b_preset_has_the_qwen3_vl_30b_a3b_numbers():
    """Against the Hub's config.json of Qwen/Qwen3-VL-30B-A3B-Instruct (see PRESETS)."""
    config = synthetic.build_config(BIG, build_processor())
    t, v = config.text_config, config.vision_config
    assert (t.num_hidden_layers, t.hidden_size, t.intermediate_size) == (48, 2048, 6144)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (32, 4, 128)
    assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size) == (128, 8, 768)
    assert t.vocab_size == 151936 and t.mlp_only_layers == []
    assert t.rope_parameters["rope_theta"] == 5_000_000.0
    assert t.rope_parameters["mrope_section"] == [24, 20, 20]
    assert sum(t.rope_parameters["mrope_section"]) == t.head_dim // 2
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads) == (27, 1152, 4304, 16)
    assert list(v.deepstack_visual_indexes) == [8, 16, 24]
    assert (v.out_hidden_size, v.num_position_embeddings, v.patch_size) == (2048, 2304, 16)
    assert not config.tie_word_embeddings and config.model_type == "qwen3_vl_moe"


def test_30b_parameter_count_without_allocating(big_meta):
    assert all(p.is_meta for p in big_meta.parameters())
    counts = synthetic.parameter_counts(big_meta)
    # The Hub lists 31.1 B; "30B-A3B" rounds down. Active: attention, router, top-8 of 128
    # experts per layer, embeddings and lm_head (vision tower excluded).
    assert counts["total"] == pytest.approx(31.07e9, rel=0.005)
    assert counts["active"] == pytest.approx(3.35e9, rel=0.01)
    assert counts["experts"] == 48 * 128 * 3 * 768 * 2048
    assert 2 * counts["total"] / 2**30 == pytest.approx(57.9, abs=0.1)  # bf16 GiB


def test_tiny_has_the_same_module_tree_and_config_keys(tiny, big_meta):
    assert _tree(tiny) == _tree(big_meta)
    assert type(tiny) is type(big_meta)
    assert _keys(tiny.config.to_dict()) == _keys(big_meta.config.to_dict())
    assert synthetic.parameter_counts(tiny)["total"] < 10**6


# -- specs -----------------------------------------------------------------------------------


def test_spec_parsing_and_canonical_names():
    s = synthetic.parse_spec(f"{BIG}?layers=8")
    assert s.preset.layers == 8 and s.preset.experts == 128 and s.seed == 0
    assert s.canonical == f"{BIG}?layers=8"
    same = synthetic.parse_spec(f"{BIG}?seed=0&layers=8")
    assert same.fingerprint() == s.fingerprint()
    assert synthetic.parse_spec(f"{BIG}?layers=8&seed=1").fingerprint() != s.fingerprint()
    assert synthetic.parse_spec(f"{BIG}?layers=48").canonical == BIG
    assert synthetic.parse_spec(f"{TINY}?experts=4&top_k=4").preset.top_k == 4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("synthetic:nope", "unknown synthetic model 'nope'.*qwen3-vl-30b-a3b, tiny"),
        (f"{TINY}?depth=3", "unknown synthetic override 'depth'; allowed: layers"),
        (f"{TINY}?layers=two", "layers='two' is not an integer"),
        (f"{TINY}?layers=0", "layers=0 must be >= 1"),
        (f"{TINY}?experts=2&top_k=3", "top_k=3 exceeds experts=2"),
    ],
)
def test_bad_specs_say_what_to_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        synthetic.parse_spec(spec)


# -- weights ---------------------------------------------------------------------------------


def test_hash_stream_is_chunk_independent_and_uniform():
    key, dev = 0x0123456789ABCDEF, torch.device("cpu")
    whole = synthetic.hash_uniform(0, 1000, key, dev)
    assert torch.equal(whole[300:], synthetic.hash_uniform(300, 700, key, dev))
    assert not torch.equal(whole, synthetic.hash_uniform(0, 1000, key + 1, dev))
    big = synthetic.hash_uniform(0, 1 << 16, key, dev)
    assert -1 < float(big.min()) and float(big.max()) < 1
    assert float(big.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(big.std()) == pytest.approx(1 / 3**0.5, rel=0.01)
    with pytest.raises(ValueError, match="2\\^32"):
        synthetic.hash_uniform((1 << 32) - 4, 8, key, dev)


def test_weights_are_a_pure_function_of_the_spec(tiny):
    again = synthetic.build_model(TINY)
    for (name, a), b in zip(tiny.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # fp32 on CPU, but every value is a bf16 value: what a bf16 checkpoint loads as.
    w = tiny.model.language_model.layers[0].mlp.experts.gate_up_proj
    assert w.dtype == torch.float32 and torch.equal(w, w.to(torch.bfloat16).float())
    assert float(w.detach().std()) == pytest.approx(0.02, rel=0.05)
    # Weights are keyed by parameter name: fewer layers are the first layers of the full model.
    one = synthetic.build_model(f"{TINY}?layers=1")
    assert torch.equal(
        one.model.language_model.layers[0].self_attn.q_proj.weight,
        tiny.model.language_model.layers[0].self_attn.q_proj.weight,
    )
    other = synthetic.build_model(f"{TINY}?seed=3")
    assert not torch.equal(other.lm_head.weight, tiny.lm_head.weight)
    norms = [p for n, p in tiny.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(bool((p == 1).all()) for p in norms)


def test_lm_head_only_reaches_decodable_tokens(tiny, tokenizer):
    ok = synthetic.decodable_token_ids(tokenizer)
    assert 90 <= len(ok) < len(tokenizer) and tokenizer.eos_token_id not in ok
    rows = tiny.lm_head.weight.abs().sum(1) > 0
    assert rows.nonzero().squeeze(1).tolist() == ok
    assert tiny.lm_head.weight.shape[0] == 512 > len(tokenizer)
    ids = torch.tensor([tokenizer.encode("what colour is the circle")])
    with torch.no_grad():
        out = tiny.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    assert len(new) == 12 and set(new) <= set(ok)
    assert tokenizer.decode(new).isprintable()


# -- through veq.api --------------------------------------------------------------------------


def test_resolve_materialises_a_directory_once(tmp_path):
    path = synthetic.materialize(f"{TINY}?seed=1", root=tmp_path)
    assert {"config.json", synthetic.MARKER, "processor_config.json"} <= {
        p.name for p in path.iterdir()
    }
    assert not list(path.glob("*.safetensors"))
    stamp = (path / synthetic.MARKER).stat().st_mtime_ns
    assert synthetic.materialize(f"{TINY}?seed=1&layers=2", root=tmp_path) == path
    assert (path / synthetic.MARKER).stat().st_mtime_ns == stamp
    marker = json.loads((path / synthetic.MARKER).read_text())
    assert marker["spec"] == f"{TINY}?seed=1" and marker["generator"] == synthetic.GENERATOR
    resolved = api.resolve_model(f"{TINY}?seed=1")
    assert synthetic.read_spec(resolved).canonical == f"{TINY}?seed=1"
    processor = api.load_processor(resolved)
    assert type(processor).__name__ == "ImageOnlyQwen3VLProcessor"
    model = api.load_model(resolved, torch.device("cpu"))
    assert model.config.text_config.vocab_size == 512


def test_fingerprint_is_the_spec_and_builds_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fingerprinting must not build the model")

    monkeypatch.setattr(synthetic, "build_model", refuse)
    path = api.resolve_model(f"{BIG}?layers=2")  # 2.4 B parameters if it were built
    fp = api.model_fingerprint(path)
    assert fp == api.model_fingerprint(f"{BIG}?layers=2") == synthetic.fingerprint(path)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert fp != api.model_fingerprint(f"{BIG}?layers=3")


def test_quantize_rtn_builds_only_on_a_miss_and_loads(tmp_path, monkeypatch):
    kw = dict(
        method="rtn",
        bits=4,
        group_size=32,
        samples=2,
        gamma=10.0,
        cache_dir=tmp_path,
        device="cpu",
        progress=False,
    )
    first = veq.quantize(TINY, **kw)
    assert not first.cached and first.path.name.startswith("tiny-")
    assert first.report["method"] == "rtn" and first.report["layers"] == 2

    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit must not build the model")

    monkeypatch.setattr(synthetic, "build_model", refuse)
    again = veq.quantize(TINY, **kw)
    assert again.cached and again.path == first.path
    model, processor = veq.load(first.path, device="cpu")
    experts = model.model.language_model.layers[1].mlp.experts
    assert type(experts).__name__ == "QuantMoEExperts"
    ids = torch.tensor([processor.tokenizer.encode("how many shapes")])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def _png(size: int = 64) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("bits", [16, 4])
def test_served_end_to_end(bits, tmp_path):
    """`veq serve --model synthetic:tiny` (the app, in process): every answer runs to max_tokens
    in printable text, as the GPU suite's load test relies on."""
    from fastapi.testclient import TestClient

    from server.app import build_app
    from server.settings import ServeSettings

    settings = ServeSettings(
        model=TINY,
        method="rtn",
        bits=bits,
        group_size=32,
        samples=2,
        gamma=10.0,
        cache_dir=tmp_path,
        device="cpu",
        max_model_len=512,
        max_tokens_limit=64,
        drain_timeout_s=5.0,
    )
    with TestClient(build_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").text
            time.sleep(0.2)
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [TINY]
        content = [
            {"type": "image_url", "image_url": {"url": _png()}},
            {"type": "text", "text": "What colour is the square?"},
        ]
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": TINY,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 8,
            },
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 8
    assert body["choices"][0]["finish_reason"] == "length"
    text = body["choices"][0]["message"]["content"]
    assert text and text.isprintable()
    assert body["usage"]["prompt_tokens"] > 16  # the image's tokens are counted
