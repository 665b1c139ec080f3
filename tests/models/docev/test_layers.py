"""The sync-free fusion embedding and the one-call chunked output against torchtune's modules, and a forward
that reads no device value once the recipe has checked the batch on the host."""

import pytest
import torch
from torchtune.modules.model_fusion import FusionEmbedding

from docev.models.docev import docev_tiny
from docev.models.docev._layers import ChunkedOutputProjection, SyncFreeFusionEmbedding


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


def test_chunked_projection_equals_torchtunes_per_chunk_calls():
    torch.manual_seed(0)
    proj = ChunkedOutputProjection(16, 40, bias=False)
    x = torch.randn(2, 24, 16)
    chunks = proj(x, num_chunks=8)
    assert [c.shape for c in chunks] == [(2, 3, 40)] * 8
    linear = torch.nn.Linear(16, 40, bias=False)
    linear.load_state_dict(proj.state_dict())
    for ours, theirs in zip(chunks, [linear(c) for c in x.chunk(8, dim=1)], strict=True):  # torchtune's loop
        assert torch.equal(ours, theirs)
    assert torch.equal(proj(x), linear(x))


def test_forward_with_checked_inputs_reads_no_device_value(make_batch):
    """On the meta device every data-dependent op (``.tolist()``, ``.item()``, ``nonzero``, ``masked_select``)
    raises: a forward that runs there never waits for the device."""
    batch = make_batch([[(100, 150)], [(140, 60), (80, 80)]], ratio=2)
    with torch.device("meta"):
        model = docev_tiny()
    model.check_inputs(batch["tokens"], batch["pixel_values"], batch["image_sizes"], batch["image_grids"], 2)
    meta = {**batch, "tokens": batch["tokens"].to("meta"), "pixel_values": batch["pixel_values"].to("meta")}
    logits = model(**meta, inputs_checked=True)
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
