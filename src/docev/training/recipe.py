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
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record
from torchtune import config, training, utils
from torchtune.modules.loss import CEWithChunkedOutputLoss
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from docev.config import ConfigError, DocEVConfig, load_config
from docev.data.loader import build_dataloader
from docev.eval_loss import EvalLoss
from docev.models.docev import image_positions
from docev.models.docev._dcp import OPTIMIZER_KEY
from docev.run.diskspace import check_room
from docev.run.paths import run_paths
from docev.training.checkpoint_manager import CheckpointManager
from docev.training.memory import GIB, checkpoint_bytes, refuse_oversized
from docev.training.metrics_log import MetricsLog, wandb_mode, wandb_run_id
from docev.training.parallelize import (
    graphs_per_code_object,
    is_hybrid,
    precision_warning,
    run_mesh,
    setup_model,
    sync_gradients,
)
from docev.training.peft import PeftRun
from docev.training.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionHandler
from docev.training.preflight import require_torch_apis
from docev.training.state import (
    LR_SCHEDULER_KEY,
    RNG,
    SAMPLER_KEY,
    SCHEDULE_FIELDS,
    Entry,
    Progress,
    Schedule,
    WandbRun,
)
from docev.training.step_stats import StepStats, fail_non_finite, scale_and_clip

log = utils.get_logger("INFO")


