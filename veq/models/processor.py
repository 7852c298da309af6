"""Offline tokenizer + image processor + chat template for Qwen3-VL-style models.

Owns building a complete Hugging Face processor with no network: a byte-level tokenizer made
with the `tokenizers` library (256 byte tokens plus optional whole words, then the special
tokens), Qwen2-VL's PIL image processor (patch 16, merge 2: a 128×128 image is 16 tokens), and a
Qwen-style chat template. Tiny test models and the bundled reference model use it; real
checkpoints bring their own processor. It does not decide model sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor without its video processor (which needs torchvision).

    It saves itself as a stock `Qwen3VLProcessor` (with a video processor section built from
    the image settings), so stock `AutoProcessor` opens the directory where torchvision is
    installed and says torchvision is missing where it is not, instead of falling back to a
    bare tokenizer. veq reloads it through this class (`veq.api.load_processor`).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = Qwen3VLProcessor.__name__
        image = self.image_processor
        out["video_processor"] = {
            "video_processor_type": "Qwen3VLVideoProcessor",
            "patch_size": image.patch_size,
            "temporal_patch_size": image.temporal_patch_size,
            "merge_size": image.merge_size,
            "image_mean": list(image.image_mean),
            "image_std": list(image.image_std),
            "size": dict(out["image_processor"]["size"]),
            "do_sample_frames": True,
            "fps": 2,
        }
        return out


def build_tokenizer(words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0..255 bytes (sorted, so ids are stable across processes), then
    `words` as whole tokens (a leading space marks a word start), then the special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    byte_encode = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for word in words:
        encoded = "".join(piece for piece, _ in byte_encode.pre_tokenize_str(word))
        vocab.setdefault(encoded, len(vocab))
    merges: list[tuple[str, str]] = []
    for token in list(vocab)[len(alphabet) :]:
        # Build each whole word from its left part and last character, registering the parts.
        for i in range(2, len(token) + 1):
            left, right = token[: i - 1], token[i - 1]
            vocab.setdefault(token[:i], len(vocab))
            if (left, right) not in merges:
                merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(
    words: Sequence[str] = (), min_pixels: int = 64 * 64, max_pixels: int = 256 * 256
) -> ImageOnlyQwen3VLProcessor:
    """A complete offline processor (tokenizer, image processor, chat template)."""
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return ImageOnlyQwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(words),
        chat_template=CHAT_TEMPLATE,
    )


def load_processor(path: str | Path) -> ImageOnlyQwen3VLProcessor:
    return ImageOnlyQwen3VLProcessor.from_pretrained(str(path))
