"""Bounded compiled graphs: the collate's padding keeps S in a few shapes, so compiled layers (and compiled flex
attention, which is compiled with ``dynamic=False``) do not recompile for every new length. Counted with
dynamo's own graph counter on the ``eager`` backend (graph capture without code generation)."""

import pytest
import torch
from torch._dynamo.utils import counters

from docev.data.collate import DocEVCollate
from docev.models.docev import docev_tiny

pytestmark = pytest.mark.slow  # torch.compile of layers and of flex attention (`make test-fast` leaves it out)

MAX_LEN = 128


def _collate(packed: bool, pad_to_multiple_of: int | None) -> DocEVCollate:
    return DocEVCollate(image_token_id=1024, pad_id=0, tile_size=112, patch_size=14, min_num_tiles=1,
                        max_num_tiles=9, max_seq_len=MAX_LEN, mean=(0.5,) * 3, std=(0.5,) * 3, packed=packed,
                        pad_to_multiple_of=pad_to_multiple_of, num_output_chunks=8)  # fmt: skip


def _samples(lengths: list[int], seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(1, 1000, (n,), generator=gen).tolist() for n in lengths]
    return [{"id": f"s{seed}-{i}", "ratio": 2, "row": i % 2, "tokens": t, "loss_mask": [True] * len(t),
             "image_sizes": [], "image_grids": [], "images": []} for i, t in enumerate(tokens)]  # fmt: skip


def _graphs_per_batch(model, batches) -> list[int]:
    torch._dynamo.reset()
    counters.clear()
    for layer in model.decoder.layers:  # what training.compile_model does, on the eager backend
        layer.compile(backend="eager")
    seen = []
    with torch.no_grad():
        for b in batches:
            model(b["tokens"], document_ids=b["document_ids"], input_pos=b["input_pos"])
            seen.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return seen


@pytest.mark.parametrize("pad_to_multiple_of,expected", [(64, [1, 1, 1, 1]), (None, [1, 2, 2, 2])])
def test_unpacked_lengths_in_one_bucket_compile_once(pad_to_multiple_of, expected):
    collate = _collate(False, pad_to_multiple_of)
    batches = [collate(_samples([n], seed=n)) for n in (37, 45, 61, 50)]
    assert [b["tokens"].shape[1] for b in batches] == ([64] * 4 if pad_to_multiple_of else [40, 48, 64, 56])
    # without buckets dynamo recompiles once, marking S dynamic (dynamic-shape kernels from then on)
    assert _graphs_per_batch(docev_tiny(), batches) == expected


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_packed_rows_have_one_shape(attention):
    collate = _collate(True, None)
    batches = [collate(_samples(lengths, seed=i)) for i, lengths in enumerate([[30, 50, 20], [90, 31], [5, 7]])]
    assert {b["tokens"].shape for b in batches} == {(2, MAX_LEN)}
    model = docev_tiny(attention=attention)
    graphs = _graphs_per_batch(model, batches)
    assert graphs == [graphs[0]] * 3  # no recompile after the first batch (flex: its kernel + the graph breaks)


def test_vision_and_decoder_layers_share_a_bounded_number_of_graphs():
    """torchtune compiles every TransformerSelfAttentionLayer, so the tower's and the decoder's layers count against
    one code object's recompile limit: training batches of varied lengths (3 buckets) and tile counts stay within
    4 graphs, under the limit the recipe sets (``configure_compile``, which makes hitting it an error)."""
    import importlib.util
    from pathlib import Path

    from torchtune.modules import TransformerSelfAttentionLayer

    from docev.training.parallelize import RECOMPILE_LIMIT, configure_compile, graphs_per_code_object

    spec = importlib.util.spec_from_file_location(
        "models_conftest", Path(__file__).parents[1] / "models/docev/conftest.py"
    )
    make_batch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_batch)
    torch._dynamo.reset()
    configure_compile()
    model = docev_tiny(encoder_trainable=True)
    for m in model.modules():
        if isinstance(m, TransformerSelfAttentionLayer):
            m.compile(backend="eager")
    seen = []
    for i, hw in enumerate([(120, 90), (300, 500), (480, 480), (90, 400), (600, 300), (200, 90)]):
        b = make_batch._make_batch([[hw]], ratio=2, seed=i, text=5 + 9 * i)
        s = -(-b["tokens"].shape[1] // 64) * 64  # pad_to_multiple_of 64: buckets 64, 128, 192, 256
        tokens = torch.nn.functional.pad(b["tokens"], (0, s - b["tokens"].shape[1]))
        logits = model(tokens, pixel_values=b["pixel_values"], image_sizes=b["image_sizes"].tolist(),
                       image_grids=b["image_grids"].tolist(), sampling_ratio=2)  # fmt: skip
        logits.float().mean().backward()
        seen.append((s, int(b["image_grids"].prod(1).sum()), max(graphs_per_code_object().values())))
    torch._dynamo.reset()
    assert len({s for s, _, _ in seen}) >= 3 and len({t for _, t, _ in seen}) >= 4, seen
    assert seen[-1][2] <= 4 < RECOMPILE_LIMIT, seen
