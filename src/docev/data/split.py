"""The held-out split: which validated records are evaluation records, decided once, reproducibly.

A record of a training source is held out when ``u(source name, record id, seed) <
eval_fraction``, where ``u`` maps a sha256 to [0, 1). The hash depends on nothing but the record's
identity, so reruns, ``--shard i/n`` fan-out (each part sees other records) and appended data keep
every record on its side, and an id can never be on both sides (duplicates are rejected by the
validate merge before the split). ``eval_records`` caps the held-out records of a source: the first
ones in source order (the validate merge's order) are kept, so appending rows after the existing
ones never moves an existing record. Every record of a top-level ``eval_datasets`` source is held out.

The decision is taken in the validate merge and written into ``validate/manifest.jsonl`` as each
entry's ``split``; preprocess builds ``shards/`` from the ``train`` entries and ``shards/eval/`` from
the ``eval`` entries.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Literal

from docev.config import DatasetSource, DocEVConfig
from docev.sources.readers import source_name

Split = Literal["train", "eval", "unused"]
SPLITS: tuple[Split, ...] = ("train", "eval", "unused")


def all_sources(cfg: DocEVConfig) -> list[DatasetSource]:
    """Training sources then evaluation-only sources: everything validate reads and preprocess encodes."""
    return [*cfg.datasets, *cfg.eval_datasets]


def unit_hash(source: str, record_id: str, seed: int) -> float:
    """A record's position in [0, 1), from its identity alone."""
    digest = hashlib.sha256(f"{source}\0{record_id}\0{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class SplitAssigner:
    """Assigns accepted entries in the validate merge's (stable) order and counts them per source.

    ``unused`` marks a record of an eval-only source past its ``eval_records`` cap: validated, not used."""

    def __init__(self, cfg: DocEVConfig):
        self.seed = cfg.seed
        self.rules: dict[str, tuple[float, int | None]] = {}
        for src in cfg.datasets:
            self.rules[source_name(src)] = (src.eval_fraction, src.eval_records)
        for src in cfg.eval_datasets:
            self.rules[source_name(src)] = (1.0, src.eval_records)
        self.counts: dict[str, Counter[str]] = {name: Counter() for name in self.rules}

    def assign(self, source: str, record_id: str) -> Split:
        fraction, cap = self.rules[source]
        counts = self.counts[source]
        split: Split = "train"
        if fraction > 0 and unit_hash(source, record_id, self.seed) < fraction:
            split = "eval" if cap is None or counts["eval"] < cap else "train"
        if split == "train" and fraction >= 1.0:
            split = "unused"
        counts[split] += 1
        return split

    def summary(self) -> dict[str, dict[str, int]]:
        """Per source: records in each split."""
        return {name: {k: c[k] for k in SPLITS} for name, c in self.counts.items()}
