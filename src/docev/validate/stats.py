"""Per-source counts and histograms that add up across units, workers and KFP shards."""

from __future__ import annotations

from collections import Counter
from typing import Any

from docev.data.shards import TOKEN_BUCKETS, bucket

SIDE_BUCKETS = (256, 512, 1024, 2048, 4096, 8192)


class SourceStats:
    """Counters for one source. ``merge`` sums another; ``to_dict``/``from_dict`` round-trip through JSON."""

    FIELDS = ("reasons", "image_modes", "image_max_side", "tiles", "tokens")

    def __init__(self) -> None:
        self.read = 0
        self.accepted = 0
        self.rejected = 0
        self.retries = 0  # transient storage faults retried (and survived) while reading this source
        self.reasons: Counter[str] = Counter()
        self.image_modes: Counter[str] = Counter()  # file modes, plus "exif_rotated"
        self.image_max_side: Counter[str] = Counter()
        self.tiles: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()  # "ratio:bucket"

    def add_reject(self, reason: str) -> None:
        self.rejected += 1
        self.reasons[reason] += 1

    def add_accept(self, images: list[Any], tokens: dict[int, int], tiles: list[int]) -> None:
        self.accepted += 1
        for im, n_tiles in zip(images, tiles, strict=True):
            self.image_modes[im.mode] += 1
            if im.rotated:
                self.image_modes["exif_rotated"] += 1
            self.image_max_side[bucket(max(im.size), SIDE_BUCKETS)] += 1
            self.tiles[str(n_tiles)] += 1
        for ratio, n in tokens.items():
            self.tokens[f"{ratio}:{bucket(n, TOKEN_BUCKETS)}"] += 1

    def merge(self, other: SourceStats) -> None:
        self.read += other.read
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.retries += other.retries
        for name in self.FIELDS:
            getattr(self, name).update(getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"read": self.read, "accepted": self.accepted, "rejected": self.rejected,
                               "retries": self.retries}  # fmt: skip
        out["reject_fraction"] = self.rejected / self.read if self.read else 0.0
        out.update({name: dict(sorted(getattr(self, name).items())) for name in self.FIELDS})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceStats:
        s = cls()
        s.read, s.accepted, s.rejected = data["read"], data["accepted"], data["rejected"]
        s.retries = data["retries"]
        for name in cls.FIELDS:
            getattr(s, name).update(data[name])
        return s
