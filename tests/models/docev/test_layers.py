"""The sync-free fusion embedding and the one-call chunked output against torchtune's modules, and a forward
that reads no device value once the recipe has checked the batch on the host."""

import pytest
import torch
from torchtune.modules import TransformerDecoder
from torchtune.modules.model_fusion import FusionEmbedding

from docev.models.docev import docev_tiny, image_positions
from docev.models.docev._component_builders import docev_decoder, lora_docev_decoder
from docev.models.docev._layers import SyncFreeFusionEmbedding

_DECODER = dict(vocab_size=34, fusion_vocab_size=6, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16,
                intermediate_dim=32, max_seq_len=64, rope_base=10000.0)  # fmt: skip


def test_sync_free_fusion_embedding_equals_torchtunes():
    torch.manual_seed(0)
    ours, theirs = SyncFreeFusionEmbedding(50, 6, 8), FusionEmbedding(50, 6, 8)
    theirs.load_state_dict(ours.state_dict())
    ids = torch.tensor([[0, 49, 50, 55, 3, 52], [51, 1, 2, 49, 50, 0]])
    a, b = ours(ids), theirs(ids)
    assert torch.equal(a, b)
    (a * torch.arange(8)).sum().backward()
    (b * torch.arange(8)).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("lora", [False, True])
def test_chunked_output_is_one_call_equal_to_torchtunes_per_chunk_calls(lora):
    """One call of ``output`` (a plain linear, or a LoRA adapter on it) gives torchtune's per-chunk logits."""
    torch.manual_seed(0)
    if lora:
        decoder = lora_docev_decoder(lora_attn_modules=["q_proj"], apply_lora_to_output=True, **_DECODER)
        torch.nn.init.normal_(decoder.output.lora_b.weight)  # a non-zero adapter
    else:
        decoder = docev_decoder(**_DECODER)
    decoder.set_num_output_chunks(8)
    calls = []
    decoder.output.register_forward_hook(lambda *_: calls.append(1))
    h = torch.randn(2, 24, 16)
    ours = decoder.chunked_output(h)
    assert len(calls) == 1 and [c.shape for c in ours] == [(2, 3, 40)] * 8
    theirs = TransformerDecoder.chunked_output(decoder, h)  # torchtune's loop: one call per chunk
    assert len(calls) == 9
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_forward_with_checked_inputs_reads_no_device_value(make_batch):
    """On the meta device every data-dependent op (``.tolist()``, ``.item()``, ``nonzero``, ``masked_select``)
    raises: a forward given the host-computed image slots runs there, so it never waits for the device."""
    batch = make_batch([[(100, 150)], [(140, 60), (80, 80)]], ratio=2)
    with torch.device("meta"):
        model = docev_tiny()
    model.check_inputs(batch["tokens"], batch["pixel_values"], batch["image_sizes"], batch["image_grids"], 2)
    slots = image_positions(batch["tokens"], model.image_token_id)  # on the host copy, as the recipe does
    meta = {**batch, "tokens": batch["tokens"].to("meta"), "pixel_values": batch["pixel_values"].to("meta")}
    logits = model(**meta, image_slots=slots.to("meta"), inputs_checked=True)
    assert logits.device.type == "meta" and logits.shape[:2] == batch["tokens"].shape
    with pytest.raises((NotImplementedError, RuntimeError)):
        model(**meta)  # the checks read token values


def test_vision_layers_compile_once_for_every_tile_count(tiny_model, make_batch):
    """The tile count changes with every batch; it is marked dynamic, so compiled vision layers never recompile
    for a new count (dynamo's graph counter, ``eager`` backend: capture without code generation)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for layer in tiny_model.encoder.layers:
        layer.compile(backend="eager")
    seen, tiles = [], []
    with torch.no_grad():
        for rows in ([[(100, 150)]], [[(300, 90), (80, 80)]], [[(224, 224)], [(60, 400)]], [[(50, 50)]]):
            batch = make_batch(rows, ratio=2)
            tiles.append(int(sum(1 + r * c for r, c in batch["image_grids"].tolist())))
            tiny_model(**batch)
            seen.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert len(set(tiles)) == 4  # four different tile counts
    assert seen == [seen[0]] * 4
