"""Builders: trainable groups by name, config arguments, layer lists for FSDP2/AC/compile."""

import itertools

import pytest
import torch
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.model_fusion import get_fusion_params

from docev.models.docev import docev_tiny, init_rope, materialize


def _expected_groups(names):
    fusion = {n for n in names if n.startswith("connector.")} | {
        "image_newline",
        "tok_embeddings.fusion_embedding.weight",
    }
    unused = {n for n in names if n.startswith(("encoder.layers.1.", "encoder.post_norm."))}  # tiny: 2 vision layers
    encoder = {n for n in names if n.startswith("encoder.")} - unused
    decoder = {n for n in names if n.startswith("decoder.")} | {
        "tok_embeddings.embedding.weight"
    }  # state-dict key tok_embeddings.weight
    assert fusion | unused | encoder | decoder == set(names) and len(fusion | unused | encoder | decoder) == len(names)
    return {"decoder": decoder, "encoder": encoder, "fusion": fusion}


@pytest.mark.parametrize("decoder,encoder,fusion", list(itertools.product([True, False], repeat=3)))
def test_trainable_flags_freeze_exactly_their_groups(decoder, encoder, fusion):
    model = docev_tiny(decoder_trainable=decoder, encoder_trainable=encoder, fusion_trainable=fusion)
    names = [n for n, _ in model.named_parameters()]
    groups = _expected_groups(names)
    flags = {"decoder": decoder, "encoder": encoder, "fusion": fusion}
    expected = set().union(*(groups[g] for g, on in flags.items() if on))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert set(get_fusion_params(model)) == groups["fusion"]
    assert {k: set(v) for k, v in model.param_groups().items() if k not in ("unused", "adapter")} == groups
    assert model.param_groups()["adapter"] == []


def test_layer_lists_are_torchtune_layers():
    model = docev_tiny()
    for layers in (model.decoder.layers, model.encoder.layers):
        assert isinstance(layers, torch.nn.ModuleList)
        assert all(isinstance(m, TransformerSelfAttentionLayer) for m in layers)


def test_builder_arguments():
    assert docev_tiny(image_token_id=1030).image_token_id == 1030
    assert docev_tiny(tile_size=112, patch_size=14, max_num_tiles=4).tile_size == 112
    with pytest.raises(ValueError, match="model.tile_size = 224, but this architecture's checkpoint has 112"):
        docev_tiny(tile_size=224)
    with pytest.raises(ValueError, match="image_token_id 5000 outside the embedding's 0..1087"):
        docev_tiny(image_token_id=5000)


def test_fsdp2_sharding_and_activation_checkpointing_apply(tmp_path, make_batch):
    """The recipe's path: build on meta, torchtune shard_model per layer (the unused last vision layer
    included), load the full state dict, activation checkpointing; same logits and grads as unsharded."""
    import torch.distributed as dist
    from torchtune import training

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ref = docev_tiny()
        with torch.device("meta"):
            model = docev_tiny()
        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
        layer = [lambda _, m: isinstance(m, TransformerSelfAttentionLayer)]
        training.shard_model(model, layer, cpu_offload=False, reshard_after_forward=True)
        training.load_from_full_model_state_dict(model, ref.state_dict(), torch.device("cpu"), strict=True)
        init_rope(model)

        batch = make_batch([[(300, 500), (200, 90)], [(480, 480)]], 3)
        outs = []
        for net in (ref, model):
            logits = net(batch["tokens"], **{k: v for k, v in batch.items() if k != "tokens"})
            logits.pow(2).mean().backward()
            outs.append(logits)
        torch.testing.assert_close(outs[1], outs[0])
        grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.full_tensor() for n, p in model.named_parameters()
                 if p.grad is not None}  # fmt: skip
        assert grads.keys() == {n for n, p in ref.named_parameters() if p.grad is not None}
        for name, p in ref.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(grads[name], p.grad, msg=name)
        assert training.gather_cpu_state_dict(model, is_rank_zero=True).keys() == ref.state_dict().keys()
    finally:
        dist.destroy_process_group()


def test_materialize_draws_every_parameter_and_builds_the_rope_caches():
    """What benchmarks and tests measure on: no meta tensor left, weights N(0, 0.02), RoPE caches as a model
    built on the CPU has them (``to_empty`` alone leaves them uninitialised memory)."""
    torch.manual_seed(0)
    reference = docev_tiny()
    with torch.device("meta"):
        model = docev_tiny()
    assert materialize(model, "cpu") is model
    assert not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert abs(weights.std().item() - 0.02) < 1e-3 and abs(weights.mean().item()) < 1e-3
    caches = {n: b for n, b in model.named_buffers() if n.endswith(("cache", "theta"))}
    assert caches
    for name, cache in caches.items():
        torch.testing.assert_close(cache, reference.get_buffer(name), rtol=0, atol=0, msg=name)
