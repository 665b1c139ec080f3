"""DocEV full fine-tuning, distributed with FSDP2, in the shape of torchtune's ``full_finetune_distributed``.

Started by ``torchrun`` (``docev train --config FILE`` launches it) as
``python -m docev.training.recipe --config FILE [key=value ...]``; without torchrun it runs as a
one-process group. What differs from torchtune's stock recipe, and why:

- **Runs on CPU/gloo too** (tests, the local demo): no CUDA-only memory calls off CUDA, no ``fused``
  optimizer argument off CUDA, fp32 allowed.
- **Checkpoints every ``save_every_n_steps``** with everything an exact resume needs (optimizer, lr
  scheduler, sampler position, every rank's RNG states, step, tokens seen); ``latest`` names the newest
  complete folder and only the last ``keep_last_n_checkpoints`` stay. A resumed run continues at the
  next sample and repeats the interrupted run's losses bit for bit (CPU, fp32). Sharded DCP folders
  (each rank writes its shards, optionally in the background) or HF folders: ``checkpoint_manager``.
- **Loss normalised by the loss tokens of the whole step** across ranks and micro-batches (not by
  micro-batch count), as torchtune does; the counts come with the batch, so no extra sync.
- **fp32 master weights** by default (``master_dtype``), compute in ``dtype``; how the model is built,
  sharded (full or hybrid mesh, frozen vision tower replicated, gradient reduction every micro-batch or
  on a step's last: ``train.fsdp_strategy``, ``train.gradient_reduction``) and compiled is
  ``docev.training.parallelize``.
- **Preemption loses nothing**: SIGTERM finishes the step in flight, saves it and exits with a code the
  operator retries (``docev.training.preemption``); a restart continues the same W&B run.
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
from torchtune.modules.loss import CEWithChunkedOutputLoss
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from docev.config import ConfigError, DocEVConfig, load_config
from docev.data.loader import build_dataloader
from docev.eval_loss import EvalLoss
from docev.models.docev._dcp import OPTIMIZER_KEY
from docev.run.checkpoints import prune_checkpoints
from docev.run.paths import run_paths
from docev.training.checkpoint_manager import CheckpointManager
from docev.training.memory import GIB, refuse_oversized
from docev.training.metrics_log import MetricsLog, wandb_mode, wandb_run_id
from docev.training.parallelize import is_hybrid, precision_warning, run_mesh, setup_model, sync_gradients
from docev.training.peft import PeftRun
from docev.training.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionHandler
from docev.training.state import (
    LR_SCHEDULER_KEY,
    RNG_KEY,
    SAMPLER_KEY,
    SEED_KEY,
    STEP_KEY,
    TOKENS_KEY,
    WANDB_RUN_KEY,
    WORLD_SIZE_KEY,
    restore_rng,
)

log = utils.get_logger("INFO")

# The schedule a checkpoint was trained on; a resume with another one says what changes (the lr curve spans
# the new total steps, so the lr at the resumed step moves).
SCHEDULE_KEY = "schedule"
SCHEDULE_FIELDS = ("epochs", "max_steps_per_epoch", "batch_size", "gradient_accumulation_steps", "world_size")


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
    attention_pairs: int = 0  # query-key pairs the documents attend (causal, per document), for MFU


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
        self._master_dtype = training.get_dtype(cfg.master_dtype, device=self._device)
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

        self._paths = run_paths(cfg)
        self._output_dir = self._paths.checkpoints
        self._gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.clip_grad_norm
        self._log_every_n_steps = cfg.log_every_n_steps
        self._log_peak_memory_stats = cfg.log_peak_memory_stats and self._device.type == "cuda"
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.max_steps_per_epoch
        self.global_step = 0
        self.tokens_seen = 0
        self._metrics: MetricsLog | None = None
        self._wandb_run_id: str | None = None
        self._preemption = PreemptionHandler(self._device)
        self._peft = PeftRun.from_config(cfg)  # None: full fine-tuning

    # ------------------------------------------------------------------------------------------
    # setup

    def setup(self) -> None:
        """Preemption handler, checkpoint (base or ``latest``), metric logger (continuing the checkpoint's W&B
        run), model, optimizer, loss, data, lr scheduler; then the recipe state when resuming."""
        cfg = self.cfg
        self._preemption.install()
        if self._device.type == "cuda":  # refused before any weight is read (docev plan-memory, GPU memory)
            refuse_oversized(cfg, torch.cuda.get_device_properties(self._device).total_memory / GIB)
        self._checkpoints = CheckpointManager(
            cfg, component(cfg, "checkpointer"), self._output_dir, self._device, peft=self._peft
        )
        state, resumed = self._checkpoints.load()
        if self._is_rank_zero:  # a resumed run continues the W&B run of its checkpoint
            self._metrics = self._setup_metrics(state.get(WANDB_RUN_KEY) if resumed else None)
        warning = precision_warning(self._master_dtype, (cfg.optimizer.model_extra or {}).get("lr"))
        if warning is not None and self._is_rank_zero:
            log.warning(warning)

        model_sd = state.pop("model")  # None: a sharded (DCP) folder, read once model and optimizer exist
        self._model = self._setup_model(model_sd)
        self._optimizer = self._setup_optimizer(state.get(OPTIMIZER_KEY) if resumed else None)
        if model_sd is None:
            self._checkpoints.load_sharded(self._model, self._optimizer)
        self._loss_fn = self._setup_loss()
        # uint8 tiles travel to the device and are normalised there (4x fewer bytes, no host float work)
        self._dataloader, self._sampler = build_dataloader(
            cfg, rank=self.rank, world_size=self.world_size, dtype=self._dtype, normalize=False
        )
        self._eval_loss = EvalLoss.from_config(cfg, self._dataloader.collate_fn, rank=self.rank,
                                                world_size=self.world_size, checkpoint_dir=self._output_dir,
                                                resumed=resumed)  # fmt: skip
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
        if resumed and self._is_rank_zero:
            self._log_schedule_change(state.get(SCHEDULE_KEY), state.get(LR_SCHEDULER_KEY))
        if resumed:
            rng = state[RNG_KEY]
            if len(rng) == self.world_size:
                restore_rng(rng[self.rank])
        self._ignore_index = getattr(self._loss_fn, "ignore_index", -100)

    def _setup_metrics(self, saved_run_id: str | None) -> MetricsLog:
        cfg = self.cfg
        wandb_mode(cfg.metric_logger.component)
        self._wandb_run_id = wandb_run_id(cfg.metric_logger, saved_run_id)
        resume = {"id": self._wandb_run_id, "resume": "allow"} if self._wandb_run_id else {}
        logger = config.instantiate(component(cfg, "metric_logger"), **resume)
        # torchtune writes {output_dir}/torchtune_config.yaml: give it the work folder (output_dir may be s3://…)
        logger.log_config(OmegaConf.create({**cfg.to_dict(), "output_dir": str(cfg.work_root)}))
        return MetricsLog(self._paths.metrics, self._paths.loss_plot, logger)

    def _setup_model(self, model_state_dict: dict[str, torch.Tensor] | None) -> torch.nn.Module:
        """``parallelize.setup_model`` with this run's dtypes and switches (None: a sharded checkpoint fills the
        model later), then the activation-offloading context."""
        cfg = self.cfg
        mesh = run_mesh(cfg.train.fsdp_strategy, nnodes=cfg.train.nnodes, nproc_per_node=cfg.train.nproc_per_node,
                        device_type=self._device.type)  # fmt: skip
        self._hybrid = is_hybrid(mesh)
        shape = ", ".join(f"{n}={k}" for n, k in zip(mesh.mesh_dim_names, mesh.shape, strict=True))
        utils.log_rank_zero(log, f"FSDP mesh ({shape}): {'hybrid' if self._hybrid else 'full'} sharding, "
                            f"gradient reduction {cfg.train.gradient_reduction}")  # fmt: skip
        model = setup_model(
            component(cfg, "model"),
            model_state_dict,
            self._device,
            compute_dtype=self._dtype,
            master_dtype=self._master_dtype,
            compile=cfg.compile,
            activation_checkpointing=cfg.enable_activation_checkpointing,
            mesh=mesh,
            fill=None if self._peft is None else self._peft.load_model,
        )
        self._activations_ctx = training.get_act_offloading_ctx_manager(model, cfg.enable_activation_offloading)
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

    def _schedule(self) -> dict[str, Any]:
        cfg = self.cfg
        values = (self.total_epochs, self.max_steps_per_epoch, cfg.batch_size, self._gradient_accumulation_steps,
                  self.world_size)  # fmt: skip
        return {**dict(zip(SCHEDULE_FIELDS, values, strict=True)), "total_steps": self._total_steps}

    def _log_schedule_change(self, saved: dict[str, Any] | None, scheduler_state: dict[str, Any] | None) -> None:
        """One line when the resumed run's schedule differs from its checkpoint's: what changed, the new total
        steps (the progress bar's), and the lr at the resumed step before and after (the curve now spans the
        new total). Checkpoints from before the schedule was recorded are resumed silently."""
        if saved is None:
            return
        now = self._schedule()
        changed = [f"{k} {saved.get(k)} → {now[k]}" for k in SCHEDULE_FIELDS if saved.get(k) != now[k]]
        if not changed and saved.get("total_steps") == now["total_steps"]:
            return
        was = (scheduler_state or {}).get("_last_lr")
        lr = self._optimizer.param_groups[0]["lr"]
        lr_note = f"the lr at step {self.global_step} goes {was[0]:.3g} → {lr:.3g}" if was else f"the lr is {lr:.3g}"
        log.info(
            f"Resuming with another schedule ({', '.join(changed) or 'the data'}): total steps "
            f"{saved.get('total_steps')} → {now['total_steps']}; the lr schedule now spans {now['total_steps']} "
            f"steps, so {lr_note} and follows the new curve from here"
        )

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
            prune_checkpoints(self._output_dir, self.cfg.keep_last_n_checkpoints, self._checkpoints.resumed_from)

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
                self._optimizer_step(step, epoch, t0, pbar)
                done += 1
                end_of_epoch = done == self._steps_per_epoch[epoch]
                stopping = stop is not None and self.global_step >= stop
                last = stopping or (end_of_epoch and epoch == self.total_epochs - 1)
                best = None if self._eval_loss is None else self._eval_loss.maybe_run(
                    self._model, self._loss_fn, self._device, self.global_step, last, self._metrics)  # fmt: skip
                preempted = self._preemption.agreed()
                save_now = self.global_step % self.cfg.save_every_n_steps == 0
                if end_of_epoch or stopping or preempted or best is not None or save_now:
                    # published before returning when the run exits next or `best` will name the folder
                    self.save_checkpoint(wait=preempted or best is not None)
                if best is not None:
                    self._eval_loss.mark_best(self.global_step, best)
                if preempted and not last:  # a run that just finished ends as finished
                    pbar.close()
                    raise Preempted(self.global_step)
                if end_of_epoch or stopping:
                    break
                step, t0 = _Step(), time.perf_counter()
            if stop is not None and self.global_step >= stop:
                utils.log_rank_zero(log, f"stop_after_steps: stopping after step {self.global_step}")
                break
        pbar.close()
        self._checkpoints.wait()  # the last save is complete before the run counts as done
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

    def _optimizer_step(self, step: _Step, epoch: int, t0: float, pbar: tqdm) -> None:
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
        self._checkpoints.wait_for_staging()  # an async save's host copy is complete before weights change
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        if self._device.type == "cuda":  # the optimizer's kernels belong to this step, not to the next one
            torch.cuda.synchronize(self._device)
        # The step window: from fetching the step's first micro-batch (t0, taken when the previous step
        # ended) through every forward/backward, the all-reduce, grad scaling, clipping, optimizer.step,
        # zero_grad and the lr-scheduler step. Checkpoint saves and metric logging fall outside it.
        step_seconds = time.perf_counter() - t0
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
                "tokens_per_second": tokens / step_seconds,
                "tokens_per_second_per_gpu": tokens / step_seconds / self.world_size,
                "padding_share": 1.0 - tokens / slots,
                "sampling_ratio": ratios.pop() if len(ratios) == 1 else sum(step.ratios) / len(step.ratios),
                "num_tokens": int(tokens),
                "num_loss_tokens": int(loss_tokens),
                "num_tiles": int(tiles),
                "attention_pairs": int(pairs),
                "tokens_seen": self.tokens_seen,
                "step_seconds": step_seconds,
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

    def save_checkpoint(self, *, wait: bool = False) -> Path | None:
        """``step_N`` of the current step, in ``checkpoint_format`` (see ``checkpoint_manager``); then
        ``latest``, then pruning to the last K. Collective. ``wait=True`` returns only once an async save
        is published (a run about to exit). Returns the folder on rank 0."""
        return self._checkpoints.save(self._model, self._optimizer, self._recipe_state(), self.global_step, wait=wait)

    def _recipe_state(self) -> dict[str, Any]:
        """Everything saved besides the model, the optimizer and the RNG states (the manager adds those)."""
        return {
            LR_SCHEDULER_KEY: None if self._lr_scheduler is None else self._lr_scheduler.state_dict(),
            SAMPLER_KEY: self._sampler.state_dict(),
            STEP_KEY: self.global_step,
            TOKENS_KEY: self.tokens_seen,
            SEED_KEY: self.seed,
            WORLD_SIZE_KEY: self.world_size,
            WANDB_RUN_KEY: self._wandb_run_id,
            SCHEDULE_KEY: self._schedule(),
        }

    def cleanup(self) -> None:
        self._preemption.uninstall()
        checkpoints = getattr(self, "_checkpoints", None)  # absent when setup failed before it
        if checkpoints is not None:
            checkpoints.close()
        if self._metrics is not None:
            self._metrics.plot()
            self._metrics.close()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def recipe_main(cfg: DocEVConfig) -> int:
    """Train; 0 when done, ``PREEMPTED_EXIT_CODE`` after a preemption checkpoint."""
    recipe = DocEVFinetuneRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
    except Preempted as exc:
        utils.log_rank_zero(log, str(exc))
        return PREEMPTED_EXIT_CODE
    finally:
        recipe.cleanup()
    return 0


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
    return recipe_main(cfg)


if __name__ == "__main__":
    sys.exit(main())
