"""HF ⇄ torchtune key maps: bit-exact round trip, the preview layout, config-derived architecture."""

import math

import pytest
import torch

from docev.models.arch import siglip_head_shapes
from docev.models.docev import (
    arch_from_hf_config,
    docev_hf_to_tune,
    docev_preview,
    docev_tiny,
    docev_tune_to_hf,
    hf_config,
    hf_param_shapes,
    preview,
    tiny,
)
from docev.models.docev._convert_weights import check_hf_state_dict


def test_round_trip_is_bit_identical(hf_tensors):
    tune, unused = docev_hf_to_tune(hf_tensors, tiny())
    assert set(unused) == set(siglip_head_shapes(tiny()))
    assert set(tune) == set(docev_tiny().state_dict())
    back = {**docev_tune_to_hf(tune, tiny()), **unused}
    assert set(back) == set(hf_tensors)
    for key, value in hf_tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_embedding_split_and_qk_permutation(hf_tensors):
    a = tiny()
    tune, _ = docev_hf_to_tune(hf_tensors, a)
    embed = hf_tensors["language_model.model.embed_tokens.weight"]
    assert torch.equal(tune["tok_embeddings.weight"], embed[: a.vocab_size])
    assert torch.equal(tune["tok_embeddings.fusion_embedding.weight"], embed[a.vocab_size :])
    assert torch.equal(tune["decoder.output.weight"], hf_tensors["language_model.lm_head.weight"])
    # HF stores each head's rotary halves apart; torchtune interleaves them: row (h, i, half) <- (h, half, i)
    hf_k = hf_tensors["language_model.model.layers.0.self_attn.k_proj.weight"]
    d = a.head_dim
    expected = hf_k.view(a.kv_heads, 2, d // 2, a.dim).transpose(1, 2).reshape(-1, a.dim)
    assert torch.equal(tune["decoder.layers.0.attn.k_proj.weight"], expected)
    assert not torch.equal(expected, hf_k)
    assert torch.equal(
        tune["decoder.layers.0.attn.v_proj.weight"], hf_tensors["language_model.model.layers.0.self_attn.v_proj.weight"]
    )


def test_preview_on_meta_matches_the_released_layout():
    with torch.device("meta"):
        model = docev_preview()
    hf = docev_tune_to_hf(model.state_dict(), preview())
    expected = {k: v for k, v in hf_param_shapes(preview()).items() if k not in siglip_head_shapes(preview())}
    assert {k: tuple(v.shape) for k, v in hf.items()} == expected
    count = sum(p.numel() for p in model.parameters())
    print(f"docev_preview parameters: {count:,}")
    assert count == 11_429_732_080 == sum(math.prod(s) for s in expected.values())
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert shapes["tok_embeddings.weight"] == (64000, 4096)
    assert shapes["tok_embeddings.fusion_embedding.weight"] == (64, 4096)
    assert shapes["decoder.output.weight"] == (64064, 4096)
    assert shapes["encoder.pos_embed"] == (1600, 1152)
    assert shapes["connector.peg.weight"] == (4096, 1, 3, 3)
    assert len(model.decoder.layers) == 48 and len(model.encoder.layers) == 27
    assert model.image_token_id == 64000


@pytest.mark.parametrize("arch", [tiny(), preview()])
def test_architecture_from_released_config(arch):
    config = hf_config(arch)
    del config["docev"]  # the released config.json has only the LLaVA-NeXT-style fields
    assert arch_from_hf_config(config) == arch
    text = config["text_config"]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}  # transformers 5 form
    assert arch_from_hf_config(config) == arch
    del config["vision_config"]["patch_size"]
    with pytest.raises(ValueError, match="x/config.json: missing field 'patch_size'"):
        arch_from_hf_config(config, origin="x/config.json")


def test_layout_errors_name_the_tensor(hf_tensors):
    bad = dict(hf_tensors)
    bad["image_newline"] = torch.zeros(3)
    bad["vision_tower.vision_model.extra.weight"] = torch.zeros(1)
    del bad["multi_modal_projector.peg.0.bias"]
    with pytest.raises(ValueError) as err:
        check_hf_state_dict(bad, tiny(), files={"image_newline": "model-00002-of-00009.safetensors"})
    msg = str(err.value)
    assert "missing tensor multi_modal_projector.peg.0.bias" in msg
    assert "image_newline (in model-00002-of-00009.safetensors): shape (3,), the architecture needs (128,)" in msg
    assert "vision_tower.vision_model.extra.weight: not a DocEV checkpoint tensor" in msg
    with pytest.raises(ValueError, match="not a DocEV model parameter"):
        docev_tune_to_hf({"decoder.layers.0.attn.q_proj.weight": torch.zeros(1), "head.x": torch.zeros(1)}, tiny())
