"""The reference processor and the fast encoder agree with the processor + chat template."""

from __future__ import annotations

import pytest
import torch

from veq.calib.data import encode_conversation, load_jsonl
from veq.models.processor import ImageOnlyQwen3VLProcessor
from veq.reference import shapes
from veq.reference.encode import (
    IMAGE_TOKENS,
    Encoder,
    calibration_conversations,
    cell_targets,
    reference_processor,
    to_conversation,
    write_calibration_jsonl,
)
from veq.tokens import TokenKind


@pytest.fixture(scope="module")
def processor():
    return reference_processor()


def test_vocabulary_is_deterministic(processor):
    again = reference_processor()
    assert processor.tokenizer.get_vocab() == again.tokenizer.get_vocab()


def test_every_answer_and_role_is_one_token(processor):
    tok = processor.tokenizer
    for word in [*shapes.answer_words(), "user", "assistant"]:
        for form in (word, " " + word):
            assert len(tok(form, add_special_tokens=False)["input_ids"]) == 1, form


def test_tokenizer_round_trip(processor):
    tok = processor.tokenizer
    texts = [qa.question + " " + qa.answer for seed in range(50) for qa in shapes.sample(seed).qas]
    texts += ["Ünïcödé, 12 + 7 = 19!", "What is 3 plus 4?\n"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_processor_saves_and_reloads(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    again = ImageOnlyQwen3VLProcessor.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\nWhat color is the circle?<|im_end|>\n"
    assert again.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]


def test_encoder_matches_processor_and_chat_template(processor):
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    samples = [shapes.training_sample(seed) for seed in range(8)]
    assert any(s.image is None for s in samples) and any(s.image is not None for s in samples)
    batch = Encoder(processor)(samples)
    pixels = iter(batch.inputs["pixel_values"].split(64))
    for row, sample in enumerate(samples):
        conv = to_conversation(sample)
        ref = encode_conversation(processor, conv, image_token)
        n = ref.inputs["input_ids"].shape[1]
        assert torch.equal(batch.inputs["input_ids"][row, :n], ref.inputs["input_ids"][0])
        assert int(batch.inputs["attention_mask"][row].sum()) == n
        assert torch.equal(
            batch.inputs["mm_token_type_ids"][row, :n], ref.inputs["mm_token_type_ids"][0]
        )
        if sample.image is not None:
            assert torch.equal(next(pixels), ref.inputs["pixel_values"])
        # Labels are the answer tokens and their <|im_end|>: the calibration ANSWER span minus
        # its trailing newline.
        answer = (ref.kinds == TokenKind.ANSWER).nonzero().flatten().tolist()
        labelled = (batch.labels[row] != -100).nonzero().flatten().tolist()
        newline = set(range(n)) - set(labelled)
        assert set(labelled) <= set(answer) and set(answer) - set(labelled) <= newline
        assert len(labelled) == 2 * len(sample.qas)  # one answer token + <|im_end|> each
    assert len(batch.spans) == sum(len(s.qas) for s in samples)


def test_cell_targets_follow_quadrants():
    s = next(
        shapes.sample(seed) for seed in range(100) if len(shapes.sample(seed).scene.shapes) == 1
    )
    colors, kinds = cell_targets(s)
    obj = s.scene.shapes[0]
    cells = {(r, c) for r in range(4) for c in range(4) if colors[r * 4 + c] > 0}
    qr, qc = divmod(obj.quadrant, 2)
    assert cells == {(r, c) for r in (2 * qr, 2 * qr + 1) for c in (2 * qc, 2 * qc + 1)}
    assert colors.shape == kinds.shape == (IMAGE_TOKENS,)
    assert int(kinds.max()) == 1 + shapes.SHAPES.index(obj.shape)


def test_calibration_conversations(tmp_path, processor):
    a = calibration_conversations(8, seed=1)
    assert [c.messages for c in a] == [c.messages for c in calibration_conversations(8, seed=1)]
    assert [c.messages for c in a] != [c.messages for c in calibration_conversations(8, seed=2)]
    assert any(not c.images for c in a) and any(c.images for c in a)
    path = write_calibration_jsonl(tmp_path, 4, seed=1)
    loaded = load_jsonl(path)
    assert [c.messages for c in loaded] == [c.messages for c in a[:4]]
