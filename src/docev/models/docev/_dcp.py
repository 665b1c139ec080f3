"""Reading a ``torch.distributed.checkpoint`` (DCP) ``step_N`` in one process, without a process group.

A DCP step folder (written by ``docev.training.checkpoint_manager``) holds ``.metadata`` and one
``__<rank>_0.distcp`` file per rank with three top-level entries: ``model`` (the torchtune state
dict, each rank's shards), ``optimizer`` (likewise) and ``unused`` (the base checkpoint's tensors the
model has no parameter for, carried through as the HF checkpointer does). Export and generate read
``model`` and ``unused`` only: DCP assembles each tensor from the shards of every rank on CPU and
never touches the optimizer entries.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from docev.run.digests import record_written

DCP_METADATA = ".metadata"
MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"
UNUSED_KEY = "unused"


def is_dcp_folder(folder: str | Path) -> bool:
    return (Path(folder) / DCP_METADATA).is_file()


def read_dcp_model(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The full model (torchtune keys) and the unused HF tensors of a DCP folder, consolidated on CPU."""
    state: dict = {}
    _load_state_dict(
        state,
        storage_reader=FileSystemReader(str(folder)),
        planner=_EmptyStateDictLoadPlanner(keys={MODEL_KEY, UNUSED_KEY}),
        no_dist=True,
    )
    if MODEL_KEY not in state:
        raise ValueError(f"{folder}: the DCP checkpoint has no '{MODEL_KEY}' entry (not a DocEV training checkpoint)")
    return dict(state[MODEL_KEY]), dict(state.get(UNUSED_KEY, {}))


class DigestingWriter(FileSystemWriter):
    """DCP's file writer that hashes each file this rank wrote right after writing it (for async saves, in
    the background writer) and records it beside the file for rank 0's ``seal``."""

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        results = future.wait()  # FileSystemWriter writes before it returns: this future is already done
        folder = Path(self.path)
        for name in sorted({r.storage_data.relative_path for r in results}):
            record_written(folder, name)
        return future
