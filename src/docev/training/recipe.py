"""DocEV full fine-tuning, distributed with FSDP2, in the shape of torchtune's ``full_finetune_distributed``.

Started by ``torchrun`` (``docev train --config FILE`` launches it) as
``python -m docev.training.recipe --config FILE [key=value ...]``; without torchrun it runs as a
one-process group. What differs from torchtune's stock recipe, and why:

- **Runs on CPU/gloo too** (tests, the local demo): no CUDA-only memory calls off CUDA, no ``fused``
  optimizer argument off CUDA, fp32 allowed.
- **Checkpoints every ``save_every_n_steps``** with everything an exact resume needs (optimizer, lr
  scheduler, sampler position, every rank's RNG states, step, tokens seen); ``latest`` names the newest
  complete folder and only the last ``keep_last_n_checkpoints`` stay. A resumed run continues at the
  next sample and repeats the interrupted run's losses bit for bit (CPU, fp32).
- **Loss normalised by the loss tokens of the whole step** across ranks and micro-batches (not by
  micro-batch count), as torchtune does; the counts come with the batch, so no extra sync.
- **FSDP layout in ``sharding.py``**: full or hybrid (shard in the node, replicate across nodes) sharding,
  the frozen vision tower replicated instead of gathered every micro-batch, and gradient reduction every
  micro-batch or only on a step's last (``train.fsdp_strategy``, ``train.gradient_reduction``).
- **Clean failure**: a non-finite loss or gradient norm stops every rank at that step, naming the
  step and the samples; collectives time out after ``train.collective_timeout_seconds``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.tensor import DTensor
from torchtune import config, training, utils
from torchtune.modules import TransformerSelfAttentionLayer
from torchtune.modules.loss import CEWithChunkedOutputLoss
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from docev.config import ConfigError, DocEVConfig, load_config
from docev.data.loader import build_dataloader
from docev.k8s.pytorchjob import checkpoint_dir
from docev.training.checkpointing import (
    LR_SCHEDULER_KEY,
    OPTIMIZER_KEY,
    RNG_KEY,
    SAMPLER_KEY,
    SEED_KEY,
    STEP_KEY,
    TOKENS_KEY,
    WORLD_SIZE_KEY,
    capture_rng,
    prune_checkpoints,
    restore_rng,
    start_folder,
)
from docev.training.metrics import MetricsLog, wandb_mode
from docev.training.sharding import apply_fsdp, build_mesh, resolve_strategy, sync_gradients

log = utils.get_logger("INFO")

class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm of a step is NaN/inf; raised on every rank, naming the step and samples."""


def component(cfg: DocEVConfig, name: str) -> DictConfig:
    """A ``_component_`` section as the DictConfig ``torchtune.config.instantiate`` takes."""
    return OmegaConf.create(cfg.to_dict()[name])


@dataclass
class _Step:
    """What one optimizer step accumulated on this rank over its micro-batches."""

    losses: list[torch.Tensor] = field(default_factory=list)  # per micro-batch: loss × loss tokens (detached)
    sample_ids: list[list[str]] = field(default_factory=list)
    ratios: list[int] = field(default_factory=list)
    tokens: int = 0  # non-padding tokens
    loss_tokens: int = 0
    slots: int = 0  # B × S, padding included
    tiles: int = 0  # image tiles through the vision tower (base + grid tiles, padding tiles excluded)
    attention_pairs: int = 0  # query-key pairs the attention kernel computes (flex: whole blocks), for MFU


