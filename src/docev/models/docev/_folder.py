"""The files of a DocEV checkpoint folder (base model, training step or export): which hold weights, which
describe the format, and the HF-convention sharded safetensors writer.

The checkpointer (saving a step) and the export (writing a model folder) copy a folder's *side files*
(tokenizer, processor, template) and write the rest themselves; both ask :func:`side_files`, so they
agree on what a side file is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from docev.models.docev._dcp import DCP_METADATA
from docev.run.checkpoints import LATEST
from docev.run.digests import MANIFEST

INDEX = "model.safetensors.index.json"
# A step folder of an adapter run: the trained tensors (torchtune names) and the adapter settings.
TRAINED_FILE = "trained_model.safetensors"
PEFT_META = "peft.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp")  # .distcp: the shards of a DCP step
# Written by whoever writes the folder (config with its dtype, indexes, DCP metadata, adapter settings, digests).
FORMAT_FILES = frozenset({"config.json", INDEX, "pytorch_model.bin.index.json", DCP_METADATA, PEFT_META, LATEST,
                          MANIFEST})  # fmt: skip


def side_files(folder: Path, skip: Iterable[str] = ()) -> list[Path]:
    """The files of ``folder`` that travel with the weights unchanged (tokenizer, processor, template):
    neither weights (nor optimizer/recipe state) nor format files, nor any name in ``skip``."""
    skipped = FORMAT_FILES | set(skip)
    return sorted(
        p for p in Path(folder).iterdir() if p.is_file() and p.name not in skipped and p.suffix not in WEIGHT_SUFFIXES
    )


def save_sharded(
    tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int, metadata: dict | None = None
) -> list[str]:
    """``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json`` (HF convention)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return files
