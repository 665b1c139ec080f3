"""Bytes each rank sends per optimizer step, by collective, and how many of them cross nodes: before (the
previous layout: full sharding, the vision tower and the output projection in the root unit, every unit
resharded after forward, reduction every micro-batch) and after (``docev.training.parallelize``: hybrid across
nodes, frozen tower replicated, output projection its own unit, cross-node reduction on the last micro-batch).

How it is measured. Four CPU ranks (gloo) train two micro-batches of a reduced DocEV (1 decoder layer, 2
vision layers, 1/8 of the released widths, 1088 vocabulary rows) under each layout -- 1 × 4 for full
sharding, 2 × 2 for hybrid -- and ``CollectiveCounter`` records every c10d collective: kind, group, payload.
(At full width the four ranks move ~1.5 GB each per micro-batch through gloo on loopback, which the shared
2-core box could not finish in 15 minutes; what FSDP sends is set by the unit plan, not by the widths, and
tests/training/test_sharding.py checks that every payload equals its unit's padded size.) Each payload is
attributed to the FSDP unit it moves (decoder layer, embedding/output, root) by its size, then extrapolated:
the unit's size at preview scale (48 layers, 27 vision layers, 4096 / 14336 / 1152 wide, 64064 vocabulary
rows, from the model built on the meta device), the ring cost
``(n-1)/n`` (twice for all-reduce) for the group size ``n`` of the target mesh, and micro-batches: the first
``gradient_accumulation_steps - 1`` like the counted first one, the last like the counted last one.
"Cross-node" counts the bytes that leave a node, the same way on both sides: in a ring over a group laid out
node by node, a rank sends each byte to the next rank, so of a node's ``per_node`` ranks only the last sends
to another node — full sharding over several nodes puts ``1/per_node`` of each rank's bytes (on average) on
the wire between nodes; hybrid's all-reduce runs over one rank per node, so all of its bytes do, and its
all-gathers and reduce-scatters stay in the node. (An earlier version counted every byte of a collective whose
group spans nodes as cross-node for full sharding, which overstated the "before" row ``per_node``-fold.)
Bytes in the config's precision, as the recipe trains: with the preview's
``dtype: bf16`` and ``master_dtype: fp32`` FSDP2 all-gathers bf16 parameters and reduces fp32 gradients. The
counted run is all bf16 (which collectives run and which units they move do not depend on the dtype;
tests/training/test_sharding.py checks on real runs that the mixed policy gathers half and reduces the same
bytes as fp32), and each payload is scaled by the element size of its side. (Counting under the mixed policy
itself fails for the "before" layout: FSDP2 asserts on a root unit whose image-less micro-batch leaves fp32
zero gradients next to bf16 ones.)

    .venv/bin/python benchmarks/comm_volume.py --config configs/docev_preview.yaml --nnodes 1 2 4 --gpus-per-node 8
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import socket
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torchtune.modules.loss import CEWithChunkedOutputLoss
from torchtune.training.precision import PRECISION_STR_TO_DTYPE

from docev.config import load_config
from docev.models.docev import docev_from_arch, materialize, preview
from docev.training.comm_volume import CollectiveCounter
from docev.training.parallelize import apply_fsdp, build_mesh, sync_gradients

SIM_RANKS, SIM_PER_NODE = 4, 2
REDUCED = {"layers": 1, "vision_layers": 2, "vocab_size": 1024, "dim": 512, "heads": 4, "kv_heads": 1, "mlp": 1792,
           "vision_width": 144, "vision_heads": 2, "vision_mlp": 538}  # fmt: skip
# name: (plan, strategy, gradient_reduction)
SCENARIOS = {
    "before": ("legacy", "full", "every_micro_batch"),
    "full": ("new", "full", "every_micro_batch"),
    "full_last": ("new", "full", "last_micro_batch"),
    "hybrid": ("new", "hybrid", "every_micro_batch"),
    "hybrid_across": ("new", "hybrid", "last_micro_batch_across_nodes"),
    "hybrid_last": ("new", "hybrid", "last_micro_batch"),
}
GIB = 2**30
COUNTED_DTYPE = torch.bfloat16


def legacy_plan(model, mp_policy, mesh) -> None:
    """The layout before issue 16: decoder layers and the embedding as units, everything else (the vision
    tower, the output projection) in the root, every unit resharded after forward."""
    for layer in model.decoder.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=mp_policy)
    fully_shard(model.tok_embeddings, mesh=mesh, reshard_after_forward=True, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=mp_policy)


def units(model, plan: str, trainable: bool = False) -> dict[str, int]:
    """Parameter count of each FSDP unit class of ``plan`` (``layer`` is one decoder layer); ``trainable``:
    only parameters with gradients (what reduce-scatter and all-reduce move)."""

    def count(params) -> int:
        return sum(p.numel() for p in params if p.requires_grad or not trainable)

    total = count(model.parameters())
    layer = count(model.decoder.layers[0].parameters())
    layers = layer * len(model.decoder.layers)
    embed = count(model.tok_embeddings.parameters())
    out = {"layer": layer, "embedding": embed}
    if plan == "legacy":
        out["root"] = total - layers - embed
        return out
    output = count(model.decoder.output.parameters())
    tower = count(model.encoder.parameters())  # frozen: replicated, in no unit
    out.update(output=output, root=total - layers - embed - output - tower)
    return out


def _batch() -> dict:
    """A 64-token text micro-batch. Which collectives FSDP issues, and their sizes, do not depend on the
    batch (the root holds the connector either way; the frozen tower is gathered in the root before, not at
    all after), so no image is run."""
    gen = torch.Generator().manual_seed(0)
    return {"tokens": torch.randint(0, 1000, (1, 64), generator=gen),
            "labels": torch.randint(0, 1000, (1, 64), generator=gen)}  # fmt: skip


def _count(rank: int, plan: str, strategy: str, reduction: str) -> list[list[tuple]]:
    arch = replace(preview(), **REDUCED)
    torch.manual_seed(0)
    with torch.device("meta"), _default_dtype(COUNTED_DTYPE):
        model = docev_from_arch(arch)
    model.set_num_output_chunks(8)
    mesh = build_mesh(strategy, world_size=SIM_RANKS, ranks_per_node=SIM_PER_NODE, device_type="cpu")
    (legacy_plan if plan == "legacy" else apply_fsdp)(model, MixedPrecisionPolicy(), mesh)
    materialize(model, "cpu")
    batch, loss_fn, counted = _batch(), CEWithChunkedOutputLoss(), []
    for micro in range(2):
        sync_gradients(model, reduction, last=micro == 1, hybrid=strategy == "hybrid")
        with CollectiveCounter() as counter:
            loss_fn(model(batch["tokens"]), batch["labels"]).backward()
        counted.append([(c.kind, c.ranks, c.nbytes) for c in counter.collectives])
    del model
    gc.collect()
    return counted


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(SIM_RANKS))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {name: _count(rank, *spec) for name, spec in SCENARIOS.items()}
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0])
    dist.all_reduce(peak)
    if rank == 0:
        torch.save({"counted": results, "peak_rss_bytes": peak.item(), "dtype": str(COUNTED_DTYPE)}, out)
    dist.destroy_process_group()


def _attribute(kind: str, nbytes: int, sizes: dict[str, int], shard: int) -> str:
    """The unit class a counted payload moves: the closest unit size (an all-reduce moves one shard of it)."""
    n = nbytes / COUNTED_DTYPE.itemsize * (shard if kind == "all_reduce" else 1)
    name, size = min(sizes.items(), key=lambda kv: abs(kv[1] - n))
    if abs(size - n) > 0.02 * size:
        raise RuntimeError(f"{kind} of {nbytes} bytes matches no unit ({sizes})")
    return name


def extrapolate(counted, plan: str, strategy: str, nnodes: int, per_node: int, ga: int,
                itemsize: dict[bool, int]) -> dict[str, float]:  # fmt: skip
    """Bytes per rank per optimizer step at nnodes × per_node, by collective, plus ``cross_node``; ``itemsize``:
    bytes per element of parameters (False) and gradients (True) on the wire."""
    arch_small, arch_full = replace(preview(), **REDUCED), preview()
    with torch.device("meta"):
        small_model, full_model = docev_from_arch(arch_small), docev_from_arch(arch_full)
    sizes = {grads: (units(small_model, plan, grads), units(full_model, plan, grads)) for grads in (False, True)}
    layer_factor = arch_full.layers / arch_small.layers
    hybrid = strategy == "hybrid" and nnodes > 1
    shard_n = per_node if hybrid else nnodes * per_node
    sim_shard = SIM_PER_NODE if strategy == "hybrid" else SIM_RANKS
    out: dict[str, float] = defaultdict(float)
    for micro, events in enumerate(counted):
        repeat = ga - 1 if micro == 0 else 1
        for kind, _ranks, nbytes in events:
            grads = kind != "all_gather"
            small, full = sizes[grads]  # gradients: trainable parameters only
            unit = _attribute(kind, nbytes, small, sim_shard)
            payload = full[unit] * itemsize[grads] * (layer_factor if unit == "layer" else 1)
            if kind == "all_reduce":
                if not hybrid:  # one node: the replicate group has one rank, nothing to reduce
                    continue
                # one rank per node in the ring: every byte sent goes to another node
                sent, leaves = payload / shard_n * 2 * (nnodes - 1) / nnodes, 1.0
            else:
                # a ring over nnodes × per_node ranks (full sharding): one link in per_node leaves the node
                sent, leaves = payload * (shard_n - 1) / shard_n, 1 / per_node if nnodes > 1 and not hybrid else 0.0
            out[kind] += sent * repeat
            out["cross_node"] += sent * repeat * leaves
    return out


def _fmt(x: float) -> str:
    return f"{x / GIB:9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/docev_preview.yaml")
    parser.add_argument("--nnodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--counted", type=Path, help="keep the counted collectives here (reused when present)")
    args = parser.parse_args()
    cfg = load_config(args.config)
    ga = cfg.gradient_accumulation_steps
    compute, master = PRECISION_STR_TO_DTYPE[cfg.dtype], PRECISION_STR_TO_DTYPE[cfg.master_dtype]
    itemsize = {False: compute.itemsize, True: master.itemsize if compute != master else compute.itemsize}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.counted or Path(tmp) / "counted.pt"
        if not out.exists():
            mp.spawn(_worker, args=(port, str(out)), nprocs=SIM_RANKS, join=True)
        data = torch.load(out, weights_only=True)
    counted = data["counted"]
    if data.get("dtype") != str(COUNTED_DTYPE):
        raise SystemExit(f"{out}: not counted by this version of the script (dtype {data.get('dtype')})")
    print(f"counted on {SIM_RANKS} CPU ranks (reduced depth and width); peak RSS of all ranks together: "
          f"{data['peak_rss_bytes'] / GIB:.1f} GiB")  # fmt: skip
    frozen_bytes = {name: sum(n for k, _, n in counted[name][0] if k == "all_gather") for name in counted}
    print(f"all-gathered per micro-batch on the reduced model: before {frozen_bytes['before'] / 2**20:.0f} MiB, "
          f"after {frozen_bytes['hybrid'] / 2**20:.0f} MiB (after, the frozen vision tower is replicated and costs 0 "
          "bytes per micro-batch, and the root and the output projection are gathered once, not twice)")  # fmt: skip
    dname = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    print(f"\nGiB per rank per optimizer step, gradient_accumulation_steps = {ga}, parameters gathered in "
          f"{dname(compute)}, gradients reduced in {dname(master if compute != master else compute)}")  # fmt: skip
    print(f"{'mesh':6} {'layout':44} {'all-gather':>10} {'red-scat':>9} {'all-red':>9} {'total':>9} {'x-node':>9}")
    for nnodes in args.nnodes:
        mesh = f"{nnodes}x{args.gpus_per_node}"
        rows = {"before": "before: full, tower in root, every micro-batch"}
        if nnodes == 1:
            rows.update(full="after: full, every micro-batch", full_last="after: full, last micro-batch")
        else:
            rows.update(hybrid="after: hybrid, every micro-batch",
                        hybrid_across="after: hybrid, cross-node on last micro-batch",
                        hybrid_last="after: hybrid, last micro-batch (+memory)")  # fmt: skip
        base = None
        for name, label in rows.items():
            plan, strategy, _ = SCENARIOS[name]
            b = extrapolate(counted[name], plan, strategy, nnodes, args.gpus_per_node, ga, itemsize)
            total = b["all_gather"] + b["reduce_scatter"] + b["all_reduce"]
            base = base or (total, b["cross_node"])
            x = base[1] / b["cross_node"] if b["cross_node"] and nnodes > 1 else None
            ratio = f"  total ÷{base[0] / total:.1f}" + (f", x-node ÷{x:.{1 if x < 10 else 0}f}" if x else "")
            print(
                f"{mesh:6} {label:44} {_fmt(b['all_gather'])}  {_fmt(b['reduce_scatter'])}"
                f"{_fmt(b['all_reduce'])}{_fmt(total)}{_fmt(b['cross_node'])}{ratio if name != 'before' else ''}"
            )
    print("\nx-node: bytes that leave the rank's node (ring collectives; full sharding across nodes: the node's "
          "last rank sends to the next node, 1/gpus-per-node of the bytes on average).\nMemory of the 'last "
          "micro-batch' rows: every rank holds the unsharded gradients of all trainable parameters between "
          f"micro-batches, in the reduce dtype ({itemsize[True]} bytes each).")  # fmt: skip


if __name__ == "__main__":
    main()