def component(cfg: DocEVConfig, name: str) -> DictConfig:
    """A ``_component_`` section as the DictConfig ``torchtune.config.instantiate`` takes."""
    return OmegaConf.create(cfg.to_dict()[name])


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
        require_torch_apis()  # a torch without an API used below fails here, naming it
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
        self._progress = Progress(self.seed, self.world_size)  # steps and tokens, saved and resumed
        self._wandb = WandbRun()

        self._paths = run_paths(cfg)
        self._output_dir = self._paths.checkpoints
        self._gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.clip_grad_norm
        self._log_every_n_steps = cfg.log_every_n_steps
        self._log_peak_memory_stats = cfg.log_peak_memory_stats and self._device.type == "cuda"
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.max_steps_per_epoch
        self._metrics: MetricsLog | None = None
        self._preemption = PreemptionHandler(self._device)
        self._peft = PeftRun.from_config(cfg)  # None: full fine-tuning

    # ------------------------------------------------------------------------------------------
    # setup

    @property
    def global_step(self) -> int:
        return self._progress.step

    def setup(self) -> None:
        """Preemption handler, checkpoint (base or ``latest``), model, optimizer, loss, data, metric logger
        (continuing the checkpoint's W&B run), lr scheduler; the checkpoint manager hands each resumable piece
        its state as it comes to exist (the RNG last)."""
        cfg = self.cfg
        self._preemption.install()
        if self._device.type == "cuda":  # refused before any weight is read (docev plan-memory, GPU memory)
            refuse_oversized(cfg, torch.cuda.get_device_properties(self._device).total_memory / GIB)
        self._checkpoints = CheckpointManager(
            cfg, component(cfg, "checkpointer"), self._output_dir, self._device, peft=self._peft
        )
        state, resumed = self._checkpoints.load()
        warning = precision_warning(self._master_dtype, (cfg.optimizer.model_extra or {}).get("lr"))
        if warning is not None and self._is_rank_zero:
            log.warning(warning)

        model_sd = state.pop("model")  # None: a sharded (DCP) folder, read once model and optimizer exist
        self._model = self._setup_model(model_sd)
        self._optimizer = self._setup_optimizer(state.get(OPTIMIZER_KEY) if resumed else None)
        if model_sd is None:
            self._checkpoints.load_sharded(self._model, self._optimizer)
        self._checkpoints.attach(self._model, self._optimizer)
        self._loss_fn = self._setup_loss()
        # uint8 tiles travel to the device and are normalised there (4x fewer bytes, no host float work)
        self._dataloader, self._sampler = build_dataloader(
            cfg, rank=self.rank, world_size=self.world_size, dtype=self._dtype, normalize=False
        )
        self._eval_loss = EvalLoss.from_config(cfg, self._dataloader.collate_fn, rank=self.rank,
                                                world_size=self.world_size, checkpoint_dir=self._output_dir,
                                                resumed=resumed)  # fmt: skip
        self._checkpoints.resume(progress=self._progress, sampler=Entry(SAMPLER_KEY, self._sampler),
                                 wandb=self._wandb)  # fmt: skip
        # room for two saves, checked after a resume pruned what an interrupted save left and before anything
        # of the run is rewritten: a restart on a disk still full fails here
        need = checkpoint_bytes(self._model, self._master_dtype, trained_only=self._peft is not None)
        self._checkpoints.checkpoint_bytes = need
        room = check_room(self._output_dir, need)
        if room is not None and self._is_rank_zero:
            log.warning(room)
        if self._is_rank_zero:
            self._metrics = self._setup_metrics()
            self._metrics.truncate_after(self.global_step)  # lines past the checkpoint are repeated by this run
            for skipped in self._checkpoints.skipped:  # auto fell back past a corrupt checkpoint: on the record
                self._metrics.event("resume_fallback", self.global_step, corrupt=str(skipped.folder),
                                    problems=skipped.problems)  # fmt: skip

        self._steps_per_epoch = [self._steps_in_epoch(e) for e in range(self.total_epochs)]
        if self._steps_per_epoch[0] == 0:
            raise ValueError(
                f"the shards give no full step: {len(self._sampler)} micro-batches per rank in epoch 0, a step takes "
                f"gradient_accumulation_steps = {self._gradient_accumulation_steps} (batch_size {cfg.batch_size} × "
                f"{self.world_size} ranks per micro-batch)"
            )
        self._total_steps = sum(self._steps_per_epoch)
        self._lr_scheduler = self._setup_lr_scheduler()
        schedule = Schedule(self._schedule())
        self._checkpoints.resume(lr_scheduler=Entry(LR_SCHEDULER_KEY, self._lr_scheduler), schedule=schedule,
                                 rng=RNG(self.rank, self.world_size))  # fmt: skip
        if self._is_rank_zero and (line := schedule.change(self.global_step, self._optimizer.param_groups[0]["lr"])):
            log.info(line)
        self._ignore_index = getattr(self._loss_fn, "ignore_index", -100)

    def _setup_metrics(self) -> MetricsLog:
        cfg = self.cfg
        wandb_mode(cfg.metric_logger.component)
        self._wandb.id = wandb_run_id(cfg.metric_logger, self._wandb.saved)
        resume = {"id": self._wandb.id, "resume": "allow"} if self._wandb.id else {}
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

    def _setup_lr_scheduler(self) -> Any:
        """The schedule spans every epoch's steps; ``last_epoch`` puts a resumed run at its step (the manager
        then loads the scheduler's own state)."""
        if self.cfg.lr_scheduler is None:
            return None
        return config.instantiate(
            component(self.cfg, "lr_scheduler"),
            self._optimizer,
            num_training_steps=self._total_steps,
            last_epoch=self.global_step - 1,
        )

    def _schedule(self) -> dict[str, Any]:
        cfg = self.cfg
        values = (self.total_epochs, self.max_steps_per_epoch, cfg.batch_size, self._gradient_accumulation_steps,
                  self.world_size)  # fmt: skip
        return {**dict(zip(SCHEDULE_FIELDS, values, strict=True)), "total_steps": self._total_steps}

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
            step = StepStats()
            for batch in self._dataloader:
                self._sampler.advance(1)
                self._forward_backward(batch, step)
                if len(step.losses) < self._gradient_accumulation_steps:
                    continue
                self._optimizer_step(step, epoch, pbar)
                done += 1
                end_of_epoch = done == self._steps_per_epoch[epoch]
                stopping = stop is not None and self.global_step >= stop
                last = stopping or (end_of_epoch and epoch == self.total_epochs - 1)
                best = None if self._eval_loss is None else self._eval_loss.maybe_run(
                    self._model, self._loss_fn, self._device, self.global_step, last, self._metrics)  # fmt: skip
                preempted = self._preemption.agreed()
                self._checkpoints.maybe_save(self.global_step, end_of_epoch=end_of_epoch, last=last,
                                             preempted=preempted, best=best is not None)  # fmt: skip
                if best is not None:
                    self._eval_loss.mark_best(self.global_step, best)
                if preempted and not last:  # a run that just finished ends as finished
                    pbar.close()
                    raise Preempted(self.global_step)
                if end_of_epoch or stopping:
                    break
                step = StepStats()
            if stop is not None and self.global_step >= stop:
                utils.log_rank_zero(log, f"stop_after_steps: stopping after step {self.global_step}")
                break
        pbar.close()
        self._checkpoints.finish()

    def _forward_backward(self, batch: dict[str, Any], step: StepStats) -> None:
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
        images = {"image_sizes": None, "image_grids": None, "image_slots": None}
        if batch["pixel_values"] is not None:  # as Python data and host-computed slots: no device sync in forward
            slots = image_positions(batch["tokens"], self._model.image_token_id)
            images = {"image_sizes": batch["image_sizes"].tolist(), "image_grids": batch["image_grids"].tolist(),
                      "image_slots": slots.to(device, non_blocking=True)}  # fmt: skip
        with self._activations_ctx:
            logits = self._model(
                batch["tokens"].to(device, non_blocking=True),
                **optional,
                **images,
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
        step.record(batch, loss, n_loss)

    def _optimizer_step(self, step: StepStats, epoch: int, pbar: tqdm) -> None:
        bad, totals = step.all_reduce(self._device)
        loss_sum, n_bad, tokens, loss_tokens = totals[:4]
        if n_bad or not math.isfinite(loss_sum):
            ids = [i for flag, i in zip(bad.tolist(), step.sample_ids, strict=True) if flag]
            fail_non_finite(f"loss is {loss_sum / max(loss_tokens, 1)}", self.global_step + 1, ids, self.world_size)
        # Gradients hold sums over this rank's loss tokens; FSDP averages over ranks. Scale to the mean
        # over every loss token of the step.
        grad_norm = scale_and_clip(self._optimizer, self.world_size / max(loss_tokens, 1.0), self._clip_grad_norm)
        if not math.isfinite(grad_norm):
            fail_non_finite(f"gradient norm is {grad_norm}", self.global_step + 1, step.sample_ids, self.world_size)
        lr = get_lr(self._optimizer)
        self._checkpoints.wait_for_staging()  # an async save's host copy is complete before weights change
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        if self._device.type == "cuda":  # the optimizer's kernels belong to this step, not to the next one
            torch.cuda.synchronize(self._device)
        # The step window: from fetching the step's first micro-batch (StepStats() taken when the previous step
        # ended) through every forward/backward, the all-reduce, grad scaling, clipping, optimizer.step,
        # zero_grad and the lr-scheduler step. Checkpoint saves and metric logging fall outside it.
        seconds = step.elapsed()
        self._progress.step += 1
        self._progress.tokens += int(tokens)
        pbar.update(1)
        pbar.set_description(f"{epoch + 1}|{self.global_step}|loss {loss_sum / max(loss_tokens, 1.0):.4f}")
        if self._metrics is not None and self.global_step % self._log_every_n_steps == 0:
            metrics = step.metrics(totals, lr=lr, grad_norm=grad_norm, seconds=seconds, epoch=epoch,
                                   tokens_seen=self._progress.tokens, world_size=self.world_size)  # fmt: skip
            if self.cfg.compile:  # bounded by the padding buckets (dataloader.pad_to_multiple_of, packed rows)
                metrics["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                metrics["graphs_per_code_object"] = max(graphs_per_code_object().values())
            if self._log_peak_memory_stats:
                metrics.update(training.get_memory_stats(device=self._device))
            self._metrics.log(metrics, step=self.global_step)

    # ------------------------------------------------------------------------------------------
    # checkpoints and shutdown

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