class DocEVFinetuneRecipe:
    """Full fine-tuning of a DocEV model on the shards of ``docev preprocess``.

    Args:
        cfg (DocEVConfig): the run's config; the recipe reads the torchtune sections (``model``,
            ``checkpointer``, ``optimizer``, ``lr_scheduler``, ``loss``, ``metric_logger``) and the
            top-level training keys.

    Raises:
        ValueError: for settings this recipe refuses (``optimizer_in_bwd``, activation offloading off CUDA).
    """

    def __init__(self, cfg: DocEVConfig) -> None:
        if cfg.optimizer_in_bwd:
            raise ValueError(
                "optimizer_in_bwd: not supported by DocEVFinetuneRecipe (it excludes gradient accumulation and "
                "clipping, which this recipe always applies); set it to false"
            )
        self.cfg = cfg
        self._device = utils.get_device(cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if cfg.enable_activation_offloading and self._device.type != "cuda":
            raise ValueError("enable_activation_offloading: needs device cuda")
        self._owns_process_group = not dist.is_initialized()
        if self._owns_process_group:
            dist.init_process_group(
                training.get_distributed_backend(self._device.type),
                timeout=timedelta(seconds=cfg.train.collective_timeout_seconds),
            )
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0
        self.seed = training.set_seed(seed=cfg.seed)

        self._output_dir = Path(checkpoint_dir(cfg))
        self._log_dir = Path(cfg.output_dir) / "logs"
        self._gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.clip_grad_norm
        self._log_every_n_steps = cfg.log_every_n_steps
        self._log_peak_memory_stats = cfg.log_peak_memory_stats and self._device.type == "cuda"
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.max_steps_per_epoch
        self.global_step = 0
        self.tokens_seen = 0
        self._metrics: MetricsLog | None = None

    # ------------------------------------------------------------------------------------------
    # setup

    def setup(self) -> None:
        """Metric logger, checkpoint (base or ``latest``), model, optimizer, loss, data, lr scheduler;
        then the recipe state when resuming."""
        cfg = self.cfg
        if self._is_rank_zero:
            self._metrics = self._setup_metrics()
        folder, resumed = self._start_folder()
        self._resumed_from = folder if resumed else None
        self._checkpointer = config.instantiate(
            component(cfg, "checkpointer"), checkpoint_dir=str(folder), output_dir=str(self._output_dir)
        )
        state = self._checkpointer.load_checkpoint()
        utils.log_rank_zero(log, f"{'Resuming from' if resumed else 'Starting from'} {folder}")

        self._model = self._setup_model(state.pop("model"))
        self._optimizer = self._setup_optimizer(state.get(OPTIMIZER_KEY) if resumed else None)
        self._loss_fn = self._setup_loss()
        # uint8 tiles travel to the device and are normalised there (4x fewer bytes, no host float work)
        self._dataloader, self._sampler = build_dataloader(
            cfg, rank=self.rank, world_size=self.world_size, dtype=self._dtype, normalize=False
        )
        if resumed:
            self._update_recipe_state(state)
        if self._metrics is not None:  # lines past the checkpoint are repeated by this run
            self._metrics.truncate_after(self.global_step)

        self._steps_per_epoch = [self._steps_in_epoch(e) for e in range(self.total_epochs)]
        if self._steps_per_epoch[0] == 0:
            raise ValueError(
                f"the shards give no full step: {len(self._sampler)} micro-batches per rank in epoch 0, a step takes "
                f"gradient_accumulation_steps = {self._gradient_accumulation_steps} (batch_size {cfg.batch_size} × "
                f"{self.world_size} ranks per micro-batch)"
            )
        self._total_steps = sum(self._steps_per_epoch)
        self._lr_scheduler = self._setup_lr_scheduler(state.get(LR_SCHEDULER_KEY) if resumed else None)
        if resumed:
            rng = state[RNG_KEY]
            if len(rng) == self.world_size:
                restore_rng(rng[self.rank])
        self._ignore_index = getattr(self._loss_fn, "ignore_index", -100)

    def _setup_metrics(self) -> MetricsLog:
        cfg = self.cfg
        wandb_mode(cfg.metric_logger.component)
        logger = config.instantiate(component(cfg, "metric_logger"))
        logger.log_config(OmegaConf.create(cfg.to_dict()))
        return MetricsLog(self._log_dir, logger)

    def _start_folder(self) -> tuple[Path, bool]:
        """Rank 0 decides (base or ``latest``) and tells the others, so nodes never disagree."""
        choice: list[Any] = [None]
        if self._is_rank_zero:
            base = self.cfg.checkpointer.checkpoint_dir
            choice[0] = start_folder(base, self._output_dir, self.cfg.resume_from_checkpoint)
        dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def _setup_model(self, model_state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Built on the meta device in the training dtype, compiled per layer, activation-checkpointed,
        sharded, then filled from the full state dict (each rank keeps its shard)."""
        cfg = self.cfg
        start = time.perf_counter()
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(component(cfg, "model"))
        if cfg.compile:
            training.compile_model(model, verbose=self._is_rank_zero)
        if cfg.enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
        strategy = resolve_strategy(cfg.train.fsdp_strategy, cfg.train.nnodes)
        self._hybrid = strategy == "hybrid"
        per_node = cfg.train.nproc_per_node if self._hybrid else self.world_size
        apply_fsdp(model, build_mesh(strategy, world_size=self.world_size, ranks_per_node=per_node,
                                     device_type=self._device.type))  # fmt: skip
        training.load_from_full_model_state_dict(model, model_state_dict, self._device, strict=True)
        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                if hasattr(m, "rope_init"):  # RoPE caches are not in the state dict
                    m.rope_init()
        training.validate_no_params_on_meta_device(model)
        self._activations_ctx = training.get_act_offloading_ctx_manager(model, cfg.enable_activation_offloading)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * self.world_size
        utils.log_rank_zero(
            log, f"Model ready in {time.perf_counter() - start:.1f} s (~{trainable / 1e6:.1f}M trainable parameters)"
        )
        dist.barrier()
        return model

    def _setup_optimizer(self, opt_state_dict: dict[str, Any] | None) -> torch.optim.Optimizer:
        """Only trainable parameters; ``fused`` on CUDA (default on for Adam/AdamW), dropped elsewhere."""
        opt_cfg = component(self.cfg, "optimizer")
        if self._device.type == "cuda":
            if opt_cfg._component_ in ("torch.optim.AdamW", "torch.optim.Adam") and "fused" not in opt_cfg:
                opt_cfg.fused = True
        elif "fused" in opt_cfg:
            del opt_cfg["fused"]
        params = [p for p in self._model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "model: every parameter group is frozen (decoder/encoder/fusion_trainable); nothing to train"
            )
        optimizer = config.instantiate(opt_cfg, params)
        if opt_state_dict is not None:
            training.load_from_full_optimizer_state_dict(self._model, optimizer, opt_state_dict, self._device)
        return optimizer

    def _setup_loss(self) -> torch.nn.Module:
        loss_fn = config.instantiate(component(self.cfg, "loss"))
        if self.cfg.compile:
            loss_fn = training.compile_loss(loss_fn, verbose=self._is_rank_zero)
        if isinstance(loss_fn, CEWithChunkedOutputLoss):
            self._model.set_num_output_chunks(loss_fn.num_output_chunks)
        return loss_fn

    def _setup_lr_scheduler(self, scheduler_state: dict[str, Any] | None) -> Any:
        """The schedule spans every epoch's steps; ``last_epoch`` puts a resumed run at its step."""
        if self.cfg.lr_scheduler is None:
            return None
        scheduler = config.instantiate(
            component(self.cfg, "lr_scheduler"),
            self._optimizer,
            num_training_steps=self._total_steps,
            last_epoch=self.global_step - 1,
        )
        if scheduler_state is not None:
            scheduler.load_state_dict(scheduler_state)
        return scheduler

    def _update_recipe_state(self, state: dict[str, Any]) -> None:
        self.global_step = int(state[STEP_KEY])
        self.tokens_seen = int(state[TOKENS_KEY])
        if state[SEED_KEY] != self.seed:
            raise ValueError(
                f"seed: the checkpoint was trained with seed {state[SEED_KEY]}, this run has {self.seed}; "
                "resuming would change the data order"
            )
        if state[WORLD_SIZE_KEY] != self.world_size:
            utils.log_rank_zero(
                log,
                f"Resuming on {self.world_size} ranks from a {state[WORLD_SIZE_KEY]}-rank checkpoint: the samples "
                "after the checkpoint differ from an uninterrupted run",
            )
        self._sampler.load_state_dict(state[SAMPLER_KEY])
        if self._is_rank_zero:
            prune_checkpoints(self._output_dir, self.cfg.keep_last_n_checkpoints, protect=self._resumed_from)

    def _steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps of an epoch: its full gradient-accumulation groups, capped by max_steps_per_epoch."""
        probe = copy.copy(self._sampler)  # the plan of another epoch without moving the real sampler
        probe.set_epoch(epoch)
        steps = len(probe) // self._gradient_accumulation_steps
        return min(steps, self.max_steps_per_epoch) if self.max_steps_per_epoch else steps

    # ------------------------------------------------------------------------------------------
    # training

    def train(self) -> None:
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self._optimizer.zero_grad(set_to_none=True)
        pbar = tqdm(total=self._total_steps, initial=self.global_step, disable=not self._is_rank_zero)
        stop = self.cfg.stop_after_steps
        for epoch in range(self._sampler.epoch, self.total_epochs):
            self._sampler.set_epoch(epoch)
            done = self._sampler.start_step // self._gradient_accumulation_steps
            if done >= self._steps_per_epoch[epoch]:
                continue
            step, t0 = _Step(), time.perf_counter()
            for batch in self._dataloader:
                self._sampler.advance(1)
                self._forward_backward(batch, step)
                if len(step.losses) < self._gradient_accumulation_steps:
                    continue
                self._optimizer_step(step, epoch, time.perf_counter() - t0, pbar)
                done += 1
                end_of_epoch = done == self._steps_per_epoch[epoch]
                stopping = stop is not None and self.global_step >= stop
                if end_of_epoch or stopping or self.global_step % self.cfg.save_every_n_steps == 0:
                    self.save_checkpoint()
                if end_of_epoch or stopping:
                    break
                step, t0 = _Step(), time.perf_counter()
            if stop is not None and self.global_step >= stop:
                utils.log_rank_zero(log, f"stop_after_steps: stopping after step {self.global_step}")
                break
        pbar.close()
        if self._is_rank_zero:  # the folder this run resumed from is no longer needed for saving
            prune_checkpoints(self._output_dir, self.cfg.keep_last_n_checkpoints)

    def _forward_backward(self, batch: dict[str, Any], step: _Step) -> None:
        """One micro-batch: forward, loss summed over its loss tokens, backward."""
        last = len(step.losses) + 1 == self._gradient_accumulation_steps
        sync_gradients(self._model, self.cfg.train.gradient_reduction, last=last, hybrid=self._hybrid)
        device = self._device
        # image slots checked on the host copy: forward then reads no token value (no device sync)
        self._model.check_inputs(*(batch[k] for k in ("tokens", "pixel_values", "image_sizes", "image_grids")),
                                 batch["sampling_ratio"])  # fmt: skip
        labels = batch["labels"].to(device, non_blocking=True)  # from pinned memory: an async copy
        # Predict token t+1 at position t: shift the labels, not the logits (as torchtune's recipes do).
        labels = torch.hstack((labels[:, 1:], labels.new_full((labels.shape[0], 1), self._ignore_index)))
        keys = ("mask", "input_pos", "document_ids", "pixel_values")
        optional = {k: None if batch[k] is None else batch[k].to(device, non_blocking=True) for k in keys}
        if optional["pixel_values"] is not None:
            optional["pixel_values"] = self._dataloader.collate_fn.normalize_pixels(optional["pixel_values"])
        with self._activations_ctx:
            logits = self._model(
                batch["tokens"].to(device, non_blocking=True),
                **optional,
                image_sizes=batch["image_sizes"],
                image_grids=batch["image_grids"],
                sampling_ratio=batch["sampling_ratio"],
                inputs_checked=True,
            )
        n_loss = batch["num_loss_tokens"]
        if n_loss:
            if not isinstance(logits, list):
                logits, labels = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
            loss = self._loss_fn(logits, labels) * n_loss
        else:  # no label to learn: still run backward, so FSDP's gradient reduction meets the other ranks
            loss = sum(chunk.sum() for chunk in (logits if isinstance(logits, list) else [logits])) * 0.0
        del logits
        loss.backward()
        step.losses.append(loss.detach())
        step.sample_ids.append(list(batch["sample_ids"]))
        step.ratios.append(int(batch["sampling_ratio"]))
        step.tokens += int(batch["num_tokens"])
        step.loss_tokens += int(n_loss)
        step.slots += batch["tokens"].numel()
        step.attention_pairs += batch["attention_pairs"]
        if batch["image_grids"] is not None:
            step.tiles += sum(1 + rows * cols for rows, cols in batch["image_grids"].tolist())

    def _optimizer_step(self, step: _Step, epoch: int, compute_seconds: float, pbar: tqdm) -> None:
        losses = torch.stack(step.losses)
        bad = ~torch.isfinite(losses)
        counts = [step.tokens, step.loss_tokens, step.slots, step.tiles, step.attention_pairs]
        counts = torch.tensor(counts, dtype=torch.float64, device=self._device)
        totals = torch.cat([losses.sum().double().reshape(1), bad.sum().double().reshape(1), counts])
        dist.all_reduce(totals)  # one collective: loss sum, non-finite micro-batches, token counts
        loss_sum, n_bad, tokens, loss_tokens, slots, tiles, pairs = totals.tolist()
        if n_bad or not math.isfinite(loss_sum):
            ids = [i for flag, i in zip(bad.tolist(), step.sample_ids, strict=True) if flag]
            self._fail(f"loss is {loss_sum / max(loss_tokens, 1)}", ids)

        # Gradients hold sums over this rank's loss tokens; FSDP averages over ranks. Scale to the mean
        # over every loss token of the step.
        training.scale_grads(self._model, torch.tensor(self.world_size / max(loss_tokens, 1.0)))
        params = [p for p in self._model.parameters() if p.grad is not None]
        if self._clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=float(self._clip_grad_norm))
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.item()
        if not math.isfinite(grad_norm):
            self._fail(f"gradient norm is {grad_norm}", step.sample_ids)
        lr = get_lr(self._optimizer)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        self.global_step += 1
        self.tokens_seen += int(tokens)

        loss = loss_sum / max(loss_tokens, 1.0)
        pbar.update(1)
        pbar.set_description(f"{epoch + 1}|{self.global_step}|loss {loss:.4f}")
        if self._metrics is not None and self.global_step % self._log_every_n_steps == 0:
            ratios = set(step.ratios)
            metrics = {
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_second": tokens / compute_seconds,
                "tokens_per_second_per_gpu": tokens / compute_seconds / self.world_size,
                "padding_share": 1.0 - tokens / slots,
                "sampling_ratio": ratios.pop() if len(ratios) == 1 else sum(step.ratios) / len(step.ratios),
                "num_tokens": int(tokens),
                "num_loss_tokens": int(loss_tokens),
                "num_tiles": int(tiles),
                "attention_pairs": int(pairs),
                "tokens_seen": self.tokens_seen,
                "step_seconds": compute_seconds,
                "epoch": epoch,
            }
            if self.cfg.compile:  # bounded by the padding buckets (dataloader.pad_to_multiple_of, packed rows)
                metrics["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            if self._log_peak_memory_stats:
                metrics.update(training.get_memory_stats(device=self._device))
            self._metrics.log(metrics, step=self.global_step)

    def _fail(self, what: str, local_ids: list[list[str]]) -> None:
        """Every rank reaches this together (after the same collective); name the samples of every rank."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local_ids)
        where = "; ".join(f"rank {r}: {ids}" for r, ids in enumerate(gathered) if ids)
        raise NonFiniteLossError(
            f"step {self.global_step + 1}: {what}; stopping before the optimizer step (the last checkpoint is "
            f"intact). Samples of the offending micro-batches: {where}"
        )

    # ------------------------------------------------------------------------------------------
    # checkpoints and shutdown

    def save_checkpoint(self) -> Path | None:
        """``step_N``: the model (HF layout) + recipe state; then ``latest``, then pruning to the last K.
        Every rank takes part in gathering; rank 0 writes. Returns the folder on rank 0."""
        start = time.perf_counter()
        model_sd = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
        opt_sd = training.get_full_optimizer_state_dict(
            self._model, self._optimizer, self._is_rank_zero, device=self._device
        )
        rng: list[Any] = [None] * self.world_size
        dist.all_gather_object(rng, capture_rng())
        folder = None
        if self._is_rank_zero:
            state = {
                "model": model_sd,
                OPTIMIZER_KEY: opt_sd,
                LR_SCHEDULER_KEY: None if self._lr_scheduler is None else self._lr_scheduler.state_dict(),
                SAMPLER_KEY: self._sampler.state_dict(),
                RNG_KEY: rng,
                STEP_KEY: self.global_step,
                TOKENS_KEY: self.tokens_seen,
                SEED_KEY: self.seed,
                WORLD_SIZE_KEY: self.world_size,
            }
            folder = self._checkpointer.save_checkpoint(state, self.global_step)
            removed = prune_checkpoints(self._output_dir, self.cfg.keep_last_n_checkpoints, self._resumed_from)
            kept = f"; removed {', '.join(p.name for p in removed)}" if removed else ""
            log.info(f"Saved {folder} in {time.perf_counter() - start:.1f} s{kept}")
        dist.barrier()
        return folder

    def cleanup(self) -> None:
        if self._metrics is not None:
            self._metrics.plot()
            self._metrics.close()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def recipe_main(cfg: DocEVConfig) -> None:
    recipe = DocEVFinetuneRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()


def _single_process_env() -> None:
    """Outside torchrun: a one-process group on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


@record
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docev.training.recipe", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print("config error:", *(f"  {line}" for line in exc.errors), sep="\n", file=sys.stderr)
        return 2
    _single_process_env()
    recipe_main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
