"""Collate: samples of one step → the model's batch (DESIGN "Model inputs").

All samples of a batch share the step's sampling ratio (chosen by the sampler), so placeholders are
expanded here, not in the shards. Plain batches are right-padded rows and carry no mask (the model
keeps ``is_causal``, the flash kernel); packed batches lay several samples into one row with
per-sample positions and per-token ``document_ids`` (4 bytes a token, not an S×S mask: 64 MiB per
8192-token row), from which the model builds its block-causal mask on the device, so samples never
attend to each other. Lengths are padded so compiled graphs stay few: packed rows to ``max_seq_len``
(one shape, which compiled flex attention needs) or to a multiple of ``pad_to_multiple_of``, plain
rows to that multiple; always to a multiple of ``num_output_chunks``, so every rank calls the chunked
output projection the same number of times. Every sample's first label is ignored: in a packed row
the (shifted) label of a sample's last token would otherwise be the next sample's first token;
unpacked, that label is never predicted anyway. Tiles are padded to the batch's largest tile count
and normalised last, or left uint8 (``normalize=False``) for a consumer that normalises on the
device (the recipe): a quarter of the bytes to copy, and the loader's largest host cost (the float
conversion) moves to the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from docev.data.transform import expand_placeholders
from docev.models.docev._attention import attended_pairs
from docev.vision.geometry import num_image_tokens
from docev.vision.tiling import normalize


class DocEVCollate:
    def __init__(
        self,
        *,
        image_token_id: int,
        pad_id: int,
        tile_size: int,
        patch_size: int,
        min_num_tiles: int,
        max_num_tiles: int,
        max_seq_len: int,
        mean: Sequence[float],
        std: Sequence[float],
        dtype: torch.dtype = torch.float32,
        packed: bool = False,
        normalize: bool = True,
        pad_to_multiple_of: int | None = None,
        num_output_chunks: int = 1,
    ):
        self.image_token_id, self.pad_id = image_token_id, pad_id
        self.geometry = {"tile_size": tile_size, "patch_size": patch_size,
                         "min_num_tiles": min_num_tiles, "max_num_tiles": max_num_tiles}  # fmt: skip
        self.max_seq_len, self.mean, self.std = max_seq_len, tuple(mean), tuple(std)
        self.dtype, self.packed, self.normalize = dtype, packed, normalize
        self.pad_to_multiple_of, self.num_output_chunks = pad_to_multiple_of, num_output_chunks

    def padded_length(self, longest: int) -> int:
        """The batch's S for its longest row: see the module docstring."""
        target = self.max_seq_len if self.packed and self.pad_to_multiple_of is None else longest
        multiple = math.lcm(self.pad_to_multiple_of or 1, self.num_output_chunks)
        return -(-target // multiple) * multiple

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """What ``normalize=True`` does in the collate, for uint8 pixels already on the device."""
        return normalize(pixels, self.mean, self.std, self.dtype)

    def row_length(self, sample: dict[str, Any]) -> int:
        """Tokens of ``sample``'s row once its placeholders are expanded at its ratio (what a batch lays out):
        generation groups prompts of similar length so a batch pads little."""
        return len(self._expand(sample, sample["ratio"])[0])

    def _expand(self, sample: dict[str, Any], ratio: int) -> tuple[list[int], list[int]]:
        counts = [num_image_tokens(h, w, ratio, **self.geometry) for h, w in sample["image_sizes"]]
        tokens, labels = expand_placeholders(sample["tokens"], sample["loss_mask"], self.image_token_id, counts)
        labels[0] = CROSS_ENTROPY_IGNORE_IDX
        return tokens, labels

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        ratio = samples[0]["ratio"]
        if ratio is None or any(s["ratio"] != ratio for s in samples):
            raise ValueError(f"a batch needs one sampling ratio, got {sorted({s['ratio'] for s in samples})}")
        rows: dict[int, list[tuple[list[int], list[int]]]] = {}
        row_ids: dict[int, list[str]] = {}
        for s in samples:
            key = s["row"] if self.packed else len(rows)
            rows.setdefault(key, []).append(self._expand(s, ratio))
            row_ids.setdefault(key, []).append(s["id"])
        lengths = [sum(len(t) for t, _ in docs) for docs in rows.values()]
        too_long = [(ids, n) for ids, n in zip(row_ids.values(), lengths, strict=True) if n > self.max_seq_len]
        if too_long:
            raise ValueError(f"rows longer than max_seq_len {self.max_seq_len} at ratio {ratio}: {too_long}")
        b, s_len = len(rows), self.padded_length(max(lengths))
        tokens = torch.full((b, s_len), self.pad_id, dtype=torch.long)
        labels = torch.full((b, s_len), CROSS_ENTROPY_IGNORE_IDX, dtype=torch.long)
        batch: dict[str, Any] = {"mask": None, "input_pos": None, "document_ids": None}
        if self.packed:  # padding is one more document: it attends to itself, never to a sample
            document_ids = torch.full((b, s_len), -1, dtype=torch.int32)
            input_pos = torch.zeros(b, s_len, dtype=torch.long)
        for i, docs in enumerate(rows.values()):
            start = 0
            for d, (t, lab) in enumerate(docs):
                n = len(t)
                tokens[i, start : start + n] = torch.tensor(t)
                labels[i, start : start + n] = torch.tensor(lab)
                if self.packed:
                    document_ids[i, start : start + n] = d
                    input_pos[i, start : start + n] = torch.arange(n)
                start += n
        if self.packed:
            batch.update(document_ids=document_ids, input_pos=input_pos)
        images = [im for s in samples for im in s["images"]]
        if images:
            t = self.geometry["tile_size"]
            max_tiles = max(im.plan.num_tiles for im in images)
            pix = torch.empty(len(images), max_tiles, 3, t, t, dtype=torch.uint8)
            for k, im in enumerate(images):
                im.pixels(t, out=pix[k, : im.plan.num_tiles])
                pix[k, im.plan.num_tiles :] = 0
            batch["pixel_values"] = self.normalize_pixels(pix) if self.normalize else pix
            batch["image_sizes"] = torch.tensor([hw for s in samples for hw in s["image_sizes"]], dtype=torch.long)
            batch["image_grids"] = torch.tensor([g for s in samples for g in s["image_grids"]], dtype=torch.long)
        else:
            batch.update(pixel_values=None, image_sizes=None, image_grids=None)
        batch.update(
            tokens=tokens, labels=labels, sampling_ratio=ratio, sample_ids=[s["id"] for s in samples],
            row_lengths=lengths, num_tokens=sum(lengths),
            num_loss_tokens=int((labels[:, 1:] != CROSS_ENTROPY_IGNORE_IDX).sum()),
            attention_pairs=sum(attended_pairs([len(t) for t, _ in docs]) for docs in rows.values()),  # for MFU
        )  # fmt: skip
        return batch
