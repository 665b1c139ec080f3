"""Host memory per rank while the recipe fills its sharded model from an HF base checkpoint: rows per rank
(``DocEVCheckpointer.open_checkpoint`` → ``docev.training.load.fill_model``, the recipe's path) vs the full read
it replaced (``load_checkpoint``'s whole state dict through torchtune's ``load_from_full_model_state_dict`` on
every rank), at 1, 2 and 4 CPU ranks (torchrun, gloo).

The checkpoint is written here: the DocEV builder at wider widths than ``tiny`` (decoder dim 1024, 8 layers, vocab
32k; a small vision tower), random weights in bf16 as the released base is stored (~320 MB of safetensors in
~100 MB files). Both sides run the recipe's ``load_model_state`` on the same model, built on the meta device and
sharded as the recipe shards it (full sharding, fp32 master weights, bf16 compute: the frozen tower replicated in
bf16), and differ only in what they hand it: the lazy rows, or the full state dict with torchtune's fill. Each
(side, ranks) runs in its own torchrun launch, so one run's freed memory does not hide another's peak.

Per rank: **growth** = ``VmHWM`` after the load − ``VmRSS`` before it (``VmHWM`` reset with
``/proc/self/clear_refs`` just before the load, after building and sharding the meta model; file pages the
safetensors reader maps count on both sides); **kept** = the bytes of the rank's parameters (its shards in fp32,
the replicated tower in bf16), the floor any load must reach. The ratio is old growth / new growth of the rank
that grew most.

    .venv/bin/python benchmarks/load_memory.py [--ranks 1 2 4] [--dim 1024] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

MIB = 2**20
SIDES = ("old", "new")


def bench_arch(dim: int, layers: int):
    from docev.models.docev import tiny

    return replace(tiny(), vocab_size=32000, dim=dim, layers=layers, heads=16, kv_heads=8, mlp=int(dim * 2.75))


def _status() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def write_checkpoint(folder: Path, arch) -> int:
    """A DocEV HF folder of random bf16 weights (config.json + sharded safetensors); returns its weight bytes."""
    import torch

    from docev.assets import init_weights
    from docev.models.docev import hf_config
    from docev.models.docev._folder import save_sharded

    folder.mkdir(parents=True)
    weights = {k: v.to(torch.bfloat16) for k, v in init_weights(arch, seed=0).items()}
    save_sharded(weights, folder, max_shard_bytes=100 * 10**6)
    (folder / "config.json").write_text(json.dumps(hf_config(arch), indent=2))
    return sum(t.numel() * t.element_size() for t in weights.values())


# ------------------------------------------------------------------------------------------------
# one rank (under torchrun)


def old_fill(model, state_dict, device) -> None:
    """The load this replaced: every rank hands torchtune the whole checkpoint (read, then cast to fp32)."""
    from torchtune import training

    training.load_from_full_model_state_dict(model, state_dict, device, strict=True)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torchtune import training

    from docev.models.docev import DocEVCheckpointer, docev
    from docev.training.parallelize import load_model_state, parallelize_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    device = torch.device("cpu")
    with training.set_default_dtype(torch.float32), torch.device("meta"):
        model = docev(bench_arch(args.dim, args.layers))
    parallelize_model(model, compute_dtype=torch.bfloat16, master_dtype=torch.float32)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status()["VmRSS"]
    checkpointer = DocEVCheckpointer(args.checkpoint)
    if args.side == "old":
        state = checkpointer.load_checkpoint()["model"]
        load_model_state(model, state, device, torch.bfloat16, fill=old_fill)
    else:
        state = checkpointer.open_checkpoint()["model"]
        load_model_state(model, state, device, torch.bfloat16)
    after = _status()
    kept = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        kept += local.numel() * local.element_size()
    result = {"rank": rank, "before": before, "peak": after["VmHWM"], "growth": after["VmHWM"] - before, "kept": kept}
    del state
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(args.result).write_text(json.dumps(gathered))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# driver


def run(checkpoint: Path, side: str, ranks: int, work: Path, args: argparse.Namespace) -> list[dict]:
    result = work / f"{side}_{ranks}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
           str(ranks), __file__, "--worker", "--side", side, "--checkpoint", str(checkpoint), "--result", str(result),
           "--dim", str(args.dim), "--layers", str(args.layers)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    arch = bench_arch(args.dim, args.layers)
    with tempfile.TemporaryDirectory(prefix="load_mem_", dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        size = write_checkpoint(work / "base", arch)
        print(f"checkpoint: DocEV decoder dim {args.dim} × {args.layers} layers, {size / 2 / 1e6:.0f}M parameters, "
              f"{size / MIB:.0f} MiB of bf16 safetensors; fp32 master, bf16 compute; CPU ranks (gloo)")  # fmt: skip
        results = {(side, n): run(work / "base", side, n, work, args) for n in args.ranks for side in SIDES}

    print(f"\n{'ranks':>5} {'side':<4} {'rank':>4} {'kept MiB':>9} {'growth MiB':>11} {'peak RSS MiB':>13}")
    for (side, n), ranks in results.items():
        for r in ranks:
            print(f"{n:>5} {side:<4} {r['rank']:>4} {r['kept'] / MIB:>9.0f} {r['growth'] / MIB:>11.0f} "
                  f"{r['peak'] / MIB:>13.0f}")  # fmt: skip
    print("\n| ranks | kept per rank | old: growth per rank (max) | new: growth per rank (max) | old / new |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.ranks:
        old = max(r["growth"] for r in results["old", n])
        new = max(r["growth"] for r in results["new", n])
        kept = max(r["kept"] for r in results["new", n])
        print(f"| {n} | {kept / MIB:.0f} MiB | {old / MIB:.0f} MiB | {new / MIB:.0f} MiB | {old / new:.2f} |")


if __name__ == "__main__":
    main()
