"""Checkpoints other servers load: the `quantization_config` compressed-tensors validates, the
per-expert tensors vLLM's WNA16 MoE loader allocates for, ignore lists that keep exactly the
vision tower, projector, router and lm_head unquantized under vLLM's and SGLang's matching,
tensors in the source dtype, the source's side files, and the portability table.

vLLM and SGLang are not installed here: their rules are restated below from their sources
(vLLM 0.33.0 `compressed_tensors/utils.py`, `config_utils.py`, `compressed_tensors_moe_wna16.py`;
SGLang 0.5.23 `compressed_tensors/utils.py`) so that a checkpoint breaking them fails here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from safetensors import safe_open

import veq
from veq.checkpoint import SOURCE_FILES
from veq.format.pack import packed_nbytes
from veq.models import get_architecture
from veq.portability import ROWS, TARGETS, Scheme, markdown_table, why_not
from veq.recipe import Recipe

LAYOUTS = ("qwen3_vl_moe", "kimi_vl", "kimi_k25")


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as reader:
            out |= {k: reader.get_tensor(k) for k in reader.keys()}
    return out


@pytest.fixture(scope="module")
def checkpoints(tiny_model, processor, tmp_path_factory):
    """`checkpoints(layout, bits, symmetric)` → an RTN checkpoint directory (built once)."""
    made: dict[tuple[str, int, bool], Path] = {}

    def get(layout: str, bits: int, symmetric: bool) -> Path:
        key = (layout, bits, symmetric)
        if key not in made:
            out = tmp_path_factory.mktemp("ckpt") / f"{layout}-w{bits}-{symmetric}"
            veq.quantize(
                tiny_model(layout),
                processor=processor,
                method="rtn",
                bits=bits,
                group_size=32,
                symmetric=symmetric,
                out=out,
                device="cpu",
                progress=False,
            )
            made[key] = out
        return made[key]

    return get


# -- quantization_config ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (3, False)])
def test_quantization_config_validates_in_compressed_tensors(checkpoints, layout, bits, symmetric):
    qc = json.loads((checkpoints(layout, bits, symmetric) / "config.json").read_text())[
        "quantization_config"
    ]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.quant_method == "compressed-tensors" and parsed.format == "pack-quantized"
    (group,) = parsed.config_groups.values()
    assert group.targets == ["Linear"] and group.input_activations is None
    w = group.weights
    assert (w.num_bits, w.symmetric, w.group_size, w.strategy) == (bits, symmetric, 32, "group")
    assert w.actorder is None  # static groups: nothing for vLLM to reject or reorder
    assert Scheme.from_config(qc) == Scheme((bits,), symmetric, () if symmetric else (bits,))


# -- tensor keys and shapes --------------------------------------------------------------------


def _expert_shapes(n: int, k: int, bits: int, g: int) -> dict[str, tuple[int, ...]]:
    """A compressed-tensors WNA16 linear `[N, K]` as vLLM's MoE weight loader reads it."""
    return {
        "weight_packed": (n, math.ceil(k * bits / 32)),
        "weight_scale": (n, k // g),
        "weight_zero_point": (math.ceil(n * bits / 32), k // g),
        "weight_shape": (2,),
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (3, False)])
def test_expert_tensors_fill_what_vllm_and_sglang_allocate(
    checkpoints, tiny_model, layout, bits, symmetric
):
    directory = checkpoints(layout, bits, symmetric)
    tensors = _tensors(directory)
    model = tiny_model(layout)
    arch = get_architecture(model)
    hidden = model.config.get_text_config().hidden_size
    inter = model.config.get_text_config().moe_intermediate_size
    g = 32
    prefixes = sorted(
        {m.group(1) for k in tensors if (m := re.match(r"(.*\.mlp\.experts)\.\d+\.", k))}
    )
    assert prefixes, "no per-expert tensors written"
    for prefix in prefixes:
        experts = sorted(
            {
                int(m.group(1))
                for k in tensors
                if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))
            }
        )
        e = len(experts)
        assert experts == list(range(e))
        for proj, (n, k) in {
            "gate_proj": (inter, hidden),
            "up_proj": (inter, hidden),
            "down_proj": (hidden, inter),
        }.items():
            want = _expert_shapes(n, k, bits, g)
            for i in experts:
                for suffix, shape in want.items():
                    key = f"{prefix}.{i}.{proj}.{suffix}"
                    if suffix == "weight_zero_point" and symmetric:
                        assert key not in tensors, key
                        continue
                    assert tuple(tensors[key].shape) == shape, key
                assert tensors[f"{prefix}.{i}.{proj}.weight_shape"].tolist() == [n, k]
                assert tensors[f"{prefix}.{i}.{proj}.weight_packed"].dtype == torch.int32
        if bits not in (4, 8):
            continue
        # vLLM 0.33's buffers (N-first): every expert's tensors copy into their slice.
        pf = 32 // bits
        w13 = torch.empty(e, 2 * inter, hidden // pf, dtype=torch.int32)
        w2 = torch.empty(e, hidden, inter // pf, dtype=torch.int32)
        s13 = torch.empty(e, 2 * inter, hidden // g, dtype=torch.bfloat16)
        z13 = torch.empty(e, 2 * inter // pf, hidden // g, dtype=torch.int32)
        z2 = torch.empty(e, hidden // pf, inter // g, dtype=torch.int32)
        for i in experts:
            w13[i, :inter].copy_(tensors[f"{prefix}.{i}.gate_proj.weight_packed"])
            w13[i, inter:].copy_(tensors[f"{prefix}.{i}.up_proj.weight_packed"])
            w2[i].copy_(tensors[f"{prefix}.{i}.down_proj.weight_packed"])
            s13[i, :inter].copy_(tensors[f"{prefix}.{i}.gate_proj.weight_scale"])
            if not symmetric:
                z13[i, : inter // pf].copy_(tensors[f"{prefix}.{i}.gate_proj.weight_zero_point"])
                z2[i].copy_(tensors[f"{prefix}.{i}.down_proj.weight_zero_point"])
        if symmetric:
            # SGLang 0.5.23's buffers (K-first): it transposes packed weights and scales at load.
            sg13 = torch.empty(e, hidden // pf, 2 * inter, dtype=torch.int32)
            sgs2 = torch.empty(e, inter // g, hidden, dtype=torch.bfloat16)
            for i in experts:
                sg13[i, :, :inter].copy_(tensors[f"{prefix}.{i}.gate_proj.weight_packed"].t())
                sg13[i, :, inter:].copy_(tensors[f"{prefix}.{i}.up_proj.weight_packed"].t())
                sgs2[i].copy_(tensors[f"{prefix}.{i}.down_proj.weight_scale"].t())
    assert arch.moe.experts == "experts"


# -- ignore lists under vLLM's and SGLang's matching ---------------------------------------------


def _regex_or_equal(name: str, entry: str) -> bool:
    return re.match(entry[3:], name) is not None if entry.startswith("re:") else name == entry


def vllm_ignores(name: str, ignore: list[str], shards: tuple[str, ...] = ()) -> bool:
    """vLLM's `should_ignore_layer`: `re:` entries by `re.match`, others by equality after the
    model's HF→vLLM renames (which never touch `re:` entries); a fused layer (`qkv_proj`) is
    ignored only when every shard is, and a partial match is an error."""
    if any(_regex_or_equal(name, p) for p in ignore):
        return True
    if not shards:
        return False
    proj = name.rsplit(".", 1)[-1]
    hits = [any(_regex_or_equal(name.replace(proj, s), p) for p in ignore) for s in shards]
    if any(hits) and not all(hits):
        raise ValueError(f"shards of {name} would get different schemes")
    return all(hits)


def sglang_ignores(name: str, ignore: list[str]) -> bool:
    """SGLang's `check_equal_or_regex_match`: `re:` by `re.match`, others exact or dotted suffix."""
    return any(
        re.match(p[3:], name) is not None
        if p.startswith("re:")
        else name == p or name.endswith("." + p)
        for p in ignore
    )


# (module name as the server names it, fused shards, must stay unquantized), from their loaders.
VLLM_NAMES = {
    "qwen3_vl_moe": [
        ("visual.blocks.0.attn.qkv", (), True),
        ("visual.blocks.0.attn.proj", (), True),
        ("visual.blocks.0.mlp.linear_fc1", (), True),
        ("visual.merger.linear_fc2", (), True),
        ("visual.deepstack_merger_list.0.linear_fc1", (), True),
        ("language_model.model.layers.0.mlp.gate", (), True),
        ("language_model.lm_head", (), True),
        ("language_model.model.layers.0.self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj"), False),
        ("language_model.model.layers.0.self_attn.o_proj", (), False),
        ("language_model.model.layers.0.mlp.experts.0.gate_proj", (), False),
        ("language_model.model.layers.0.mlp.experts.0.down_proj", (), False),
    ],
    "kimi_vl": [
        ("vision_tower.encoder.blocks.0.wqkv", (), True),
        ("vision_tower.encoder.blocks.0.mlp.fc0", (), True),
        ("multi_modal_projector.linear_1", (), True),
        ("language_model.model.layers.1.mlp.gate", (), True),
        ("language_model.lm_head", (), True),
        ("language_model.model.layers.0.mlp.gate_up_proj", ("gate_proj", "up_proj"), False),
        ("language_model.model.layers.0.mlp.down_proj", (), False),
        ("language_model.model.layers.0.self_attn.q_proj", (), False),
        ("language_model.model.layers.0.self_attn.kv_a_proj_with_mqa", (), False),
        ("language_model.model.layers.0.self_attn.kv_b_proj", (), False),
        ("language_model.model.layers.1.mlp.experts.0.gate_proj", (), False),
        (
            "language_model.model.layers.1.mlp.shared_experts.gate_up_proj",
            ("gate_proj", "up_proj"),
            False,
        ),
    ],
    "kimi_k25": [
        ("vision_tower.encoder.blocks.0.wqkv", (), True),
        ("mm_projector.linear_1", (), True),
        ("language_model.model.layers.1.mlp.gate", (), True),
        ("language_model.lm_head", (), True),
        (
            "language_model.model.layers.0.self_attn.fused_qkv_a_proj",
            ("q_a_proj", "kv_a_proj_with_mqa"),
            False,
        ),
        ("language_model.model.layers.0.self_attn.q_b_proj", (), False),
        ("language_model.model.layers.1.mlp.experts.0.up_proj", (), False),
        (
            "language_model.model.layers.1.mlp.shared_experts.gate_up_proj",
            ("gate_proj", "up_proj"),
            False,
        ),
    ],
}
SGLANG_NAMES = {
    "qwen3_vl_moe": [
        ("model.visual.blocks.0.attn.qkv_proj", True),
        ("model.visual.merger.linear_fc1", True),
        ("model.language_model.layers.0.mlp.gate", True),
        ("lm_head", True),
        ("model.language_model.layers.0.self_attn.qkv_proj", False),
        ("model.language_model.layers.0.mlp.experts.0.gate_proj", False),
    ],
    "kimi_vl": [
        ("language_model.model.layers.1.mlp.gate", True),
        ("language_model.lm_head", True),
        ("language_model.model.layers.0.self_attn.kv_b_proj", False),
        ("language_model.model.layers.1.mlp.experts.0.down_proj", False),
    ],
    "kimi_k25": [
        ("model.layers.1.mlp.gate", True),
        ("lm_head", True),
        ("model.layers.0.self_attn.fused_qkv_a_proj_with_mqa", False),
        ("model.layers.1.mlp.experts.0.gate_proj", False),
        ("model.layers.1.mlp.shared_experts.down_proj", False),
    ],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ignore_keeps_exactly_vision_projector_router_and_head(checkpoints, layout):
    qc = json.loads((checkpoints(layout, 4, True) / "config.json").read_text())[
        "quantization_config"
    ]
    ignore = qc["ignore"]
    for name, shards, unquantized in VLLM_NAMES[layout]:
        assert vllm_ignores(name, ignore, shards) == unquantized, f"vLLM: {name}"
    for name, unquantized in SGLANG_NAMES[layout]:
        assert sglang_ignores(name, ignore) == unquantized, f"SGLang: {name}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ignore_matches_the_hf_modules_veq_left_unquantized(checkpoints, tiny_model, layout):
    directory = checkpoints(layout, 4, True)
    ignore = json.loads((directory / "config.json").read_text())["quantization_config"]["ignore"]
    quantized = {k.removesuffix(".weight_packed") for k in _tensors(directory) if "packed" in k}
    model = tiny_model(layout)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert vllm_ignores(name, ignore) == (name not in quantized), name
    for name in quantized:
        assert not vllm_ignores(name, ignore) and not sglang_ignores(name, ignore), name


# -- dtypes, sizes and side files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_source(tiny_model, processor, tmp_path_factory) -> Path:
    """A bf16 model directory with its processor and a generation config of its own."""
    path = tmp_path_factory.mktemp("src") / "tiny-bf16"
    model = tiny_model("qwen3_vl_moe").to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path)
    processor.save_pretrained(path)
    generation = {"eos_token_id": [5, 7], "temperature": 0.7, "top_p": 0.8, "do_sample": True}
    (path / "generation_config.json").write_text(json.dumps(generation))
    return path


@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (8, None)])
def test_cpu_checkpoint_keeps_source_dtype_and_size(bf16_source, tmp_path, bits, symmetric):
    out = tmp_path / "q"
    veq.quantize(
        bf16_source,
        method="rtn",
        bits=bits,
        group_size=32,
        symmetric=symmetric,
        out=out,
        device="cpu",
        progress=False,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["symmetric"] is (symmetric is None)  # 8-bit defaults to symmetric
    source, written = _tensors(bf16_source), _tensors(out)
    packed = {k.removesuffix(".weight_packed") for k in written if k.endswith(".weight_packed")}
    for key, t in written.items():
        if t.is_floating_point():
            assert t.dtype == torch.bfloat16, key  # scales included
    # No larger than the bf16 source's unquantized tensors plus the packed-size formula.
    cfg = Recipe(
        bits=bits, group_size=32, symmetric=symmetric, scale_dtype="bfloat16"
    ).quant_config()
    unquantized = sum(
        t.numel() * t.element_size()
        for k, t in source.items()
        if k.removesuffix(".weight") not in packed and ".experts." not in k
    )
    budget = unquantized + sum(
        packed_nbytes(*written[f"{name}.weight_shape"].tolist(), cfg) for name in packed
    )
    stored = sum(t.numel() * t.element_size() for t in written.values())
    assert stored <= budget, (stored, budget)
    header = sum(
        int.from_bytes(f.read_bytes()[:8], "little") + 8 for f in out.glob("*.safetensors")
    )
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) == stored + header


def test_source_side_files_are_copied(bf16_source, tmp_path):
    out = tmp_path / "q"
    veq.quantize(
        bf16_source, method="rtn", bits=4, group_size=32, out=out, device="cpu", progress=False
    )
    side = [p.name for p in bf16_source.iterdir() if any(p.match(s) for s in SOURCE_FILES)]
    assert "generation_config.json" in side and "tokenizer.json" in side
    for name in side:
        assert (out / name).read_bytes() == (bf16_source / name).read_bytes(), name
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by a container


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # a wheel that does not match torch fails at import with other errors
        return False
    return True


@pytest.mark.skipif(_has_torchvision(), reason="checks the host without torchvision")
def test_stock_auto_processor_says_torchvision_is_missing(bf16_source):
    from transformers import AutoProcessor

    with pytest.raises(ImportError, match="Torchvision"):
        AutoProcessor.from_pretrained(str(bf16_source))
    assert type(veq.api.load_processor(bf16_source)).__name__ == "ImageOnlyQwen3VLProcessor"


@pytest.mark.skipif(not _has_torchvision(), reason="needs torchvision (GPU hosts have it)")
def test_stock_auto_processor_opens_the_directory(bf16_source):
    from transformers import AutoProcessor, Qwen3VLProcessor

    stock = AutoProcessor.from_pretrained(str(bf16_source))
    assert isinstance(stock, Qwen3VLProcessor) and stock.image_processor is not None


# -- the portability table -----------------------------------------------------------------------


def test_table_says_what_each_target_refuses():
    assert why_not("vllm", Scheme((4,), False, (4,))) is None
    assert "#44025" in why_not("vllm-old", Scheme((4,), False, (4,)))
    assert "int8" in why_not("vllm", Scheme((8,), False, (8,)))
    assert (
        why_not("vllm", Scheme((8,), True)) is None
        and why_not("sglang", Scheme((8,), True)) is None
    )
    assert "zero points" in why_not("sglang", Scheme((4,), False, (4,)))
    for target in ("vllm", "vllm-old", "sglang"):
        assert "3-bit" in why_not(target, Scheme((3,), True))
        assert "mixed" in why_not(target, Scheme((4, 2), True))
    assert all(why_not("veq", s) is None for s in ROWS)
    assert all("veq.load" in why_not("transformers", s) for s in ROWS)
    with pytest.raises(ValueError, match="unknown target"):
        why_not("tgi", Scheme((4,), True))


def test_readme_table_is_the_library_table():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert markdown_table() in readme
    assert list(TARGETS) == ["veq", "vllm", "vllm-old", "sglang", "transformers"]
