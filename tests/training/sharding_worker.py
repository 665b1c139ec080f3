"""torchrun worker of tests/training/test_sharding.py: 4 CPU ranks standing for 2 nodes × 2 ranks.

Every scenario builds the tiny DocEV from the tiny checkpoint, shards it with ``docev.training.parallelize``, runs
three optimizer steps of two micro-batches each (rank 1's micro-batches hold no image) and records, on rank 0:
the losses, each step's gradient norm, the gradients of the first step (full tensors), and every collective of
the first step's micro-batches.
A reference without FSDP (each rank runs every rank's micro-batches) gives the gradients to match.

    torchrun --nproc_per_node 4 tests/training/sharding_worker.py CHECKPOINT OUT.pt
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torchtune.modules.loss import CEWithChunkedOutputLoss

from docev.models.docev import DocEVCheckpointer, docev_tiny
from docev.training.comm_volume import CollectiveCounter
from docev.training.parallelize import apply_fsdp, build_mesh, load_model_state, mixed_precision_policy, sync_gradients

RANKS_PER_NODE, MICRO, STEPS = 2, 2, 3
SCENARIOS = {  # name: (strategy, gradient_reduction, encoder_trainable, compute dtype); master weights fp32
    "full": ("full", "every_micro_batch", False, torch.float32),
    "hybrid": ("hybrid", "every_micro_batch", False, torch.float32),
    "hybrid_last": ("hybrid", "last_micro_batch", False, torch.float32),
    "hybrid_last_across_nodes": ("hybrid", "last_micro_batch_across_nodes", False, torch.float32),
    "full_last": ("full", "last_micro_batch", False, torch.float32),
    "hybrid_trainable_tower": ("hybrid", "every_micro_batch", True, torch.float32),
    "hybrid_mixed": ("hybrid", "last_micro_batch_across_nodes", False, torch.bfloat16),
}


def _make_batch():
    path = Path(__file__).parents[1] / "models" / "docev" / "conftest.py"
    spec = importlib.util.spec_from_file_location("models_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._make_batch


def _batches(world: int) -> list[list[dict]]:
    """[step][rank * MICRO + micro] micro-batches, S a multiple of the loss's 8 chunks; rank 1 text only."""
    make = _make_batch()
    out = []
    for step in range(STEPS):
        row = []
        for rank in range(world):
            for micro in range(MICRO):
                seed = 100 * step + 10 * rank + micro
                gen = torch.Generator().manual_seed(seed)
                if rank == 1:  # text only: this rank skips the vision path
                    tokens = torch.randint(0, 1024, (1, 21 + 8 * micro), generator=gen)
                    b = {"tokens": tokens, "pixel_values": None, "image_sizes": None, "image_grids": None,
                         "sampling_ratio": 2}  # fmt: skip
                else:
                    b = make([[(120 + 10 * micro, 90)]], ratio=2 + micro % 2, seed=seed, text=7 + micro)
                pad = -b["tokens"].shape[1] % 8
                b["tokens"] = torch.nn.functional.pad(b["tokens"], (0, pad))
                b["labels"] = torch.randint(0, 1024, b["tokens"].shape, generator=gen)
                b["labels"][:, -pad - 1 :] = -100
                row.append(b)
        out.append(row)
    return out


def _loss(model, loss_fn, b) -> tuple[torch.Tensor, int]:
    inputs = {k: b[k] for k in ("tokens", "pixel_values", "image_sizes", "image_grids", "sampling_ratio")}
    logits = model(inputs.pop("tokens"), **inputs)
    n = int((b["labels"] != -100).sum())
    return loss_fn(logits, b["labels"]) * n, n


def _model(state: dict, encoder_trainable: bool):
    torch.manual_seed(0)
    model = docev_tiny(encoder_trainable=encoder_trainable)
    model.load_state_dict(state)
    model.set_num_output_chunks(8)
    return model


def _reference(state, batches, world) -> dict[str, torch.Tensor]:
    """First-step gradients without FSDP, scaled as FSDP averages: sum over all ranks' micro-batches / world."""
    model, loss_fn = _model(state, encoder_trainable=True), CEWithChunkedOutputLoss()
    for b in batches[0]:
        loss, _ = _loss(model, loss_fn, b)
        (loss / world).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _scenario(state, batches, rank, world, strategy, reduction, encoder_trainable, compute) -> dict:
    model, loss_fn = _model(state, encoder_trainable), CEWithChunkedOutputLoss()
    sd = model.state_dict()
    with torch.device("meta"):
        meta = docev_tiny(encoder_trainable=encoder_trainable)
    meta.set_num_output_chunks(8)
    mesh = build_mesh(strategy, world_size=world, ranks_per_node=RANKS_PER_NODE, device_type="cpu")
    apply_fsdp(meta, mixed_precision_policy(compute, torch.float32), mesh, compute_dtype=compute)
    load_model_state(meta, sd, torch.device("cpu"), compute)
    model = meta
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, grads, counted, norms = [], {}, [], []
    for step in range(STEPS):
        for micro in range(MICRO):
            sync_gradients(model, reduction, last=micro == MICRO - 1, hybrid=strategy == "hybrid")
            with CollectiveCounter() as counter:
                loss, _ = _loss(model, loss_fn, batches[step][rank * MICRO + micro])
                loss.backward()
            losses.append(loss.detach())
            if step == 0:
                counted.append([(c.kind, c.ranks, c.nbytes) for c in counter.collectives])
        full = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
                for n, p in model.named_parameters() if p.grad is not None}  # fmt: skip
        norms.append(torch.stack([g.float().pow(2).sum() for g in full.values()]).sum().sqrt())
        if step == 0:
            grads = full
        opt.step()
        opt.zero_grad(set_to_none=True)
    all_losses = [None] * world
    dist.all_gather_object(all_losses, torch.stack(losses))
    tower_sharded = [isinstance(p, DTensor) for p in model.encoder.parameters()]
    return {"losses": torch.stack(all_losses).float(), "grads": grads, "collectives": counted,
            "grad_norms": torch.stack(norms),
            "tower_sharded": tower_sharded, "tower_dtype": str(next(model.encoder.parameters()).dtype),
            "param_dtypes": sorted({str(p.dtype) for p in model.decoder.parameters()})}  # fmt: skip


def main(checkpoint: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    state = DocEVCheckpointer(checkpoint).load_checkpoint()["model"]
    batches = _batches(world)
    results = {"reference": _reference(state, batches, world)}
    for name, args in SCENARIOS.items():
        results[name] = _scenario(state, batches, rank, world, *args)
        dist.barrier()
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
