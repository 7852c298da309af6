"""`transformers serve` for a veq model directory: the peer `bench/peer.py` measures against.

    python bench/hf_serve.py MODEL_DIR [--threads N] [--text-only DIR] [serve options ...]

Stock `transformers serve` loads a processor with `AutoProcessor`, which resolves
`processor_config.json`'s `Qwen3VLProcessor` and then its video processor, and that needs
torchvision (whose wheels do not load against this torch; docs/design.md §7). The bundled
models serve images only, so this launcher registers the processor class they are saved from
(`veq.models.processor.ImageOnlyQwen3VLProcessor`, the same image processor and tokenizer
without the video half) as the serve command's processor loader, the one line any user of
these checkpoints would have to write, and then runs the stock command unchanged with
`MODEL_DIR` as its forced model.

`transformers serve --continuous-batching` batches only models it classes as text-only
(`Modality.LLM`); a vision-language model such as Qwen3-VL-MoE falls back to one request at a
time, text requests included. With `--text-only DIR` the launcher writes the model's language
half into DIR as the plain causal LM it is (`Qwen3MoeForCausalLM`: the same decoder layers,
weights renamed, and for text-only tokens Qwen3-VL's multimodal RoPE is ordinary RoPE), checks
that it gives the same logits as the whole model on a text prompt, and serves that, so that the
peer's continuous batching really runs on the text workloads.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_text_model(model_dir: str, out: Path) -> Path:
    """The language half of the Qwen3-VL-MoE in `model_dir` as a `Qwen3MoeForCausalLM` in
    `out` (with the tokenizer and chat template), after checking that both give the same
    logits on a random text prompt."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from veq.api import load_model, load_processor

    vlm = load_model(model_dir, torch.device("cpu"))
    if vlm.config.model_type != "qwen3_vl_moe":
        raise SystemExit(f"--text-only knows Qwen3-VL-MoE, not {vlm.config.model_type}")
    t = vlm.config.text_config
    same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    same += ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act")
    same += ("max_position_embeddings", "rms_norm_eps", "attention_bias", "num_experts_per_tok")
    same += ("moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers")
    same += ("eos_token_id", "pad_token_id", "bos_token_id")
    config = Qwen3MoeConfig(
        **{k: getattr(t, k) for k in same},
        num_experts=t.num_local_experts,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_parameters["rope_theta"]},
        norm_topk_prob=True,  # Qwen3-VL-MoE always renormalises its top-k router weights
        tie_word_embeddings=False,
    )
    llm = Qwen3MoeForCausalLM(config).to(vlm.dtype).eval()
    prefix = "model.language_model."
    state = {
        ("model." + k[len(prefix) :] if k.startswith(prefix) else k): v
        for k, v in vlm.state_dict().items()
        if k.startswith(prefix) or k == "lm_head.weight"
    }
    llm.load_state_dict(state, strict=True)
    ids = torch.randint(10, t.vocab_size - 10, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = vlm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = llm(input_ids=ids).logits
    if not torch.equal(want, got):
        raise SystemExit(f"the text-only model differs: {float((want - got).abs().max())}")
    llm.generation_config = vlm.generation_config
    llm.save_pretrained(out)
    tokenizer = load_processor(model_dir).tokenizer
    tokenizer.chat_template = load_processor(model_dir).chat_template
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python bench/hf_serve.py MODEL_DIR [--threads N] [serve options ...]")
    model, rest = argv[0], argv[1:]
    if "--threads" in rest:
        i = rest.index("--threads")
        import torch

        torch.set_num_threads(int(rest[i + 1]))
        del rest[i : i + 2]
    if "--text-only" in rest:
        i = rest.index("--text-only")
        model = str(write_text_model(model, Path(rest[i + 1])))
        del rest[i : i + 2]
    else:
        from transformers.cli.serving import model_manager

        from veq.models.processor import load_processor

        def load(self: object, model_id_and_revision: str, gguf_file: str | None = None) -> object:
            return load_processor(model_id_and_revision.split("@")[0])

        model_manager.ModelManager._load_processor = load  # type: ignore[method-assign]
    from transformers.cli.transformers import main as transformers_main

    sys.argv = ["transformers", "serve", *rest, model]
    transformers_main()


if __name__ == "__main__":
    main(sys.argv[1:])
