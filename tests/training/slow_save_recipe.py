"""The real recipe, run by torchrun in the kill-during-save tests, with one checkpoint write held open.

On the rank ``SLOW_SAVE_RANK``, once the weights of ``step_{SLOW_SAVE_STEP}`` are written into its
partial folder (by safetensors for the hf format, by DCP's file writer for dcp, in the background
thread when async), the writer touches ``SLOW_SAVE_MARKER`` and sleeps: the test kills that rank
while its save is in progress.
"""

import os
import sys
import time
from pathlib import Path

from torch.distributed.checkpoint import filesystem

from docev.models.docev import _folder
from docev.training import recipe

STEP, RANK, MARKER = (os.environ[k] for k in ("SLOW_SAVE_STEP", "SLOW_SAVE_RANK", "SLOW_SAVE_MARKER"))
PARTIAL = f".step_{STEP}.partial"


def _hold(folder: Path) -> None:
    if folder.name == PARTIAL and os.environ["RANK"] == RANK:
        Path(MARKER + ".tmp").write_text(str(os.getpid()))
        os.replace(MARKER + ".tmp", MARKER)  # the test reads a complete pid
        time.sleep(300)


_save_file = _folder.save_file


def save_file(tensors, filename, metadata=None):
    _save_file(tensors, filename, metadata=metadata)
    _hold(Path(filename).parent)


_write_data = filesystem._FileSystemWriter.write_data


def write_data(self, plan, planner):
    written = _write_data(self, plan, planner)
    written.wait()
    _hold(Path(self.path))
    return written


_folder.save_file = save_file
filesystem._FileSystemWriter.write_data = write_data

if __name__ == "__main__":
    sys.exit(recipe.main())
