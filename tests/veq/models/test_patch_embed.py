"""`PatchLinear` computes what the Conv3d patch embedding computes, and keeps its parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from veq.models.patch_embed import PatchLinear, linearize_patch_embeddings


@pytest.mark.parametrize("n", [1, 7, 64])
def test_patch_linear_matches_conv3d(n):
    torch.manual_seed(n)
    conv = nn.Conv3d(3, 40, kernel_size=(2, 14, 14), stride=(2, 14, 14))
    x = torch.randn(n, 3, 2, 14, 14)
    torch.testing.assert_close(PatchLinear(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_patch_linear_refuses_other_shapes():
    conv = nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4))
    with pytest.raises(ValueError, match="patches of"):
        PatchLinear(conv)(torch.randn(2, 3, 2, 8, 8))


def test_linearized_model_has_same_outputs_and_state_dict(tiny_model, calib):
    model = tiny_model("qwen3_vl_moe")
    sample = next(s for s in calib("qwen3_vl_moe") if "pixel_values" in s.inputs)
    keys = set(model.state_dict())
    inputs = dict(sample.inputs)
    with torch.no_grad():
        before = model(**inputs).logits
        assert linearize_patch_embeddings(model) == 1
        after = model(**inputs).logits
    assert set(model.state_dict()) == keys
    assert isinstance(model.model.visual.patch_embed.proj, PatchLinear)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert linearize_patch_embeddings(model) == 0  # idempotent
