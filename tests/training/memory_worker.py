"""torchrun worker of tests/training/test_memory.py: 2 gloo ranks hold the tiny model as a run does (fp32 master
weights, bf16 compute), under full sharding (shard group 2) and hybrid sharding as 2 nodes × 1 rank (shard
group 1), for full fine-tuning and LoRA. Rank 0 (which holds FSDP2's largest shard: ``ceil(rows / group)``)
measures the bytes of its local DTensor shards and replicated tensors, of its gradients after a backward and of
AdamW's state after a step, and saves them beside ``docev.training.memory.plan`` of the same config.

    torchrun --nproc_per_node 2 tests/training/memory_worker.py OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from docev.config import load_config
from docev.models.docev import materialize
from docev.training.memory import arch_of, build_meta, config_setup, plan
from docev.training.parallelize import apply_fsdp, build_mesh, mixed_precision_policy

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
BASE = ["synthetic=null", "datasets=[{source: /tmp}]", "dtype=bf16", "master_dtype=fp32", "batch_size=1",
        "tokenizer.max_seq_len=64"]  # fmt: skip
LORA = ["model._component_=docev.models.docev.lora_docev_tiny", "model.decoder_trainable=false"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def measure(cfg, strategy: str, world: int) -> dict[str, int]:
    master = build_meta(cfg.model_copy(update={"dtype": "fp32"}), arch_of(cfg), config_setup(cfg))  # master dtype
    mesh = build_mesh(strategy, world_size=world, ranks_per_node=1 if strategy == "hybrid" else world,
                      device_type="cpu")  # fmt: skip
    apply_fsdp(master, mixed_precision_policy(torch.bfloat16, torch.float32), mesh, compute_dtype=torch.bfloat16)
    model = materialize(master, "cpu")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    tokens = torch.randint(0, arch_of(cfg).vocab_size, (1, 64))
    model(tokens).float().logsumexp(-1).sum().backward()
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {
        "params": _nbytes(model.parameters()),
        "grads": _nbytes(p.grad for p in trainable),
        "optimizer": _nbytes(state),
        "missing_grads": sum(p.grad is None for p in trainable),
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for setup, extra in (("full", []), ("lora", LORA)):
        for strategy, nnodes, gpus in (("full", 1, world), ("hybrid", world, 1)):
            cfg_s = load_config(CONFIG, [*BASE, *extra, f"train.fsdp_strategy={strategy}", f"train.nnodes={nnodes}"])
            measured = measure(cfg_s, strategy, world)
            if rank == 0:
                (planned,) = plan(cfg_s, nnodes, gpus, setups=(setup,))
                planned_bytes = [planned.params, planned.grads, planned.optimizer]
                row = {"measured": measured, "planned": planned.as_dict(), "bytes": planned_bytes}
                results[f"{setup}/{strategy}"] = row
            dist.barrier()
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
