"""Row-range reads of an HF DocEV folder (``_sliced.open_rows``) against the full read and conversion: every
torchtune tensor, every rank's rows at 1..5 ranks and odd ranges that cut through q/k heads, equal bit for bit."""

import shutil

import pytest
import torch

from docev.models.docev import DocEVCheckpointer
from docev.models.docev._convert_weights import BASE_EMBED, FUSION_EMBED


def _ranges(rows: int) -> list[slice]:
    out = [slice(None), slice(0, 0), slice(rows, rows), slice(1, rows - 1), slice(3, 5), slice(rows - 1, None)]
    for world in range(1, 6):  # FSDP2's dim-0 shards: torch.chunk sizes, the last ranks possibly empty
        size = -(-rows // world)
        out += [slice(min(r * size, rows), min((r + 1) * size, rows)) for r in range(world)]
    return out


def _check(ckpt: DocEVCheckpointer) -> None:
    full = ckpt.load_checkpoint()["model"]
    full_unused = ckpt.unused
    lazy = ckpt.open_checkpoint()["model"]
    assert lazy.keys() == full.keys()
    assert ckpt.unused.keys() == full_unused.keys()
    assert all(torch.equal(ckpt.unused[k], v) for k, v in full_unused.items())
    for key, want in full.items():
        assert lazy[key].shape == want.shape and lazy[key].dtype == want.dtype, key
        for rows in _ranges(want.shape[0]):
            got = lazy[key][rows]
            assert got.dtype == want.dtype and torch.equal(got, want[rows]), (key, rows)


def test_every_slice_equals_the_full_conversion(tiny_checkpoint, hf_tensors):
    ckpt = DocEVCheckpointer(tiny_checkpoint)
    lazy = ckpt.open_checkpoint()["model"]
    q = "decoder.layers.0.attn.q_proj.weight"
    # the permuted q rows 0:16 of head 0 are not HF rows 0:16: the read must go through the whole head
    assert not torch.equal(lazy[q][0:16], hf_tensors["language_model.model.layers.0.self_attn.q_proj.weight"][0:16])
    assert lazy[FUSION_EMBED].shape[0] == 64 and lazy[BASE_EMBED].shape[0] == 1024
    _check(ckpt)


def test_bin_weights_are_read_by_rows_too(tiny_checkpoint, hf_tensors, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", folder / "config.json")
    torch.save({k: v.to(torch.bfloat16) for k, v in hf_tensors.items()}, folder / "pytorch_model.bin")
    _check(DocEVCheckpointer(folder))


def test_slices_only(tiny_checkpoint):
    lazy = DocEVCheckpointer(tiny_checkpoint).open_checkpoint()["model"]
    with pytest.raises(TypeError, match="row slices"):
        lazy[BASE_EMBED][0]
    with pytest.raises(ValueError, match="contiguous"):
        lazy[BASE_EMBED][::2]
