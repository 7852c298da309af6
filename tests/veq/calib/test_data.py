"""Calibration sources and token kinds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from veq.calib import sources
from veq.calib.data import CalibrationError, encode_conversation, fingerprint
from veq.calib.sources import builtin_conversations, conversations, load_jsonl
from veq.tokens import TokenKind


def _image_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_builtin_set_is_offline_deterministic_and_mixed():
    a = builtin_conversations(8, seed=3)
    b = builtin_conversations(8, seed=3)
    assert [c.messages for c in a] == [c.messages for c in b]
    with_images = [c for c in a if c.images]
    assert with_images and len(with_images) < len(a)  # photos and text-only turns
    assert all(img.mode == "RGB" and max(img.size) <= 224 for c in with_images for img in c.images)


def test_builtin_is_photographs_and_text_only_turns():
    """Nothing synthetic: every image conversation is a shipped photograph with its caption."""
    captions = {caption for caption, _ in sources._PHOTOS.values()}
    convs = builtin_conversations(40, seed=1)
    for conv in convs:
        if conv.images:
            assert conv.messages[1]["content"] in captions
        else:
            assert len(conv.messages) == 2 and isinstance(conv.messages[0]["content"], str)
    assert sum(not c.images for c in convs) == 10


def test_registry_names_the_sources_and_defaults_per_model():
    import veq.reference  # registers `shapes`
    from veq.api import default_calib

    assert {s.name for s in sources.registered()} >= {"builtin", "shapes"}
    shapes = conversations("shapes", 8, seed=2)
    assert shapes == veq.reference.shapes_conversations(8, seed=2)
    answers = {m["content"] for c in shapes if c.images for m in c.messages[1::2]}
    assert answers and answers <= set(veq.reference.shapes.answer_words())
    assert default_calib("mini") == default_calib(veq.reference.MINI_DIR) == "shapes"
    assert default_calib("Qwen/Qwen3-VL-30B-A3B-Instruct") == "builtin"


def test_token_kinds_mark_answers_and_image_tokens(processor):
    conv = builtin_conversations(1, seed=0)[0]
    sample = encode_conversation(processor, conv, _image_id(processor))
    ids = sample.inputs["input_ids"][0]
    kinds = sample.kinds
    assert kinds.shape == ids.shape
    assert int((kinds == TokenKind.VISION).sum()) == int((ids == _image_id(processor)).sum()) > 0
    answer_text = processor.tokenizer.decode(ids[kinds == TokenKind.ANSWER])
    for message in conv.messages:
        if message["role"] == "assistant":
            assert message["content"] in answer_text
    prompt_text = processor.tokenizer.decode(ids[kinds == TokenKind.PROMPT])
    assert "Describe the image." in prompt_text and "assistant" in prompt_text


def test_jsonl_messages_and_llava(tmp_path, processor):
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "a.png")
    rows = [
        {
            "image": "a.png",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "x"}},
                        {"type": "text", "text": "What is it?"},
                    ],
                },
                {"role": "assistant", "content": "A grey square."},
            ],
        },
        {
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe it."},
                {"from": "gpt", "value": "Grey."},
            ],
        },
    ]
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    convs = load_jsonl(path)
    assert len(convs) == 2 and all(len(c.images) == 1 for c in convs)
    samples = [encode_conversation(processor, c, _image_id(processor)) for c in convs]
    assert all((s.kinds == TokenKind.ANSWER).any() for s in samples)
    assert fingerprint(samples) == fingerprint(samples) != fingerprint(samples[:1])


def test_jsonl_images_without_placeholders_open_the_first_user_turn(tmp_path, processor):
    """The common row `{"image", "messages"}` with plain-string content (LLaVA loaders, TRL)."""
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "a.png")
    row = {
        "image": "a.png",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What color is the square?"},
            {"role": "assistant", "content": "grey"},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "yes"},
        ],
    }
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (conv,) = load_jsonl(path)
    assert conv.messages[1]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "What color is the square?"},
    ]
    assert conv.messages[0] == row["messages"][0] and conv.messages[3] == row["messages"][3]
    sample = encode_conversation(processor, conv, _image_id(processor))
    assert int((sample.kinds == TokenKind.VISION).sum()) > 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON"),
        (
            '{"images": ["a.png", "a.png"], "messages": [{"role": "user", "content": '
            '[{"type": "image"}, {"type": "text", "text": "x"}]}]}',
            r"2 image\(s\) but 1 image placeholder",
        ),
        ('{"image": "a.png", "messages": [{"role": "assistant", "content": "x"}]}', "0 image"),
        ('{"image": "missing.png", "messages": []}', "cannot read calibration image"),
        ('{"messages": [{"role": "user", "content": [{"type": "image"}]}]}', r"0 image\(s\) but 1"),
        ('{"foo": 1}', "needs 'messages' or 'conversations'"),
    ],
)
def test_jsonl_errors_are_clear(tmp_path, content, message):
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(tmp_path / "a.png")
    path = tmp_path / "bad.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(CalibrationError, match=message):
        load_jsonl(path)


def test_spec_errors(tmp_path):
    known = r"does not exist \(not a file, 'hf:NAME' or a known name: .*builtin"
    with pytest.raises(CalibrationError, match=known):
        conversations(str(tmp_path / "nope.jsonl"), 4)
    with pytest.raises(CalibrationError, match="at least one"):
        conversations("builtin", 0)
