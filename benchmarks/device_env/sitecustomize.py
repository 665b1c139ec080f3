"""``gpu_check.sh --dry-run`` puts this folder first on PYTHONPATH: Python imports it at start-up (child
processes too: torchrun ranks, dataloader workers) and it makes the packages named in ``GPU_CHECK_BLOCK``
unimportable, as they are on the lent GPU machine, so a top-level import of one fails here first."""

import os
import sys

_BLOCKED = {name for name in os.environ.get("GPU_CHECK_BLOCK", "").split(",") if name}


class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"{name} is not installed on the GPU machine (gpu_check.sh --dry-run)")
        return None


if _BLOCKED:
    sys.meta_path.insert(0, _Absent())
