"""Checkpoint I/O of the recipe's CheckpointManager: a ~300M-parameter DocEV on 2 CPU ranks (torchrun, gloo).

For each of ``hf`` (model + optimizer gathered to rank 0, which writes), ``dcp`` (every rank writes
its own shards) and ``dcp`` with ``enable_async_checkpointing`` it measures, per rank:

- **blocked**: the wall time one save adds to the training loop: (the ``save`` call + the next
  training step) − a training step without a save. The step is a real text-only forward/backward/AdamW
  step in the recipe's order, so an async save's host copy overlaps the forward/backward and only what
  the step then waits for (``wait_for_staging`` before the optimizer step), plus what the copy slows
  the step down on shared cores, counts. **call**: the ``save`` call alone; **total**: from the call
  until the folder is published (``latest`` moved), the next step included;
- **RSS growth**: how far the process's resident memory rises above its RSS before the save during a
  save run alone, to publication (``VmHWM`` reset with ``/proc/self/clear_refs`` first; the timed saves
  run beside a training step, whose activations would blur it). The rank's share of the state (its
  model + optimizer shards) is resident before; the growth is what the save adds to it;
- **bytes written** by the rank, extrapolated to the preview (11.4B) on 16 GPUs from a meta-device
  count of its parameters with the preview config's trainable groups;
- **digest**: the time this rank spent hashing the files it wrote (XXH3-128 of every file, recorded in
  the step folder's ``checkpoint_manifest.json``; for async, in the background writer), summed over
  the timed save, and its share of the save call (sync: it returns once the folder is published) or
  of the time from the call to publication (async: hashed in the writer thread, the loop never waits).

The model is the DocEV builder at wider widths than ``tiny`` (decoder dim 1024, 20 layers, vocab 32k; a small
frozen vision tower) sharded with the recipe's layout (``apply_fsdp``: decoder layers, embedding and output
projection sharded, the frozen tower replicated on every rank), built in bf16 with AdamW state in bf16
(``master_dtype: bf16``; fp32 master weights double every byte figure, which the extrapolation prints too). Weights
are random: the I/O does not depend on their values. The step folder's ``config.json`` comes from a base folder
written here (``config.json`` + an empty weights file: the checkpointer copies side files from it).
Targets: rank 0's peak RSS under DCP stays within its share of the state plus a fixed buffer (the
growth stays a buffer, where HF's adds the full state), and async blocks the loop for ≤ 10% of a
sync DCP save.
Each mode runs in its own torchrun launch (so one mode's freed memory does not hide another's peak);
``--saves`` rounds per launch (one save for memory, one timed), the last round reported (the first
warms the file system and the allocator).
Memory: ~2 GiB per rank for the state, ~3 GiB on rank 0 during the hf save.

    .venv/bin/python benchmarks/checkpoint_io.py [--layers 20] [--dim 1024] [--saves 2] [--modes hf,dcp,dcp_async]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
MODES = {
    "hf": ["checkpoint_format=hf"],
    "dcp": ["checkpoint_format=dcp"],
    "dcp_async": ["checkpoint_format=dcp", "enable_async_checkpointing=true"],
}
GIB = 2**30


def bench_arch(dim: int, layers: int):
    from docev.models.docev import tiny

    return replace(tiny(), vocab_size=32000, dim=dim, layers=layers, heads=16, kv_heads=8, mlp=int(dim * 2.75))


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


# ------------------------------------------------------------------------------------------------
# one rank (under torchrun)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torchtune import training

    from docev.config import load_config
    from docev.models.docev import DocEVCheckpointer, docev, materialize
    from docev.run import digests as _digests
    from docev.training.checkpoint_manager import CheckpointManager
    from docev.training.parallelize import apply_fsdp, mixed_precision_policy
    from docev.training.state import Progress

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    hashing = [0.0]  # seconds this rank spent digesting files (writer thread included)
    file_digest = _digests.file_digest

    def timed_digest(path):
        t0 = time.perf_counter()
        try:
            return file_digest(path)
        finally:
            hashing[0] += time.perf_counter() - t0

    _digests.file_digest = timed_digest
    baseline, _ = _rss()  # the process before any state: interpreter, libraries, process group
    torch.manual_seed(rank)
    out = Path(args.work) / args.mode
    overrides = [
        f"output_dir={out}",
        f"tokenizer.model_name_or_path={args.base}",
        "synthetic=null",
        'datasets=[{"source": "none"}]',
        "keep_last_n_checkpoints=2",
        *MODES[args.mode],
    ]
    cfg = load_config(CONFIG, overrides)
    with training.set_default_dtype(torch.bfloat16), torch.device("meta"):
        model = docev(bench_arch(args.dim, args.layers))
    # the recipe's layout: decoder layers, embedding and output projection sharded, the frozen tower replicated
    apply_fsdp(model, mixed_precision_policy(torch.bfloat16, torch.bfloat16))
    materialize(model, "cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    manager = CheckpointManager(
        cfg, OmegaConf.create(cfg.to_dict()["checkpointer"]), out / "checkpoints", torch.device("cpu")
    )
    manager.checkpointer = DocEVCheckpointer(args.base, checkpoint_files=["model.safetensors"],
                                             output_dir=out / "checkpoints")  # fmt: skip
    manager.checkpointer.unused = {}
    progress = Progress(cfg.seed, world)  # the recipe state a save writes: the step (a recipe holds more pieces)
    manager.attach(model, optimizer)
    manager.resume(progress=progress)
    tokens = torch.randint(0, 32000, (1, args.seq_len), generator=torch.Generator().manual_seed(rank))

    def train_step() -> float:
        """One text-only step as the recipe orders it: forward, backward, wait for staging, AdamW."""
        t0 = time.perf_counter()
        model(tokens).float().square().mean().backward()
        manager.wait_for_staging()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    train_step()  # the AdamW state at full size
    plain = min(train_step() for _ in range(2))
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())
    local += sum(t.to_local().numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if hasattr(t, "to_local"))  # fmt: skip
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    full += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())

    result, growth = {}, 0
    for i in range(1, args.saves + 1):
        # memory: a save alone (the step's activations would blur the peak), VmHWM reset to the current RSS
        dist.barrier()
        Path("/proc/self/clear_refs").write_text("5")
        before, _ = _rss()
        progress.step = 2 * i - 1
        manager.save(progress.step, wait=True)
        growth = max(growth, _rss()[1] - before)
        # time: the save and the training step after it
        dist.barrier()
        hashing[0] = 0.0
        t0 = time.perf_counter()
        progress.step = 2 * i
        manager.save(progress.step)
        call = time.perf_counter() - t0
        train_step()  # an async save's copy and write overlap it
        blocked = time.perf_counter() - t0 - plain
        manager.wait()
        total = time.perf_counter() - t0
        folder = out / "checkpoints" / f"step_{2 * i}"
        dist.barrier()
        if args.mode == "hf":
            written = sum(f.stat().st_size for f in folder.iterdir()) if rank == 0 else 0
        else:
            written = (folder / f"__{rank}_0.distcp").stat().st_size
        result = {"rank": rank, "call_s": call, "blocked_s": blocked, "total_s": total, "step_s": plain,
                  "rss_baseline": baseline, "rss_growth": growth, "share_bytes": local, "full_bytes": full,
                  "written_bytes": written, "digest_s": hashing[0]}  # fmt: skip
    manager.close()
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(args.result).write_text(json.dumps(gathered))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# driver


def preview_state_bytes() -> dict[str, int]:
    """Bytes of model + AdamW state at preview size with the preview config's trainable groups."""
    import torch

    from docev.config import load_config
    from docev.models.docev import docev, preview

    model_cfg = load_config(CONFIG.with_name("docev_preview.yaml")).model
    with torch.device("meta"):
        m = docev(
            preview(),
            decoder_trainable=model_cfg.decoder_trainable,
            encoder_trainable=model_cfg.encoder_trainable,
            fusion_trainable=model_cfg.fusion_trainable,
        )
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen,
            "bf16": 2 * frozen + 6 * trainable,  # bf16 weights + two bf16 moments
            "fp32": 4 * frozen + 12 * trainable}  # fp32 master weights + two fp32 moments  # fmt: skip


