"""No host sync in a training micro-batch (forward, chunked loss, backward, as the recipe runs it): image sizes
and grids travel as Python data, image features go to host-computed slots (``index_put``, not
``masked_scatter``, whose backward calls ``nonzero``), the pixel constants are made once per device. Seen at
the dispatcher on CPU (``HostSyncCounter``), where the same ops would make the host wait on CUDA."""

import torch
from torchtune.modules.loss import CEWithChunkedOutputLoss

from docev.models.docev import docev_tiny, image_positions, tiny
from docev.training.host_sync import HostSyncCounter
from docev.vision.geometry import num_image_tokens, plan_tiles
from docev.vision.tiling import normalize

ARCH = tiny()


def _batch(seed: int) -> dict:
    """Two rows, one image each, uint8 pixels as the loader ships them; S a multiple of the 8 loss chunks."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(300, 500), (200, 90)]
    grids = [list(plan_tiles(h, w, ARCH.tile_size, ARCH.min_num_tiles, ARCH.max_num_tiles).grid) for h, w in sizes]
    rows = []
    for h, w in sizes:
        n = num_image_tokens(h, w, 2, tile_size=ARCH.tile_size, patch_size=ARCH.patch_size)
        rows.append([5, 6, 7] + [ARCH.image_token_id] * n + [8, 9])
    s = -(-max(map(len, rows)) // 8) * 8
    tokens = torch.tensor([r + [0] * (s - len(r)) for r in rows])
    tiles = max(1 + r * c for r, c in grids)
    pixels = torch.randint(0, 256, (2, tiles, 3, ARCH.tile_size, ARCH.tile_size), dtype=torch.uint8, generator=gen)
    return {"tokens": tokens, "labels": torch.randint(0, ARCH.vocab_size, tokens.shape, generator=gen),
            "pixel_values": pixels, "image_sizes": torch.tensor(sizes), "image_grids": torch.tensor(grids)}  # fmt: skip


def _micro_batch(model, loss_fn, batch, syncs: HostSyncCounter) -> None:
    """What ``DocEVFinetuneRecipe._forward_backward`` does with a host batch; only the device part counted."""
    model.check_inputs(batch["tokens"], batch["pixel_values"], batch["image_sizes"], batch["image_grids"], 2)
    sizes, grids = batch["image_sizes"].tolist(), batch["image_grids"].tolist()
    slots = image_positions(batch["tokens"], model.image_token_id)
    with syncs:
        pixels = normalize(batch["pixel_values"])
        logits = model(batch["tokens"], pixel_values=pixels, image_sizes=sizes, image_grids=grids, sampling_ratio=2,
                       image_slots=slots, inputs_checked=True)  # fmt: skip
        loss = loss_fn(logits, batch["labels"]) * 10
        del logits
        loss.backward()


def test_a_training_micro_batch_has_no_host_sync():
    torch.manual_seed(0)
    model = docev_tiny(encoder_trainable=True)  # the tower's backward too
    model.set_num_output_chunks(8)
    loss_fn = CEWithChunkedOutputLoss()
    for seed in (0, 1):  # the second micro-batch accumulates into existing gradients
        syncs = HostSyncCounter()
        _micro_batch(model, loss_fn, _batch(seed), syncs)
        assert syncs.counts == {}, syncs.counts
    assert model.connector.peg.weight.grad.abs().sum() > 0
    with HostSyncCounter() as probe:  # the counter sees what would sync
        torch.ones(3).sum().item()
        torch.ones(3).nonzero()
    assert probe.counts == {"aten._local_scalar_dense": 1, "aten.nonzero": 1}


def test_slots_place_features_as_masked_scatter_did():
    torch.manual_seed(0)
    model = docev_tiny().eval()
    batch = _batch(2)
    pixels = normalize(batch["pixel_values"])
    with torch.no_grad():
        got = model(batch["tokens"], pixel_values=pixels, image_sizes=batch["image_sizes"].tolist(),
                    image_grids=batch["image_grids"].tolist(), sampling_ratio=2)  # fmt: skip
        embeds = model.tok_embeddings(batch["tokens"])
        feats = model.image_features(pixels, batch["image_sizes"], batch["image_grids"], 2)
        mask = (batch["tokens"] == model.image_token_id).unsqueeze(-1)
        want = model.decoder(embeds.masked_scatter(mask, feats))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
