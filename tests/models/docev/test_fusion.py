"""The fused model against independent references: LLaVA-NeXT packing and LlamaForCausalLM
(text, packed rows, and the whole image path built from transformers modules)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

from docev.models.docev import hf_config, pack_image_features, tiny
from docev.vision.geometry import num_image_tokens, plan_tiles, pooled_side

ARCH = tiny()
IMAGE = ARCH.image_token_id
T, P = ARCH.tile_size, ARCH.patch_size


def _sub(hf_tensors, prefix):
    return {k.removeprefix(prefix): v for k, v in hf_tensors.items() if k.startswith(prefix)}


def _llama(hf_tensors):
    cfg = {k: v for k, v in hf_config(ARCH)["text_config"].items() if k != "model_type"}
    ref = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    ref.load_state_dict(_sub(hf_tensors, "language_model."))
    return ref


def _siglip(hf_tensors):
    cfg = {k: v for k, v in hf_config(ARCH)["vision_config"].items() if k != "model_type"}
    ref = SiglipVisionModel(SiglipVisionConfig(**cfg)).eval()
    ref.load_state_dict(_sub(hf_tensors, "vision_tower.vision_model."))
    return ref


def _llava_pack(features, sizes, side, newline):
    """transformers' LLaVA-NeXT packing; its config reads the feature side as image_size // patch_size."""
    config = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=T, patch_size=T // side),
        image_grid_pinpoints=hf_config(ARCH)["image_grid_pinpoints"],
    )
    packed, _ = LlavaNextModel.pack_image_features(
        SimpleNamespace(config=config), features, torch.tensor(sizes), "full", image_newline=newline
    )
    return torch.cat(packed)


def _forward(model, batch):
    return model(batch["tokens"], **{k: v for k, v in batch.items() if k != "tokens"})


@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("size", [(300, 500), (500, 170)])
def test_packing_matches_llava_next(size, ratio):
    side = pooled_side(T, P, ratio)
    rows, cols = plan_tiles(*size, T, ARCH.min_num_tiles, ARCH.max_num_tiles).grid
    feats = torch.randn(1 + rows * cols, side, side, 16)
    newline = torch.randn(16)
    got = pack_image_features([feats], [size], [(rows, cols)], newline)
    expected = _llava_pack([feats.flatten(1, 2)], [size], side, newline)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.shape[0] == num_image_tokens(*size, ratio, tile_size=T, patch_size=P)
    assert got.shape[0] < side * side + rows * side * (cols * side + 1)  # the unpad removed something


