"""Eval loss: the loss on the held-out shards (``shards/eval/``), during training and for a scored model,
and the ``best`` pointer.

Every ``eval_every_n_steps`` (and after the last step) each rank computes, without gradients, the
summed loss and loss-token count of its share of the eval samples (sample ``i`` goes to rank
``i % world_size``), once per ratio of ``tokenizer.sampling_ratio``: a fixed ratio per pass, so two
evaluations see identical inputs. One all-reduce then gives the token-weighted loss over every rank.
Every rank runs the same number of micro-batches (FSDP gathers parameters per forward, so a rank that
ran fewer would leave the others waiting): a rank short of samples repeats one batch with weight 0.
``eval_loss`` is the mean of the per-ratio losses ``eval_loss_r{R}``. A lower ``eval_loss`` than the
best so far makes the recipe save that step and point ``best`` at it; the record survives a resume
because it is read back from the pointer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from docev.config import DocEVConfig
from docev.data.collate import DocEVCollate
from docev.data.dataset import ShardDataset
from docev.data.preprocess import config_hash, tokenizer_fingerprint
from docev.data.staging import local_shards
from docev.run.checkpoints import Best, read_best, step_name, write_best


class EvalLoss:
    """The held-out shards of one rank, batched at each sampling ratio, and the running best.

    Args:
        cfg (DocEVConfig): ``batch_size``, ``eval_every_n_steps``, ``eval_max_batches``, ``tokenizer``.
        dataset (ShardDataset): the eval shards.
        collate (DocEVCollate): the training collate (``normalize=False`` is fine: pixels are normalised
            with ``collate.normalize_pixels`` on the device).
        rank, world_size (int): this process's share.
        checkpoint_dir (Path): where ``best`` lives (beside ``latest``).
    """

    def __init__(self, cfg: DocEVConfig, dataset: ShardDataset, collate: DocEVCollate, *, rank: int,
                 world_size: int, checkpoint_dir: Path):  # fmt: skip
        self.cfg, self.dataset, self.collate = cfg, dataset, collate
        self.rank, self.world_size = rank, world_size
        self.checkpoint_dir = Path(checkpoint_dir)
        self.ratios = sorted(cfg.tokenizer.sampling_ratio)
        lengths = dataset.lengths()
        limit = cfg.tokenizer.max_seq_len
        # Samples that fit at the ratio (preprocess fitted them at the largest one), the same list on every rank.
        self.samples = {r: [i for i in range(len(dataset)) if lengths[r][i] <= limit] for r in self.ratios}
        self.best: Best | None = read_best(self.checkpoint_dir)

    @classmethod
    def from_config(cls, cfg: DocEVConfig, collate: DocEVCollate, *, rank: int, world_size: int,
                    checkpoint_dir: Path, resumed: bool = True) -> EvalLoss | None:  # fmt: skip
        """None when the run holds nothing out (no ``shards/eval/manifest.json``). A run that does not
        resume starts without a best (an old pointer is replaced at its first evaluation)."""
        folder = local_shards(cfg, "eval")  # staged to dataloader.cache_dir like the training shards
        if folder is None:
            return None
        expect = {"config_hash": config_hash(cfg), "tokenizer": tokenizer_fingerprint(cfg.tokenizer.model_name_or_path)}
        dataset = ShardDataset(folder, tile_size=cfg.tokenizer.tile_size, expect=expect,
                               verify_checksums=cfg.dataloader.verify_checksums)  # fmt: skip
        if len(dataset) == 0:
            return None
        evaluator = cls(cfg, dataset, collate, rank=rank, world_size=world_size, checkpoint_dir=checkpoint_dir)
        if not resumed:
            evaluator.best = None
        return evaluator

    def due(self, step: int, last: bool) -> bool:
        every = self.cfg.eval_every_n_steps
        return last or (every is not None and step % every == 0)

    def batches(self, ratio: int) -> Iterator[tuple[dict[str, Any], bool]]:
        """(batch, counts) for this rank at ``ratio``; ``counts`` False for a rank's padding batches."""
        pool = self.samples[ratio]
        b = self.cfg.batch_size
        per_rank = -(-len(pool) // self.world_size)
        n_batches = -(-per_rank // b)
        if self.cfg.eval_max_batches is not None:
            n_batches = min(n_batches, self.cfg.eval_max_batches)
        mine = pool[self.rank :: self.world_size]
        for k in range(n_batches):
            chunk, real = mine[k * b : (k + 1) * b], True
            if not chunk:  # this rank ran out: repeat a sample so the collectives still match, weight 0
                chunk, real = pool[:1], False
            yield self.collate([self.dataset[(i, ratio, row)] for row, i in enumerate(chunk)]), real

    @torch.no_grad()
    def local_sums(self, model: torch.nn.Module, loss_fn: Any, device: torch.device) -> torch.Tensor:
        """[loss sum, loss tokens] per ratio for this rank, shape [len(ratios), 2] (float64)."""
        ignore = getattr(loss_fn, "ignore_index", -100)
        out = torch.zeros(len(self.ratios), 2, dtype=torch.float64, device=device)
        was_training = model.training
        model.eval()
        try:
            for k, ratio in enumerate(self.ratios):
                for batch, real in self.batches(ratio):
                    loss, n = _batch_loss(model, loss_fn, batch, device, ignore, self.collate)
                    if real:
                        out[k, 0] += loss * n
                        out[k, 1] += n
        finally:
            model.train(was_training)
        return out

    def run(self, model: torch.nn.Module, loss_fn: Any, device: torch.device) -> dict[str, float]:
        """Token-weighted losses over every rank: ``eval_loss`` and ``eval_loss_r{R}``."""
        sums = self.local_sums(model, loss_fn, device)
        if dist.is_initialized():
            dist.all_reduce(sums)
        per_ratio = {f"eval_loss_r{r}": float(s / max(n, 1.0)) for r, (s, n) in zip(self.ratios, sums.tolist(),
                                                                                     strict=True)}  # fmt: skip
        return {"eval_loss": sum(per_ratio.values()) / len(per_ratio), **per_ratio,
                "eval_tokens": int(sums[:, 1].sum())}  # fmt: skip

    def improved(self, eval_loss: float) -> bool:
        return self.best is None or eval_loss < self.best.eval_loss

    def maybe_run(self, model: torch.nn.Module, loss_fn: Any, device: torch.device, step: int, last: bool,
                  log: Any = None) -> float | None:  # fmt: skip
        """The recipe's hook after an optimizer step: evaluate when due, log (rank 0's ``MetricsLog``),
        and return the eval loss when it beats the best so far (the recipe then saves the step and calls
        :meth:`mark_best`), else None."""
        if not self.due(step, last):
            return None
        metrics = self.run(model, loss_fn, device)
        if log is not None:
            log.log(metrics, step=step)
        return metrics["eval_loss"] if self.improved(metrics["eval_loss"]) else None

    def mark_best(self, step: int, eval_loss: float) -> None:
        """After ``step_{step}`` is saved (every rank calls this): rank 0 points ``best`` at it."""
        folder = self.checkpoint_dir / step_name(step)
        if self.rank == 0:
            write_best(self.checkpoint_dir, folder, eval_loss)
        self.best = Best(folder, step, eval_loss)


def _batch_loss(model: torch.nn.Module, loss_fn: Any, batch: dict[str, Any], device: torch.device, ignore: int,
                collate: DocEVCollate) -> tuple[float, int]:  # fmt: skip
    """Mean loss over the batch's loss tokens (labels shifted as in training) and their count."""
    labels = batch["labels"].to(device)
    labels = torch.hstack((labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore)))
    pixels = batch["pixel_values"]
    if pixels is not None:
        pixels = pixels.to(device)
        pixels = collate.normalize_pixels(pixels) if pixels.dtype == torch.uint8 else pixels
    packed = {k: None if batch[k] is None else batch[k].to(device) for k in ("mask", "input_pos", "document_ids")}
    logits = model(batch["tokens"].to(device), **packed, pixel_values=pixels,
                   image_sizes=batch["image_sizes"], image_grids=batch["image_grids"],
                   sampling_ratio=batch["sampling_ratio"])  # fmt: skip
    n = int((labels != ignore).sum())
    if not n:
        return 0.0, 0
    if not isinstance(logits, list):
        logits, labels = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
    return float(loss_fn(logits, labels)), n
