"""Saving and loading the recipe's ``step_N`` folders (torchtitan's CheckpointManager, cut to this recipe).

Two layouts (``checkpoint_format``), read by resume, ``docev export`` and ``docev generate`` alike:

- **dcp** (default): a ``torch.distributed.checkpoint`` folder. Every rank writes its own shards of the
  model and the optimizer in parallel (FSDP2's ``model.state_dict()`` of DTensor shards, which keeps the
  torchtune keys that ``FusionEmbedding``'s hooks rename, and ``get_optimizer_state_dict``); rank 0 adds
  ``.metadata`` once every rank's data is written, plus ``recipe_state.pt`` (every other entry of the
  recipe state, the RNG states of every rank among them), ``config.json`` and the tokenizer files. On
  resume each rank reads only its own byte ranges (DCP reshards when the world size differs); nobody
  reads the whole optimizer. With ``enable_async_checkpointing`` the save returns at once: a thread
  copies the shards to host memory (a buffer kept for the run and reused by every save) while the next
  step's forward and backward run (the recipe calls ``wait_for_staging`` before its optimizer step),
  then a background thread writes them, coordinating over a gloo group of its own so its collectives
  never interleave with the training loop's. The next save and the end of the run wait for it.
- **hf**: the model and the optimizer gathered to rank 0, which writes HF safetensors and a
  ``recipe_state.pt`` holding the full optimizer (``DocEVCheckpointer.save_checkpoint``).

Either way a folder is written as ``.step_N.partial`` and renamed when complete (for an async save,
when the background write finishes), then ``latest`` moves, then pruning keeps the last K: a kill at
any moment leaves ``latest`` naming a complete, loadable folder.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torchtune import config, training, utils

from docev.config import DocEVConfig
from docev.models.docev import DocEVCheckpointer
from docev.models.docev._dcp import MODEL_KEY, OPTIMIZER_KEY, UNUSED_KEY
from docev.run.checkpoints import RECIPE_STATE, partial_path, prune_checkpoints, start_folder, step_name
from docev.training.peft import PeftRun, trained_state_dict
from docev.training.state import RNG_KEY, capture_rng

log = utils.get_logger("INFO")


class CheckpointManager:
    """Start folder, load and save of the recipe's checkpoints on every rank (each method is collective).

    Args:
        cfg (DocEVConfig): the run's config (``checkpoint_format``, ``enable_async_checkpointing``,
            ``keep_last_n_checkpoints``, ``resume_from_checkpoint``, ``checkpointer.checkpoint_dir``).
        checkpointer (DictConfig): the ``checkpointer`` component, instantiated on the start folder.
        output_dir (Path): where ``step_N`` folders and ``latest`` go.
        device (torch.device): the training device (gathers for the hf format go through it).
        peft (PeftRun | None): an adapter run (``docev.training.peft``): it starts from the base with a step
            folder's trained tensors laid over it, and saves only those tensors.
    """

    def __init__(
        self,
        cfg: DocEVConfig,
        checkpointer: DictConfig,
        output_dir: Path,
        device: torch.device,
        peft: PeftRun | None = None,
    ) -> None:
        # An adapter run saves its trained tensors only (small, gathered to rank 0), whatever the format.
        self.format = "adapter" if peft is not None else cfg.checkpoint_format
        self._peft = peft
        self._cfg, self._checkpointer_cfg = cfg, checkpointer
        self._output_dir, self._device = output_dir, device
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0
        self._async_group = self._stager = None
        if cfg.enable_async_checkpointing:
            timeout = timedelta(seconds=cfg.train.collective_timeout_seconds)
            self._async_group = dist.new_group(backend="gloo", timeout=timeout)
            # One stager for the run: it keeps the host copy of this rank's shards between saves, so a
            # later save only copies into it (no fresh allocation and page faults); pinned, on a side
            # stream, on CUDA. The copy runs in a thread while the next step's forward/backward runs:
            # wait_for_staging() before anything changes the parameters or the optimizer state.
            on_cuda = device.type == "cuda"
            self._stager = DefaultStager(StagingOptions(on_cuda, False, True, on_cuda))
        self._staging: Future | None = None  # every rank: the host copy of the in-flight async save
        self._pending: Future | None = None  # every rank: the in-flight async write
        self._published: Future | None = None  # rank 0: done once that write is renamed into place
        self.checkpointer: DocEVCheckpointer | None = None
        self.resumed_from: Path | None = None

    # ------------------------------------------------------------------------------------------
    # loading

    def load(self) -> tuple[dict[str, Any], bool]:
        """The start folder's state and whether the run resumes. ``state["model"]`` is the full model for an
        HF folder, None for a DCP one: its shards are read by ``load_sharded`` once model and optimizer exist.
        The other entries are the recipe state (``recipe_state.pt``; the full optimizer for an HF folder)."""
        folder, resumed = self._start_folder()
        self.resumed_from = folder if resumed else None
        if self._peft is not None:  # weights come from the base; the step folder's trained tensors go over them
            self.checkpointer = config.instantiate(
                self._checkpointer_cfg,
                checkpoint_dir=str(self._cfg.checkpointer.checkpoint_dir),
                output_dir=str(self._output_dir),
            )
            state = self._peft.load(self.checkpointer, self.resumed_from)
            utils.log_rank_zero(log, f"{'Resuming from' if resumed else 'Starting from'} {folder}")
            return state, resumed
        self.checkpointer = config.instantiate(
            self._checkpointer_cfg, checkpoint_dir=str(folder), output_dir=str(self._output_dir)
        )
        if self.checkpointer.is_dcp:
            state = torch.load(folder / RECIPE_STATE, map_location="cpu", weights_only=True)
            state[MODEL_KEY] = None
        else:
            state = self.checkpointer.load_checkpoint()
        utils.log_rank_zero(log, f"{'Resuming from' if resumed else 'Starting from'} {folder}")
        return state, resumed

    def _start_folder(self) -> tuple[Path, bool]:
        """Rank 0 decides (base or ``latest``) and tells the others, so nodes never disagree."""
        choice: list[Any] = [None]
        if self._is_rank_zero:
            cfg = self._cfg
            choice[0] = start_folder(cfg.checkpointer.checkpoint_dir, self._output_dir, cfg.resume_from_checkpoint)
            if self._peft is not None:  # a folder of other adapter settings is not resumed (see PeftRun)
                choice[0] = self._peft.start_folder(*choice[0], cfg.resume_from_checkpoint)
        dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def load_sharded(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Fill the sharded model and optimizer from the DCP start folder; each rank reads its own shards."""
        folder = self.checkpointer.checkpoint_dir
        metadata = FileSystemReader(str(folder)).read_metadata()
        state = {
            MODEL_KEY: model.state_dict(),
            OPTIMIZER_KEY: get_optimizer_state_dict(model, optimizer),
            UNUSED_KEY: {},
        }
        # DCP loads only the entries the template has: add the unused tensors, and the param-group keys a
        # fresh optimizer lacks (the lr scheduler's initial_lr), from the checkpoint's own index.
        groups = state[OPTIMIZER_KEY]["param_groups"]
        for key, path in metadata.planner_data.items():
            entry = metadata.state_dict_metadata[key]
            if path[0] == UNUSED_KEY and isinstance(entry, TensorStorageMetadata):
                state[UNUSED_KEY][path[1]] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
            elif path[:2] == (OPTIMIZER_KEY, "param_groups") and len(path) == 4:
                groups[path[2]].setdefault(path[3], None)
        dcp.load(state, checkpoint_id=str(folder))
        model.load_state_dict(state[MODEL_KEY], strict=True)
        set_optimizer_state_dict(model, optimizer, state[OPTIMIZER_KEY])
        self.checkpointer.unused = state[UNUSED_KEY]

    # ------------------------------------------------------------------------------------------
    # saving

    def save(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        recipe_state: dict[str, Any],
        step: int,
        *,
        wait: bool = False,
    ) -> Path | None:
        """``step_{step}`` with the model, optimizer, ``recipe_state`` (every other entry, saved as given) and
        the RNG states of every rank. Waits first for an async save in flight; ``wait=True`` also waits for
        this one (a run about to exit). Returns the folder on rank 0 (for an async save, where it will be)."""
        self.wait()
        start = time.perf_counter()
        rng: list[Any] = [None] * self.world_size
        dist.all_gather_object(rng, capture_rng())
        extra = {**recipe_state, RNG_KEY: rng}
        if self.format == "adapter":
            folder = self._save_adapter(model, optimizer, extra, step, start)
        elif self.format == "hf":
            folder = self._save_hf(model, optimizer, extra, step, start)
        else:
            folder = self._save_dcp(model, optimizer, extra, step, start)
        if wait:
            self.wait()
        return folder

    def _save_hf(self, model, optimizer, extra: dict[str, Any], step: int, start: float) -> Path | None:
        model_sd = training.gather_cpu_state_dict(model, self._is_rank_zero, device=self._device)
        if model_sd:  # one dtype in the folder: the replicated frozen tower is held in the compute dtype
            master = model_sd["image_newline"].dtype
            model_sd = {k: v.to(master) if v.is_floating_point() else v for k, v in model_sd.items()}
        opt_sd = training.get_full_optimizer_state_dict(model, optimizer, self._is_rank_zero, device=self._device)
        folder = None
        if self._is_rank_zero:
            folder = self.checkpointer.save_checkpoint({MODEL_KEY: model_sd, OPTIMIZER_KEY: opt_sd, **extra}, step)
            self._prune_and_log(folder, start)
        dist.barrier()
        return folder

    def _save_adapter(self, model, optimizer, extra: dict[str, Any], step: int, start: float) -> Path | None:
        assert self._peft is not None
        model_sd = trained_state_dict(model, self._is_rank_zero)
        opt_sd = training.get_full_optimizer_state_dict(model, optimizer, self._is_rank_zero, device=self._device)
        folder = None
        if self._is_rank_zero:
            state = {MODEL_KEY: model_sd, OPTIMIZER_KEY: opt_sd, **extra}
            folder = self.checkpointer.save_trained_checkpoint(state, step, self._peft.metadata())
            self._prune_and_log(folder, start)
        dist.barrier()
        return folder

    def _save_dcp(self, model, optimizer, extra: dict[str, Any], step: int, start: float) -> Path | None:
        state = {
            MODEL_KEY: model.state_dict(),
            OPTIMIZER_KEY: get_optimizer_state_dict(model, optimizer),
            UNUSED_KEY: self.checkpointer.unused,
        }
        tmp = partial_path(self._output_dir, step)
        if self._is_rank_zero:
            self.checkpointer.partial_folder(step)
            self.checkpointer.write_side_files(tmp, state[MODEL_KEY]["image_newline"].dtype)
            torch.save(extra, tmp / RECIPE_STATE)
        dist.barrier()  # the empty folder exists before any rank writes into it
        if self._async_group is None:
            dcp.save(state, checkpoint_id=str(tmp))  # returns once every rank wrote and rank 0 wrote .metadata
            folder = self._publish(tmp, step, start) if self._is_rank_zero else None
            dist.barrier()
            return folder
        response = dcp.async_save(
            state, checkpoint_id=str(tmp), process_group=self._async_group, async_stager=self._stager
        )
        self._staging, self._pending = response.staging_completion, response.upload_completion
        if not self._is_rank_zero:
            return None
        self._published = Future()
        self._pending.add_done_callback(partial(self._publish_when_written, self._published, tmp, step, start))
        log.info(
            f"Saving {step_name(step)} in the background; training was blocked {time.perf_counter() - start:.2f} s"
        )
        return self._output_dir / step_name(step)

    def _publish_when_written(self, published: Future, tmp: Path, step: int, start: float, written: Future) -> None:
        """Rank 0, in the writer thread: publish once the write (every rank's, then ``.metadata``) is done."""
        try:
            written.result()
            published.set_result(self._publish(tmp, step, start))
        except BaseException as exc:  # surfaced by the next wait()
            published.set_exception(exc)

    def _publish(self, tmp: Path, step: int, start: float) -> Path:
        folder = self.checkpointer.publish(tmp, step)
        self._prune_and_log(folder, start)
        return folder

    def _prune_and_log(self, folder: Path, start: float) -> None:
        removed = prune_checkpoints(self._output_dir, self._cfg.keep_last_n_checkpoints, self.resumed_from)
        kept = f"; removed {', '.join(p.name for p in removed)}" if removed else ""
        log.info(f"Saved {folder} ({self.format}) in {time.perf_counter() - start:.1f} s{kept}")

    def wait_for_staging(self) -> None:
        """Block until the async save in flight has its host copy (call before the optimizer step: the copy
        must not see parameters or optimizer state from after the step it saves)."""
        staging, self._staging = self._staging, None
        if staging is not None:
            staging.result()

    def wait(self) -> None:
        """Block until the async save in flight is written and published; raise its failure, if any."""
        self.wait_for_staging()
        pending, published = self._pending, self._published
        self._pending = self._published = None
        if pending is not None:
            pending.result()
        if published is not None:
            published.result()

    def close(self) -> None:
        """Wait for the save in flight (a run's last checkpoint must be complete before the process exits)."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self._async_group is not None and dist.is_initialized():
            dist.destroy_process_group(self._async_group)
            self._async_group = None