def test_text_logits_match_llama(tiny_model, hf_tensors):
    tokens = torch.randint(0, ARCH.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    tokens[0, 7] = ARCH.vocab_size + 5  # a fusion row other than <image>
    ref = _llama(hf_tensors)
    with torch.no_grad():
        expected = ref(input_ids=tokens).logits
        got = tiny_model(tokens)
        assert got.shape == (2, 48, ARCH.vocab_size + ARCH.fusion_vocab_size)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # the check is sensitive to the RoPE q/k permutation the converter applies
        state = tiny_model.state_dict()
        for i in range(ARCH.layers):
            for p in "qk":
                state[f"decoder.layers.{i}.attn.{p}_proj.weight"] = hf_tensors[
                    f"language_model.model.layers.{i}.self_attn.{p}_proj.weight"
                ]
        tiny_model.load_state_dict(state)
        assert (tiny_model(tokens) - expected).abs().max() > 1e-3


def test_packed_rows_match_separate_documents(tiny_model, hf_tensors):
    """Two documents packed in one row with a block-causal mask and restarting positions."""
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, ARCH.vocab_size, (n,), generator=gen) for n in (20, 12)]
    tokens = torch.cat(docs)[None]
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, :20, :20] = torch.tril(torch.ones(20, 20, dtype=torch.bool))
    mask[0, 20:, 20:] = torch.tril(torch.ones(12, 12, dtype=torch.bool))
    input_pos = torch.cat([torch.arange(20), torch.arange(12)])[None]
    ref = _llama(hf_tensors)
    with torch.no_grad():
        got = tiny_model(tokens, mask=mask, input_pos=input_pos)
        expected = torch.cat([ref(input_ids=d[None]).logits for d in docs], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _reference_image_logits(hf_tensors, batch):
    """SiglipVisionModel + LDPv2 written out on the HF weights + LLaVA-NeXT packing + LlamaForCausalLM."""
    siglip, llama = _siglip(hf_tensors), _llama(hf_tensors)
    proj = _sub(hf_tensors, "multi_modal_projector.")
    ratio, g = batch["sampling_ratio"], T // P
    feats = []
    for pv, (r, c) in zip(batch["pixel_values"], batch["image_grids"].tolist(), strict=True):
        h = siglip(pixel_values=pv[: 1 + r * c], output_hidden_states=True).hidden_states[-2]
        h = F.gelu(F.linear(h, proj["mlp.0.weight"], proj["mlp.0.bias"]))
        h = F.linear(h, proj["mlp.2.weight"], proj["mlp.2.bias"])
        h = F.avg_pool2d(h.view(h.shape[0], g, g, -1).permute(0, 3, 1, 2), ratio)
        h = h + F.conv2d(h, proj["peg.0.weight"], proj["peg.0.bias"], padding=1, groups=h.shape[1])
        feats.append(h.flatten(2).transpose(1, 2))
    side = pooled_side(T, P, ratio)
    packed = _llava_pack(feats, batch["image_sizes"].tolist(), side, hf_tensors["image_newline"])
    embeds = llama.model.embed_tokens(batch["tokens"])
    embeds[batch["tokens"] == IMAGE] = packed
    return llama(inputs_embeds=embeds).logits


@pytest.mark.parametrize("ratio", [2, 3])
def test_image_path_matches_transformers_composition(tiny_model, hf_tensors, make_batch, ratio):
    batch = make_batch([[(300, 500), (150, 120)], [(500, 170)]], ratio, seed=ratio)
    with torch.no_grad():
        got = _forward(tiny_model, batch)
        expected = _reference_image_logits(hf_tensors, batch)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # padding tiles beyond each image's grid are ignored
        used = (1 + batch["image_grids"].prod(dim=1)).tolist()
        assert min(used) < batch["pixel_values"].shape[1]
        for i, n in enumerate(used):
            batch["pixel_values"][i, n:] = 7.0
        assert torch.equal(_forward(tiny_model, batch), got)


@pytest.mark.parametrize("ratio", [2, 3])
def test_forward_backward_two_image_sample(tiny_model, make_batch, ratio):
    tiny_model.train()
    batch = make_batch([[(300, 500), (200, 90)], [(480, 480)]], ratio, seed=10 + ratio)
    logits = _forward(tiny_model, batch)
    targets = batch["tokens"].roll(-1, dims=1)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in tiny_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert tiny_model.connector.peg.weight.grad.abs().sum() > 0
    assert tiny_model.image_newline.grad.abs().sum() > 0
    assert not tiny_model.encoder.patch_embed.weight.requires_grad


def test_text_only_batch_and_chunked_output(tiny_model):
    tokens = torch.randint(0, ARCH.vocab_size, (2, 16))
    with torch.no_grad():
        full = tiny_model(tokens)
        tiny_model.set_num_output_chunks(4)
        chunks = tiny_model(tokens)
    assert isinstance(chunks, list) and len(chunks) == 4
    torch.testing.assert_close(torch.cat(chunks, dim=1), full)


def test_placeholder_mismatches_name_the_row(tiny_model, make_batch):
    batch = make_batch([[(300, 500)], [(200, 90), (480, 480)]], 2)
    short = batch["tokens"].clone()
    short[1, (short[1] == IMAGE).nonzero()[-1]] = 3  # one slot fewer in row 1
    with pytest.raises(ValueError, match="batch row 1: .* do not match whole images"):
        _forward(tiny_model, {**batch, "tokens": short})

    extra = {**batch, "pixel_values": batch["pixel_values"][:2], "image_sizes": batch["image_sizes"][:2]}
    extra["image_grids"] = batch["image_grids"][:2]
    with pytest.raises(ValueError, match="batch row 1: .* do not match whole images"):
        _forward(tiny_model, extra)

    split = batch["tokens"].clone()
    first = (split[0] == IMAGE).nonzero()[0].item()
    split[0] = torch.cat([split[0, :first], torch.tensor([5]), split[0, first:-1]])
    split[0, first + 3], split[0, first] = 5, IMAGE  # same count, one gap inside the image
    with pytest.raises(ValueError, match="batch row 0: image 0 needs .* consecutive"):
        _forward(tiny_model, {**batch, "tokens": split})

    with pytest.raises(ValueError, match=r"batch row\(s\) \[0, 1\] hold <image> tokens"):
        tiny_model(batch["tokens"])

    text = batch["tokens"].masked_fill(batch["tokens"] == IMAGE, 4)
    with pytest.raises(ValueError, match="images 0..2 have no <image> tokens"):
        _forward(tiny_model, {**batch, "tokens": text})

    with pytest.raises(ValueError, match="grid .* needs .* tiles"):
        _forward(tiny_model, {**batch, "image_grids": batch["image_grids"] + 3})


def test_kv_cache_decoding_matches_full_forward(tiny_model, make_batch):
    """Prefill with the images through torchtune's local_kv_cache, then one token at a time: every
    position's logits equal the uncached forward over the whole sequence."""
    from torchtune.modules import local_kv_cache

    batch = make_batch([[(300, 500)]], 2, seed=4, text=6)
    tokens = batch["tokens"]
    n, prompt = tokens.shape[1], tokens.shape[1] - 4
    images = {k: v for k, v in batch.items() if k != "tokens"}
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    with torch.no_grad():
        full = tiny_model(tokens, **images)
        with local_kv_cache(tiny_model, batch_size=1, device=torch.device("cpu"), dtype=torch.float32,
                            decoder_max_seq_len=n):  # fmt: skip
            assert tiny_model.caches_are_enabled()
            steps = [tiny_model(tokens[:, :prompt], mask=causal[None, :prompt], input_pos=torch.arange(prompt)[None],
                                **images)]  # fmt: skip
            for pos in range(prompt, n):
                steps.append(tiny_model(tokens[:, pos : pos + 1], mask=causal[None, pos : pos + 1],
                                        input_pos=torch.tensor([[pos]])))  # fmt: skip
        assert not tiny_model.caches_are_setup()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
