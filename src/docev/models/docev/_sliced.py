"""An HF DocEV checkpoint as torchtune tensors that are read a row range at a time.

A training rank keeps 1/N of every sharded parameter (FSDP2 shards dim 0), so it asks each tensor for the rows
it keeps and nothing else is read from disk or cast (``docev.training.load``). ``open_rows`` returns the
torchtune state dict of a folder with a ``LazyRows`` per tensor: ``t[a:b]`` reads rows ``a:b`` of the HF tensor
through ``safetensors.safe_open(...).get_slice`` (a ``pytorch_model*.bin`` file is memory-mapped, so a slice
touches only its pages) and converts them as ``_convert_weights.docev_hf_to_tune`` converts the whole tensor:

- a renamed tensor is the same rows;
- the base and fusion embeddings are rows ``[0, vocab)`` and ``[vocab, vocab + fusion)`` of the HF embedding;
- the decoder's q/k projections are permuted within each head (torchtune's RoPE layout, ``hf_to_tune``): rows
  ``a:b`` come from the heads they fall in, so those whole heads are read, permuted by torchtune's own
  ``hf_to_tune`` and cut to ``a:b``.

tests/models/docev/test_sliced.py checks every tensor's slices against the full conversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torchtune.models import convert_weights as tt

from docev.models.docev._arch import DocEVArch
from docev.models.docev._convert_weights import (
    BASE_EMBED,
    FUSION_EMBED,
    LANGUAGE_MODEL,
    check_hf_state_dict,
    decoder_args,
    fusion_key_map,
    is_unused,
)

_PERMUTED = ("q_proj", "k_proj")  # the decoder keys torchtune's hf_to_tune permutes


class _Source:
    """One HF tensor in its file: ``rows(a, b)`` reads rows ``a:b`` (dim 0) only. A safetensors file is opened for
    each read, so its mapping (whose touched pages count in the rank's RSS) lasts one slice, not the whole load."""

    def __init__(self, where: Path | torch.Tensor, key: str, shape: Sequence[int], dtype: torch.dtype):
        self.where, self.key, self.shape, self.dtype = where, key, tuple(shape), dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if isinstance(self.where, torch.Tensor):  # a memory-mapped .bin tensor: copy only these rows
            return self.where[start:stop].clone()
        return safe_open(str(self.where), framework="pt").get_slice(self.key)[start:stop]

    def whole(self) -> torch.Tensor:
        if isinstance(self.where, torch.Tensor):
            return self.where.clone()
        return safe_open(str(self.where), framework="pt").get_tensor(self.key)


class LazyRows:
    """A torchtune tensor of the checkpoint, read when indexed along dim 0 (``t[a:b]``, ``t[:]`` for all of it)."""

    def __init__(self, source: _Source, offset: int, rows: int, decoder_key: str | None, arch: DocEVArch):
        self._source, self._offset, self._decoder_key, self._arch = source, offset, decoder_key, arch
        self.shape = torch.Size((rows, *source.shape[1:]))
        self.dtype = source.dtype
        permuted = decoder_key is not None and any(p in decoder_key for p in _PERMUTED)
        self._head = arch.head_dim if permuted else 1

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice):
            raise TypeError(f"LazyRows is read by row slices, not {rows!r}")
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("LazyRows reads contiguous rows only")
        stop = max(start, stop)
        h = self._head
        lo, hi = start // h * h, -(-stop // h) * h  # the whole heads these rows fall in
        block = self._source.rows(self._offset + lo, self._offset + hi)
        if self._decoder_key is not None and h > 1 and hi > lo:
            heads = (hi - lo) // h
            args = {**decoder_args(self._arch), "num_heads": heads, "num_kv_heads": heads}
            (block,) = tt.hf_to_tune({self._decoder_key: block}, **args).values()
        return block[start - lo : stop - lo]


def _sources(files: Sequence[Path]) -> tuple[dict[str, _Source], dict[str, str]]:
    sources: dict[str, _Source] = {}
    where: dict[str, str] = {}
    for path in files:
        if path.suffix == ".safetensors":
            handle = safe_open(str(path), framework="pt")  # the header only: shapes and dtypes
            found = {}
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                piece = handle.get_slice(key)
                found[key] = _Source(path, key, piece.get_shape(), _dtype(piece.get_dtype()))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found = {k: _Source(t, k, t.shape, t.dtype) for k, t in tensors.items()}
        for key, source in found.items():
            if key in sources:
                raise ValueError(f"{key} is in both {where[key]} and {path.name}")
            sources[key], where[key] = source, path.name
    return sources, where


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


def _dtype(name: str) -> torch.dtype:
    try:
        return _SAFETENSORS_DTYPES[name]
    except KeyError:
        raise ValueError(f"safetensors dtype {name}: not a dtype DocEV checkpoints hold") from None


def open_rows(files: Sequence[Path], arch: DocEVArch) -> tuple[dict[str, LazyRows], dict[str, torch.Tensor]]:
    """(torchtune state dict of ``LazyRows``, the unused tensors read whole) of an HF DocEV folder's weight
    files; checked against the architecture like a full read (shapes from the file headers, nothing read)."""
    sources, where = _sources(files)
    check_hf_state_dict({k: torch.empty(s.shape, device="meta") for k, s in sources.items()}, arch, where)
    fusion = fusion_key_map(arch)
    state: dict[str, LazyRows] = {}
    unused: dict[str, torch.Tensor] = {}
    for key, source in sources.items():
        if is_unused(key):
            unused[key] = source.whole()
        elif key in fusion:
            state[fusion[key]] = LazyRows(source, 0, source.shape[0], None, arch)
        else:  # the decoder: torchtune's name for it (converting a meta tensor of its shape reads nothing)
            decoder_key = key.removeprefix(LANGUAGE_MODEL)
            meta = {decoder_key: torch.empty(source.shape, device="meta")}
            (tune,) = tt.hf_to_tune(meta, **decoder_args(arch)).keys()
            if tune == BASE_EMBED:
                state[BASE_EMBED] = LazyRows(source, 0, arch.vocab_size, decoder_key, arch)
                state[FUSION_EMBED] = LazyRows(source, arch.vocab_size, arch.fusion_vocab_size, decoder_key, arch)
            else:
                state[f"decoder.{tune}"] = LazyRows(source, 0, source.shape[0], decoder_key, arch)
    return state, unused
