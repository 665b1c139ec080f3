"""The vision tower against transformers' SiglipVisionModel on the tiny checkpoint's weights."""

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from docev.models.docev import hf_config, tiny

PREFIX = "vision_tower.vision_model."  # transformers 5 keys SiglipVisionModel without "vision_model."


def _siglip(hf_tensors):
    cfg = {k: v for k, v in hf_config(tiny())["vision_config"].items() if k != "model_type"}
    ref = SiglipVisionModel(SiglipVisionConfig(**cfg)).eval()
    ref.load_state_dict({k.removeprefix(PREFIX): v for k, v in hf_tensors.items() if k.startswith(PREFIX)})
    return ref


def test_features_match_siglip_second_to_last_hidden_state(tiny_model, hf_tensors):
    tiles = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = _siglip(hf_tensors)(pixel_values=tiles, output_hidden_states=True).hidden_states
        got = tiny_model.encoder(tiles)
    assert got.shape == (3, 64, 64)
    torch.testing.assert_close(got, hidden[-2], atol=1e-5, rtol=1e-5)
    # the comparison can tell neighbouring layers apart
    assert (got - hidden[-1]).abs().max() > 1e-2 and (got - hidden[-3]).abs().max() > 1e-2


def test_last_layer_and_post_norm_are_held_but_not_run(tiny_model):
    tiles = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        before = tiny_model.encoder(tiles)
        for p in [*tiny_model.encoder.layers[-1].parameters(), *tiny_model.encoder.post_norm.parameters()]:
            p.add_(1.0)
        assert torch.equal(tiny_model.encoder(tiles), before)
    assert tiny_model.encoder.unused_params() == [
        n for n, _ in tiny_model.encoder.named_parameters() if n.startswith(("layers.1.", "post_norm."))
    ]


def test_wrong_tile_size_is_named(tiny_model):
    import pytest

    with pytest.raises(ValueError, match="position embedding holds 64"):
        tiny_model.encoder(torch.randn(1, 3, 140, 140))
