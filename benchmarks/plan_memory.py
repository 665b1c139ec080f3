"""``docev plan-memory`` against what a real run of the tiny model holds on CPU.

For full fine-tuning and LoRA (tiny's projections are too small for NF4 blocks, so no QLoRA here), one
process builds the model for real, runs a forward, a backward and an AdamW step on random tokens at
``--seq`` × ``--batch`` (fp32), and measures:

- parameters, gradients, optimizer state: the bytes of the real tensors after the step;
- activations: the process's resident memory after the forward and loss (the graph alive, the logits
  dropped as the recipe drops them) minus before it; and the bytes the real CPU kernels save for the
  backward (``saved_tensors_hooks`` on the real run, where the plan used meta tensors).

Printed: planned and measured bytes of each part and their ratio, in the same run.

    .venv/bin/python benchmarks/plan_memory.py [--seq 2048] [--batch 8]
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from docev.config import load_config
from docev.models.docev import materialize
from docev.training.memory import arch_of, build_meta, plan

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
LORA = ["model._component_=docev.models.docev.lora_docev_tiny", "model.decoder_trainable=false"]


def _rss() -> int:
    gc.collect()
    return psutil.Process(os.getpid()).memory_info().rss


def measure(cfg, setup: str) -> dict[str, int]:
    torch.manual_seed(0)
    arch = arch_of(cfg)
    model = materialize(build_meta(cfg, arch, setup), "cpu")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokens = torch.randint(0, arch.vocab_size, (cfg.batch_size, cfg.tokenizer.max_seq_len))
    saved: dict[int, int] = {}
    params = {p.untyped_storage()._cdata for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:  # what the real CPU kernels save, for comparison
        if (storage := t.untyped_storage())._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    before = _rss()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
    del logits  # as the recipe does before the backward: what stays is what autograd saved
    activations = _rss() - before
    loss.backward()
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {
        "params": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None),
        "optimizer": sum(t.numel() * t.element_size() for t in state),
        "activations": activations,
        "saved": sum(saved.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--setup", choices=["full", "lora"], help="(internal) measure one setup in this process")
    args = parser.parse_args()
    if args.setup is None:  # each setup in a fresh process: freed memory the allocator keeps would hide growth
        for setup in ("full", "lora"):
            argv = [sys.executable, __file__, "--seq", str(args.seq), "--batch", str(args.batch), "--setup", setup]
            subprocess.run(argv, check=True)
        return
    base = ["synthetic=null", "datasets=[{source: /tmp}]", "dtype=fp32", f"batch_size={args.batch}",
            f"tokenizer.max_seq_len={args.seq}", "enable_activation_checkpointing=false"]  # fmt: skip
    print(f"tiny, fp32, batch {args.batch} × {args.seq} tokens, 1 process; MiB planned / measured (ratio)")
    for setup, extra in [s for s in (("full", []), ("lora", LORA)) if s[0] == args.setup]:
        cfg = load_config(CONFIG, [*base, *extra])
        (planned,) = plan(cfg, setups=(setup,))
        got = measure(cfg, setup)
        cells = []
        for part in ("params", "grads", "optimizer", "activations"):
            want = getattr(planned, part)
            ratio = got[part] / want if want else float("nan")
            cells.append(f"{part} {want / 2**20:.1f}/{got[part] / 2**20:.1f} ({ratio:.2f})")
        print(f"{setup:<5} " + ", ".join(cells))
        print(
            f"      activations saved by the real CPU kernels (saved_tensors_hooks): {got['saved'] / 2**20:.1f} MiB "
            f"({got['saved'] / planned.activations:.2f} of planned); resident growth also holds allocator-kept "
            "temporaries"
        )


if __name__ == "__main__":
    main()