def write_base(base: Path, arch) -> None:
    from safetensors.torch import save_file

    from docev.models.docev import hf_config

    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps(hf_config(arch), indent=2))
    save_file({}, str(base / "model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--saves", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32, help="tokens of the training step around each save")
    parser.add_argument("--modes", default="hf,dcp,dcp_async")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    from docev.models.docev import docev

    arch = bench_arch(args.dim, args.layers)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in docev(arch).parameters())
    print(f"model: DocEV decoder dim {args.dim} × {args.layers} layers, {n_params / 1e6:.0f}M parameters, bf16; "
          "2 CPU ranks (gloo)")  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory(prefix="ckpt_io_", dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        write_base(work / "base", arch)
        for mode in args.modes.split(","):
            res = work / f"{mode}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                   "--nproc_per_node", "2", __file__, "--worker", "--mode", mode, "--work", str(work),
                   "--base", str(work / "base"), "--result", str(res), "--dim", str(args.dim),
                   "--layers", str(args.layers), "--saves", str(args.saves),
                   "--seq-len", str(args.seq_len)]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            results[mode] = json.loads(res.read_text())

    print(f"\none training step without a save: {results[next(iter(results))][0]['step_s']:.2f} s (rank 0)")
    print(f"\n{'mode':<10} {'rank':>4} {'call s':>7} {'blocked s':>10} {'total s':>8} {'RSS growth':>11} "
          f"{'share':>8} {'full':>8} {'written':>9}   (memory in GiB)")  # fmt: skip
    for mode, ranks in results.items():
        for r in ranks:
            print(f"{mode:<10} {r['rank']:>4} {r['call_s']:>7.2f} {r['blocked_s']:>10.2f} {r['total_s']:>8.2f} "
                  f"{r['rss_growth'] / GIB:>11.2f} {r['share_bytes'] / GIB:>8.2f} {r['full_bytes'] / GIB:>8.2f} "
                  f"{r['written_bytes'] / GIB:>9.2f}")  # fmt: skip

    print()
    if "dcp" in results and "dcp_async" in results:
        sync, asy = results["dcp"][0], results["dcp_async"][0]
        print(f"async save call {asy['call_s']:.2f} s vs sync dcp {sync['call_s']:.2f} s: "
              f"{asy['call_s'] / sync['call_s']:.1%} (target ≤ 10%)")  # fmt: skip
        print(f"with the next step on the same cores: {asy['blocked_s']:.2f} s vs {sync['blocked_s']:.2f} s: "
              f"{asy['blocked_s'] / sync['blocked_s']:.1%}")  # fmt: skip
    for mode in ("dcp", "dcp_async", "hf"):
        if mode in results:
            r0 = results[mode][0]
            g = r0["rss_growth"]
            print(f"{mode}: rank 0 RSS grows by {g / GIB:.2f} GiB during a save = {g / r0['share_bytes']:.2f}× its "
                  f"share, {g / r0['full_bytes']:.2f}× the full state (resident before: its share)")  # fmt: skip
    for mode, ranks in results.items():
        r = max(ranks, key=lambda r: r["digest_s"])  # the rank that hashed the most: the save waits for it
        if mode == "dcp_async":  # hashed in the writer thread: the loop never waits for it
            share, of = r["digest_s"] / r["total_s"], f"call to publication {r['total_s']:.2f} s, a step overlapped"
        else:  # the save call returns once the folder is published
            share, of = r["digest_s"] / r["call_s"], f"the save call {r['call_s']:.2f} s"
        print(
            f"{mode}: digests took {r['digest_s']:.2f} s on rank {r['rank']} = {share:.1%} of {of}; "
            f"{r['written_bytes'] / max(r['digest_s'], 1e-9) / GIB:.1f} GiB/s hashed"
        )
    if "hf" in results and "dcp" in results:
        print(f"sync save time, hf / dcp: {results['hf'][0]['total_s'] / results['dcp'][0]['total_s']:.2f}")

    preview = preview_state_bytes()
    print(f"\npreview (11.4B: {preview['trainable'] / 1e9:.2f}B trainable, {preview['frozen'] / 1e9:.2f}B frozen), "
          "bytes written per save per rank at 16 GPUs:")  # fmt: skip
    for mode in ("dcp", "hf"):
        if mode not in results:
            continue
        ranks = results[mode]
        overhead = sum(r["written_bytes"] for r in ranks) / ranks[0]["full_bytes"]  # files / state (metadata, index)
        for dtype in ("bf16", "fp32"):
            total = preview[dtype] * overhead
            per_rank = total / 16 if mode == "dcp" else total
            who = "each of 16 ranks" if mode == "dcp" else "rank 0 alone (the others write nothing)"
            state = preview[dtype] / 1e9
            print(f"  {mode:<4} master {dtype}: {per_rank / 1e9:7.1f} GB by {who} (state {state:.1f} GB, "
                  f"files/state measured {overhead:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
