"""What one optimizer step accumulates over its micro-batches, summed across ranks once per step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


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


@dataclass
class StepStats:
    """This rank's micro-batches of one optimizer step."""

    losses: list[torch.Tensor] = field(default_factory=list)  # per micro-batch: loss × loss tokens (detached)
    sample_ids: list[list[str]] = field(default_factory=list)
    ratios: list[int] = field(default_factory=list)
    tokens: int = 0  # non-padding tokens
    loss_tokens: int = 0
    slots: int = 0  # B × S, padding included
    tiles: int = 0  # image tiles through the vision tower (base + grid tiles, padding tiles excluded)
    attention_pairs: int = 0  # query-key pairs the documents attend (causal, per document), for MFU

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

    def sampling_ratio(self) -> float:
        """The step's ratio (the mean when its micro-batches had several)."""
        ratios = set(self.ratios)
        return ratios.pop() if len(ratios) == 1 else sum(self.ratios) / len(self.ratios)
