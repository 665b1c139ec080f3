"""Operations that make the host wait for the device, seen at the dispatcher: a ``TorchDispatchMode`` that
records every ``aten._local_scalar_dense`` (``.item()``, ``.tolist()``, ``int(t)``), ``aten.nonzero``,
``aten.masked_select`` (output sizes that depend on values) and every copy from an accelerator to the host.

On CPU no op waits, but the same ops in the same places would on CUDA, so a CPU test over a training step
proves the hot path free of them; ``gpu_check.sh`` counts them on the GPU too, next to
``torch.cuda.set_sync_debug_mode("warn")``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_VALUE_DEPENDENT = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
}
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as syncs: ...``; ``syncs.counts`` maps an op name (or ``device_to_host``) to
    how often it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _VALUE_DEPENDENT:
            self.counts[str(func.overloadpacket)] += 1
        out = func(*args, **kwargs)
        if func in _COPIES:
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0] if func is torch.ops.aten.copy_.default else out
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.device.type == "cpu":
                self.counts["device_to_host"] += 1
        return out
