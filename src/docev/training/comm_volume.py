"""Counting collectives: what FSDP sends per micro-batch, in bytes and by process group.

``CollectiveCounter`` is a ``TorchDispatchMode`` (what torch's ``CommDebugMode`` is built on) that records each
c10d collective with its tensor bytes and the global ranks of its group, so a test or ``benchmarks/comm_volume.py``
can say which collectives ran, how large they were and whether they cross nodes. Bytes are the payload of the
whole (unsharded) tensor: the all-gather's output, the reduce-scatter's input, the all-reduce's tensor; a ring
moves ``(n-1)/n`` of that per rank (twice for all-reduce), see ``bus_bytes``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

_KINDS = {
    "_allgather_base_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather",
    "allgather_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "reduce_scatter_": "reduce_scatter",
    "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce",
    "broadcast_": "broadcast",
}


@dataclass(frozen=True)
class Collective:
    kind: str  # all_gather | reduce_scatter | all_reduce | broadcast
    ranks: tuple[int, ...]  # global ranks of the group
    nbytes: int  # payload: the unsharded tensor (see the module docstring)

    def crosses_nodes(self, ranks_per_node: int) -> bool:
        return len({r // ranks_per_node for r in self.ranks}) > 1

    def bus_bytes(self) -> float:
        """Bytes one rank sends in a ring implementation of this collective."""
        n = len(self.ranks)
        return self.nbytes * (n - 1) / n * (2 if self.kind == "all_reduce" else 1)


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, list | tuple):
        return sum(_nbytes(t) for t in x)
    return 0


def _group(args) -> dist.ProcessGroup | None:
    """The op's process group (a boxed ``ScriptObject`` at the dispatcher, as torch's fake collectives unbox it)."""
    for a in args:
        if isinstance(a, dist.ProcessGroup):
            return a
        if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type()):
            return dist.ProcessGroup.unbox(a)
    return None


class CollectiveCounter(TorchDispatchMode):
    """Records the c10d collectives issued on this thread while active (``with CollectiveCounter() as c:``)."""

    def __init__(self) -> None:
        super().__init__()
        self.collectives: list[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _KINDS.get(func._overloadpacket.__name__) if func.namespace == "c10d" else None
        if kind is not None:
            group = _group(args)
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else ()
            # the larger side is the unsharded tensor: gathered output, scattered input, reduced tensor
            payload = max(_nbytes(args[0]), _nbytes(args[1]) if len(args) > 1 else 0)
            self.collectives.append(Collective(kind, ranks, payload))
        return func(*args, **kwargs)

    def bytes_by_kind(self) -> Counter:
        out: Counter = Counter()
        for c in self.collectives:
            out[c.kind] += c.nbytes
        return out
