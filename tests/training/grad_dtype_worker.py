"""torchrun worker of tests/training/test_grad_dtype.py: 2 gloo ranks, the tiny DocEV with fp32 master weights
and bf16 compute, ``train.gradient_reduction`` last_micro_batch vs every_micro_batch over 2 micro-batches, where
rank 1's micro-batches carry no image (``text``) or an image only in the last one (``late``). Rank 0 saves each
run's first-step gradients (full tensors) and losses, or the error a run raised.

    torchrun --nproc_per_node 2 tests/training/grad_dtype_worker.py CHECKPOINT OUT.pt
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from sharding_worker import _loss, _make_batch, _model
from torch.distributed.tensor import DTensor
from torchtune.modules.loss import CEWithChunkedOutputLoss

from docev.models.docev import DocEVCheckpointer, docev_tiny
from docev.training.parallelize import apply_fsdp, build_mesh, load_model_state, mixed_precision_policy, sync_gradients

MICRO = 2


def _text(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, 1024, (1, 24), generator=gen), "pixel_values": None, "image_sizes": None,
            "image_grids": None, "sampling_ratio": 2}  # fmt: skip


def _batches(rank: int, pattern: str) -> list[dict]:
    make = _make_batch()
    out = []
    for micro in range(MICRO):
        seed = 10 * rank + micro
        image = rank == 0 or (pattern == "late" and micro == MICRO - 1)
        b = make([[(120, 90)]], ratio=2, seed=seed, text=7) if image else _text(seed)
        b["tokens"] = torch.nn.functional.pad(b["tokens"], (0, -b["tokens"].shape[1] % 8))
        gen = torch.Generator().manual_seed(seed)
        b["labels"] = torch.randint(0, 1024, b["tokens"].shape, generator=gen)
        if b["pixel_values"] is not None:
            b["pixel_values"] = b["pixel_values"].to(torch.bfloat16)
        out.append(b)
    return out


def run(state: dict, rank: int, world: int, reduction: str, pattern: str) -> dict:
    sd = _model(state, encoder_trainable=False).state_dict()
    with torch.device("meta"):
        model = docev_tiny()
    model.set_num_output_chunks(8)
    mesh = build_mesh("full", world_size=world, ranks_per_node=world, device_type="cpu")
    apply_fsdp(model, mixed_precision_policy(torch.bfloat16, torch.float32), mesh, compute_dtype=torch.bfloat16)
    load_model_state(model, sd, torch.device("cpu"), torch.bfloat16)
    loss_fn, losses = CEWithChunkedOutputLoss(), []
    for micro, b in enumerate(_batches(rank, pattern)):
        sync_gradients(model, reduction, last=micro == MICRO - 1, hybrid=False)
        loss, _ = _loss(model, loss_fn, b)
        loss.backward()
        losses.append(loss.detach().float())
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if isinstance(p.grad, DTensor)}
    return {"losses": torch.stack(losses), "grads": grads}


def main(checkpoint: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    state = DocEVCheckpointer(checkpoint).load_checkpoint()["model"]
    results = {}
    for pattern in ("text", "late"):
        for reduction in ("every_micro_batch", "last_micro_batch"):
            results[f"{pattern}/{reduction}"] = run(state, rank, world, reduction, pattern)
            dist.barrier()
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
