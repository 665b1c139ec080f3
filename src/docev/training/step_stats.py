"""What one optimizer step accumulates over its micro-batches, summed across ranks once per step; its clocks
(the step window, wall and CPU); the gradient scaling and clipping that ends it; the metrics row it logs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm of a step is NaN/inf; raised on every rank, naming the step and samples."""


def fail_non_finite(what: str, step: int, local_ids: list[list[str]], world_size: int) -> None:
    """Every rank reaches this together (after the same collective): raise, naming the samples of every rank."""
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, local_ids)
    where = "; ".join(f"rank {r}: {ids}" for r, ids in enumerate(gathered) if ids)
    raise NonFiniteLossError(
        f"step {step}: {what}; stopping before the optimizer step (the last checkpoint is intact). Samples of "
        f"the offending micro-batches: {where}"
    )


def scale_and_clip(optimizer: torch.optim.Optimizer, scale: float, max_norm: float | None) -> float:
    """Gradients × ``scale``, clipped to ``max_norm`` (None: measured only); returns their total norm.

    One ``_foreach_mul_`` over the optimizer's parameters that hold a gradient. torchtune's ``scale_grads``
    walks every module parameter (the frozen vision tower's too) and multiplies gradient by gradient by a
    0-dim tensor: a DTensor dispatch (a kernel launch on CUDA) per parameter, ~10x the host time of the
    foreach call (benchmarks/train_throughput.py section 3). The result is the same bits in fp32."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    if grads:  # _foreach_mul_ refuses an empty list (no trainable parameter reached by this step's loss)
        torch._foreach_mul_(grads, scale)
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.item()


@dataclass
class StepStats:
    """This rank's micro-batches of one optimizer step, and the clocks of its window: started when the step
    begins (before its first micro-batch is fetched), read by :meth:`elapsed` after the optimizer step."""

    losses: list[torch.Tensor] = field(default_factory=list)  # per micro-batch: loss × loss tokens (detached)
    sample_ids: list[list[str]] = field(default_factory=list)
    ratios: list[int] = field(default_factory=list)
    tokens: int = 0  # non-padding tokens
    loss_tokens: int = 0
    slots: int = 0  # B × S, padding included
    tiles: int = 0  # image tiles through the vision tower (base + grid tiles, padding tiles excluded)
    attention_pairs: int = 0  # query-key pairs the documents attend (causal, per document), for MFU
    started: float = field(default_factory=lambda: time.perf_counter())
    cpu_started: float = field(default_factory=lambda: time.process_time())  # this process, every thread

    def elapsed(self) -> tuple[float, float]:
        """Wall and CPU seconds since the step began (CPU: this process's, less sensitive to other load)."""
        return time.perf_counter() - self.started, time.process_time() - self.cpu_started

    def record(self, batch: dict[str, Any], loss: torch.Tensor, n_loss: int) -> None:
        """One micro-batch's (detached) summed loss and its counts."""
        self.losses.append(loss.detach())
        self.sample_ids.append(list(batch["sample_ids"]))
        self.ratios.append(int(batch["sampling_ratio"]))
        self.tokens += int(batch["num_tokens"])
        self.loss_tokens += int(n_loss)
        self.slots += batch["tokens"].numel()
        self.attention_pairs += batch["attention_pairs"]
        if batch["image_grids"] is not None:
            self.tiles += sum(1 + rows * cols for rows, cols in batch["image_grids"].tolist())

    def all_reduce(self, device: torch.device) -> tuple[torch.Tensor, list[float]]:
        """One collective: this rank's non-finite micro-batch flags, and the step's totals over every rank:
        loss sum, non-finite micro-batches, tokens, loss tokens, slots, tiles, attention pairs."""
        losses = torch.stack(self.losses)
        bad = ~torch.isfinite(losses)
        counts = [self.tokens, self.loss_tokens, self.slots, self.tiles, self.attention_pairs]
        counts = torch.tensor(counts, dtype=torch.float64, device=device)
        totals = torch.cat([losses.sum().double().reshape(1), bad.sum().double().reshape(1), counts])
        dist.all_reduce(totals)
        return bad, totals.tolist()

    def metrics(self, totals: list[float], *, lr: float, grad_norm: float, seconds: tuple[float, float],
                tokens_seen: int, epoch: int, world_size: int) -> dict[str, float | int]:  # fmt: skip
        """The step's row of ``metrics.jsonl`` from the totals of :meth:`all_reduce` and the window's clocks."""
        loss_sum, _, tokens, loss_tokens, slots, tiles, pairs = totals
        wall, cpu = seconds
        return {
            "loss": loss_sum / max(loss_tokens, 1.0),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": tokens / wall,
            "tokens_per_second_per_gpu": tokens / wall / world_size,
            "padding_share": 1.0 - tokens / slots,
            "sampling_ratio": self.sampling_ratio(),
            "num_tokens": int(tokens),
            "num_loss_tokens": int(loss_tokens),
            "num_tiles": int(tiles),
            "attention_pairs": int(pairs),
            "tokens_seen": tokens_seen,
            "step_seconds": wall,
            "step_cpu_seconds": cpu,
            "epoch": epoch,
        }

    def sampling_ratio(self) -> float:
        """The step's ratio (the mean when its micro-batches had several)."""
        ratios = set(self.ratios)
        return ratios.pop() if len(ratios) == 1 else sum(self.ratios) / len(self.ratios)
