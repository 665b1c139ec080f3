"""Map-style dataset over preprocessed shards.

Opening checks the shard set against ``manifest.json`` (sha256 per shard, and the config hash and
tokenizer fingerprint of the run that reads them) so a corrupt or stale shard stops training with
a clear error instead of feeding wrong tokens. Files are memory-mapped lazily per process, so
DataLoader workers share pages. Items are token ids + decoded images (uint8, not yet tiled); the
collate writes their tiles straight into the batch buffer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from docev.data.shards import ShardError, ShardFile, Tiling, sha256_file, stored_image


class ShardDataset(Dataset):
    def __init__(
        self,
        shard_dir: str | Path,
        *,
        tile_size: int,
        expect: dict[str, str] | None = None,
        verify_checksums: bool = True,
        verify_share: tuple[int, int] | None = None,
    ):
        """``verify_share=(rank, world_size)``: hash only every world_size-th shard from ``rank`` and list the
        mismatches in ``corrupt`` instead of raising (the ranks then reduce the verdict, so each shard is
        hashed once per run, not once per rank)."""
        self.dir = Path(shard_dir)
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise ShardError(f"{path} not found: run `docev preprocess` first")
        self.manifest = json.loads(path.read_text())
        for key, want in (expect or {}).items():
            if self.manifest[key] != want:
                raise ShardError(
                    f"{path}: shards were built with {key} {self.manifest[key][:12]}…, this run has {want[:12]}…; "
                    "rerun `docev preprocess` for this config (shards are never mixed)"
                )
        self.tile_size = tile_size
        m = self.manifest
        if m["tile_size"] != tile_size:
            raise ShardError(f"{path}: shards were tiled at {m['tile_size']} px, this run uses {tile_size}")
        self.tiling = Tiling(tile_size, m["min_num_tiles"], m["max_num_tiles"], m["resample"])
        self.files = []
        self.corrupt: list[str] = []
        rank, world = verify_share or (0, 1)
        for i, s in enumerate(self.manifest["shards"]):
            f = self.dir / s["file"]
            if not f.is_file():
                raise ShardError(f"{f}: listed in {path} but missing")
            if verify_checksums and i % world == rank and (got := sha256_file(f)) != s["sha256"]:
                self.corrupt.append(
                    f"{f}: sha256 {got[:12]}… does not match the manifest ({s['sha256'][:12]}…): corrupt shard"
                )
                if verify_share is None:
                    raise ShardError(self.corrupt[0])
            self.files.append(ShardFile(f, s["rows"]))
        self.offsets = np.cumsum([0] + [f.num_rows for f in self.files])
        self.ratios = list(self.manifest["ratios"])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _column(self, name: str) -> np.ndarray:
        parts = [f.column(name) for f in self.files]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def lengths(self) -> dict[int, np.ndarray]:
        """Sequence length of every sample per sampling ratio (read from one column per shard)."""
        return {r: self._column(f"len_r{r}") for r in self.ratios}

    def source_indices(self) -> np.ndarray:
        return self._column("source_index")

    def raw(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} outside 0..{len(self) - 1}")
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.files[k].row(index - int(self.offsets[k]))

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict[str, Any]:
        """``key`` is a sample index or the sampler's ``(index, ratio, row)``."""
        index, ratio, row = key if isinstance(key, tuple) else (key, None, 0)
        rec = self.raw(index)
        return {
            "id": rec["id"], "tokens": rec["tokens"], "loss_mask": rec["loss_mask"],
            "images": [stored_image(im, self.tiling) for im in rec["images"]],
            "image_sizes": [(im["height"], im["width"]) for im in rec["images"]],
            "image_grids": [(im["rows"], im["cols"]) for im in rec["images"]],
            "ratio": ratio, "row": row,
        }  # fmt: skip
