"""The reference processor and the fast encoder agree with the processor + chat template."""

from __future__ import annotations

import pytest
import torch

from veq.calib.data import encode_conversation
from veq.calib.sources import load_jsonl
from veq.models.processor import ImageOnlyQwen3VLProcessor
from veq.reference import shapes
from veq.reference.encode import (
    CELL_TARGETS,
    MAX_PIXELS,
    MIN_PIXELS,
    Encoder,
    calibration_conversations,
    cell_targets,
    object_cells,
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
    texts += ["Ünïcödé, 12 + 7 = 19!", "What is 3 plus 4?\n", shapes.SELF_DESCRIPTION]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_processor_saves_and_reloads(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    again = ImageOnlyQwen3VLProcessor.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\nWhat color is the circle?<|im_end|>\n"
    assert again.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    size = again.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (MIN_PIXELS, MAX_PIXELS)


def test_encoder_matches_processor_and_chat_template(processor):
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    samples = [shapes.training_sample(seed) for seed in range(10)]
    assert any(s.image is None for s in samples) and any(s.image is not None for s in samples)
    assert len({s.image.size for s in samples if s.image is not None}) > 3  # sizes vary
    batch = Encoder(processor)(samples)
    offset = 0
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
            patches = ref.inputs["pixel_values"].shape[0]
            pixels = batch.inputs["pixel_values"][offset : offset + patches]
            assert torch.equal(pixels, ref.inputs["pixel_values"])
            offset += patches
        # Labels are the answer tokens and their <|im_end|>: the calibration ANSWER span minus
        # its trailing newline.
        answer = (ref.kinds == TokenKind.ANSWER).nonzero().flatten().tolist()
        labelled = (batch.labels[row] != -100).nonzero().flatten().tolist()
        newline = set(range(n)) - set(labelled)
        assert set(labelled) <= set(answer) and set(answer) - set(labelled) <= newline
    assert offset == batch.inputs["pixel_values"].shape[0]
    assert len(batch.spans) == sum(len(s.qas) for s in samples)


def test_cell_targets_of_a_centred_shape():
    s = next(
        s
        for s in map(shapes.sample, range(300))
        if len(s.scene.shapes) == 1
        and abs(s.scene.shapes[0].cx / s.scene.width - 0.5) < 0.04
        and s.scene.width == s.scene.height
        and s.scene.shapes[0].size > 0.3 * s.scene.width
    )
    obj = s.scene.shapes[0]
    t = cell_targets(s.scene, 8, 8)  # 128×128: 4×4 cells
    assert set(t) == set(CELL_TARGETS) and all(v.shape == (16,) for v in t.values())
    # The centre lies within 3 % of the middle: in one of the four middle cells.
    assert int(t["centres"].sum()) == int(t["centres"][[5, 6, 9, 10]].sum()) == 1
    owned = t["colors"] > 0
    assert owned[[5, 6, 9, 10]].all() and not owned[[0, 3, 12, 15]].any()
    assert set(t["colors"][owned].tolist()) == {1 + list(shapes.COLORS).index(obj.color)}
    assert set(t["shapes"][owned].tolist()) == {1 + shapes.SHAPES.index(obj.shape)}
    assert t["cols"].view(4, 4)[0].tolist() == [0, 1, 2, 3]
    assert t["rows"].view(4, 4)[:, 0].tolist() == [0, 1, 2, 3]


def test_encoder_targets_cover_every_image(processor):
    samples = [shapes.sample(seed) for seed in range(6)]
    batch = Encoder(processor)(samples, targets=True)
    cells = int(batch.inputs["image_grid_thw"].prod(-1).sum()) // 4
    assert all(v.shape == (cells,) for v in batch.cells.values())
    assert int(batch.cells["centres"].sum()) == sum(len(s.scene.shapes) for s in samples)


def test_calibration_conversations(tmp_path, processor):
    a = calibration_conversations(8, seed=1)
    assert [c.messages for c in a] == [c.messages for c in calibration_conversations(8, seed=1)]
    assert [c.messages for c in a] != [c.messages for c in calibration_conversations(8, seed=2)]
    assert any(not c.images for c in a) and any(c.images for c in a)
    path = write_calibration_jsonl(tmp_path, 4, seed=1)
    loaded = load_jsonl(path)
    assert [c.messages for c in loaded] == [c.messages for c in a[:4]]


def test_cell_targets_sit_where_the_colour_is_on_a_non_square_image(processor):
    """Against the pixels the processor sees: rows and columns of a 2:1-ish grid not swapped."""
    import numpy as np
    from PIL import Image

    def plain(s):
        sc = s.scene
        o = sc.shapes[0]
        return len(sc.shapes) == 1 and o.fill and not o.outline and not sc.noise

    s = next(
        s
        for s in map(shapes.sample, range(400))
        if plain(s) and s.scene.width > 1.4 * s.scene.height and s.scene.shapes[0].size > 40
    )
    batch = Encoder(processor)([s], targets=True)
    _, gh, gw = batch.inputs["image_grid_thw"][0].tolist()
    assert gw > gh
    ch, cw = gh // 2, gw // 2
    resized = np.asarray(s.image.resize((gw * 16, gh * 16), Image.Resampling.BICUBIC), dtype=int)
    fill = np.asarray(s.scene.shapes[0].fill)
    near = (np.abs(resized - fill).max(-1) <= 12).reshape(ch, 32, cw, 32).mean((1, 3))
    colour = batch.cells["colors"].view(ch, cw)
    label = 1 + list(shapes.COLORS).index(s.scene.shapes[0].color)
    assert (colour[torch.from_numpy(near > 0.5)] == label).all()
    assert (colour[torch.from_numpy(near == 0)] == 0).all()
    assert (near > 0.5).any() and (near == 0).any()


def test_every_object_has_cells_and_its_centre_cell_among_them():
    for s in map(shapes.sample, range(40)):
        cells = object_cells(s.scene, 8, 12)  # 192×128: 6×4 cells
        assert len(cells) == len(s.scene.shapes)
        for obj, own in zip(s.scene.shapes, cells, strict=True):
            assert own.numel() >= 1 and own.max() < 24
            if obj.fill is not None:  # a hollow shape's centre shows the background
                centre = int(obj.cy / s.scene.height * 4) * 6 + int(obj.cx / s.scene.width * 6)
                big = obj.size / min(s.scene.width, s.scene.height) > 0.3
                assert centre in own.tolist() or not big


def test_pointers_aim_from_the_answers_prompt_at_the_asked_shapes_tokens(processor):
    samples = [shapes.training_sample(seed, 4, 0.3) for seed in range(12)]
    batch = Encoder(processor)(samples, targets=True)
    ids = batch.inputs["input_ids"]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    expected = sum(bool(qa.about) for s in samples if s.image is not None for qa in s.qas)
    assert len(batch.pointers) == expected > 0
    firsts = {(row, start) for row, start, _, _ in batch.spans}
    for row, query, keys in batch.pointers:
        assert (row, query + 1) in firsts  # the position whose logits give the answer
        assert keys.numel() >= 1 and (ids[row, keys] == image_pad).all()
        assert samples[row].image is not None
    assert not Encoder(processor)(samples).pointers  # targets only on request
    # The naming word: the question's last colour or shape word, "triangle" in "What color is
    # the triangle?", "red" in "What shape is the red object?"; none in "How many shapes...".
    words = {**{c: c for c in shapes.COLORS}, **{k: k for k in shapes.SHAPES}}
    words.update({shapes.plural(k): k for k in shapes.SHAPES})
    tok = processor.tokenizer
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    named = 0
    for row, query, keys in batch.word_pointers:
        word = tok.convert_ids_to_tokens(int(ids[row, query])).removeprefix("Ġ")
        assert word in words
        # Inside the question its answer follows: after that turn's <|im_start|>, before the
        # answer's prompt, with the same targets.
        answer = min(q for r, q, ks in batch.pointers if r == row and q > query)
        turn = ids[row, query:answer].tolist()
        assert turn.count(im_start) == 1  # the assistant prompt's own
        assert any(
            r == row and q == answer and torch.equal(ks, keys) for r, q, ks in batch.pointers
        )
        named += 1
    asked = [qa for s in samples if s.image is not None for qa in s.qas if qa.about]
    with_word = [qa for qa in asked if any(w in qa.question.rstrip("?.").split() for w in words)]
    assert named == len(with_word) > 0
