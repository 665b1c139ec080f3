"""Saving and loading the recipe's ``step_N`` folders (torchtitan's CheckpointManager, cut to this recipe).

The manager owns the checkpoint side of a run: which folder it starts from, the recipe's resumable pieces
(``docev.training.state``: progress counters, sampler, lr scheduler, every rank's RNG, the W&B run id) held as
Stateful objects and handed back their state on resume, when to save (``maybe_save``: every
``save_every_n_steps``, at the end of an epoch or of the run, on preemption, and for a new best eval loss)
and pruning to the last ``keep_last_n_checkpoints`` (after each save, on resume and at the end).

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
any moment leaves ``latest`` naming a complete, loadable folder. Every file is digested by the rank that
wrote it and the digests sealed into the folder's ``checkpoint_manifest.json`` before the rename
(``docev.run.digests``); a resume first has the ranks verify the folder between them and
checks the recipe state against the manifest, and with ``resume_from_checkpoint: auto`` falls back
to the newest folder that verifies, saying so on every rank and in the metrics.
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
from docev.models.docev._dcp import MODEL_KEY, OPTIMIZER_KEY, UNUSED_KEY, DigestingWriter
from docev.run.checkpoints import (
    RECIPE_STATE,
    ResumeError,
    older_checkpoints,
    partial_path,
    prune_checkpoints,
    start_folder,
    step_name,
)
from docev.run.digests import MANIFEST, CheckpointCorrupt, check_files, read_manifest
from docev.run.diskspace import explain_write_error
from docev.training.peft import PeftRun, trained_state_dict
from docev.training.state import Stateful, manifest_record, recipe_problems

log = utils.get_logger("INFO")
_AUTO_HINT = ("; resume_from_checkpoint: auto falls back to the newest checkpoint that verifies (docev checkpoint "
              "verify step_N checks one)")  # fmt: skip


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
        self._states: dict[str, Stateful] = {}  # saved into recipe_state.pt, in this order on every rank
        self._resume_state: dict[str, Any] = {}
        self._model: torch.nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self.skipped: list[CheckpointCorrupt] = []  # newer checkpoints that did not verify (auto fell back)
        self._record: dict[str, Any] = {}  # the recipe state's summary sealed into the save in progress
        self.checkpoint_bytes = 0  # planned size of one save (the recipe sets it): named when a save fails
        self._writing: Path | None = None  # the partial folder of the save in flight

    # ------------------------------------------------------------------------------------------
    # loading

    def load(self) -> tuple[dict[str, Any], bool]:
        """The start folder's state and whether the run resumes. ``state["model"]`` is the full model for an
        HF folder (each tensor read by rows when the model is filled: ``docev.training.load``), None for a DCP
        one: its shards are read by ``load_sharded`` once model and optimizer exist. The other entries are the
        recipe state (``recipe_state.pt``; the full optimizer for an HF folder), handed to the Stateful pieces by
        :meth:`resume`. A resumed run prunes what the interrupted one left."""
        state, resumed = self._load()
        self._resume_state = state
        if resumed and self._is_rank_zero:
            self._prune(protect=self.resumed_from)
        return state, resumed

    def resume(self, **states: Stateful) -> None:
        """Hold ``states`` (saved with every checkpoint from now on) and, when the run resumes, give each its
        part of the start folder's recipe state. Called as the pieces come to exist; the RNG last, so setup's
        own random draws do not shift what the resumed steps draw."""
        for name, state in states.items():
            self._states[name] = state
            if self.resumed_from is not None:
                state.load_state_dict(self._resume_state)

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The model and optimizer every save writes."""
        self._model, self._optimizer = model, optimizer

    def _load(self) -> tuple[dict[str, Any], bool]:
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
        self.checkpointer = config.instantiate(  # verified by the ranks together in _start_folder
            self._checkpointer_cfg, checkpoint_dir=str(folder), output_dir=str(self._output_dir), verify=not resumed
        )
        if self.checkpointer.is_dcp:
            state = torch.load(folder / RECIPE_STATE, map_location="cpu", weights_only=True)
            state[MODEL_KEY] = None
        else:  # "model": each tensor read by rows, as much as this rank keeps (docev.training.load)
            state = self.checkpointer.open_checkpoint()
        utils.log_rank_zero(log, f"{'Resuming from' if resumed else 'Starting from'} {folder}")
        return state, resumed

    def _start_folder(self) -> tuple[Path, bool]:
        """Rank 0 decides (base or ``latest``, and with ``auto`` the older folders to fall back on) and tells
        the others, so nodes never disagree; then every candidate is verified by all ranks together."""
        choice: list[Any] = [None]
        if self._is_rank_zero:
            cfg, resume = self._cfg, self._cfg.resume_from_checkpoint
            folder, resumed = start_folder(cfg.checkpointer.checkpoint_dir, self._output_dir, resume)
            if self._peft is not None:  # a folder of other adapter settings is not resumed (see PeftRun)
                folder, resumed = self._peft.start_folder(folder, resumed, resume)
            fallbacks = older_checkpoints(self._output_dir, folder) if resumed and resume == "auto" else []
            choice[0] = ([folder, *fallbacks], resumed)
        dist.broadcast_object_list(choice, src=0)
        candidates, resumed = choice[0]
        if not resumed:
            return candidates[0], False
        for folder in candidates:
            problems = self._verify(folder)
            if not problems:
                break
            self.skipped.append(CheckpointCorrupt(folder, problems))
        else:
            hint = "" if len(candidates) > 1 else _AUTO_HINT
            raise ResumeError("; ".join(str(e) for e in self.skipped) + hint)
        if self.skipped:  # every rank says so: an operator reading any pod's log sees it
            log.warning(f"resume_from_checkpoint: auto: {'; '.join(str(e) for e in self.skipped)} — falling back to "
                        f"{folder}, the newest checkpoint that verifies")  # fmt: skip
        return folder, True

    def _verify(self, folder: Path) -> list[str]:
        """Collective: each rank recomputes the digests of its share of the folder's files; then rank 0 checks
        the recipe state against the manifest. Returns the problems (the same list on every rank)."""
        try:
            manifest = read_manifest(folder)
        except CheckpointCorrupt as exc:
            manifest, problems = None, exc.problems
        else:
            problems = [] if manifest else [f"no {MANIFEST} (not sealed by this docev)"]
        if manifest is not None:
            problems = check_files(folder, manifest, (self.rank, self.world_size))
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, problems)
        problems = sorted({p for ps in gathered for p in ps})
        verdict: list[Any] = [problems]
        if not problems and self._is_rank_zero:
            state = torch.load(folder / RECIPE_STATE, map_location="cpu", weights_only=True)
            verdict[0] = recipe_problems(folder, state, manifest)
        dist.broadcast_object_list(verdict, src=0)
        return verdict[0]

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

    def maybe_save(
        self, step: int, *, end_of_epoch: bool = False, last: bool = False, preempted: bool = False,
        best: bool = False,
    ) -> Path | None:  # fmt: skip
        """The save policy, after an optimizer step (collective): save every ``save_every_n_steps``, at the end of
        an epoch or of the run, on preemption, and when the step has a new best eval loss (``best`` will name
        the folder). A run about to exit, or a ``best`` pointer about to be written, waits for the folder to be
        published. Returns the folder on rank 0 when it saved."""
        if not (end_of_epoch or last or preempted or best or step % self._cfg.save_every_n_steps == 0):
            return None
        return self.save(step, wait=preempted or best)

    def save(self, step: int, *, wait: bool = False) -> Path | None:
        """``step_{step}`` with the model, the optimizer and the held Stateful pieces (``recipe_state.pt``).
        Waits first for an async save in flight; ``wait=True`` also waits for this one. Returns the folder on
        rank 0 (for an async save, where it will be)."""
        self.wait()
        start = time.perf_counter()
        model, optimizer = self._model, self._optimizer
        extra = {k: v for state in self._states.values() for k, v in state.state_dict().items()}
        self._record = manifest_record(extra)
        self._writing = partial_path(self._output_dir, step)
        try:
            if self.format == "adapter":
                folder = self._save_adapter(model, optimizer, extra, step, start)
            elif self.format == "hf":
                folder = self._save_hf(model, optimizer, extra, step, start)
            else:
                folder = self._save_dcp(model, optimizer, extra, step, start)
        except Exception as exc:
            self._reraise(exc)
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
            state = {MODEL_KEY: model_sd, OPTIMIZER_KEY: opt_sd, **extra}
            folder = self.checkpointer.save_checkpoint(state, step, self._record)
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
            folder = self.checkpointer.save_trained_checkpoint(state, step, self._peft.metadata(), self._record)
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
            # returns once every rank wrote (and digested) its shards and rank 0 wrote .metadata
            dcp.save(state, storage_writer=DigestingWriter(tmp))
            folder = self._publish(tmp, step, start, self._record) if self._is_rank_zero else None
            dist.barrier()
            return folder
        response = dcp.async_save(  # the writer thread digests what it wrote
            state, storage_writer=DigestingWriter(tmp), process_group=self._async_group, async_stager=self._stager
        )
        self._staging, self._pending = response.staging_completion, response.upload_completion
        if not self._is_rank_zero:
            return None
        self._published = Future()
        publish = partial(self._publish_when_written, self._published, tmp, step, start, self._record)
        self._pending.add_done_callback(publish)
        log.info(
            f"Saving {step_name(step)} in the background; training was blocked {time.perf_counter() - start:.2f} s"
        )
        return self._output_dir / step_name(step)

    def _publish_when_written(
        self, published: Future, tmp: Path, step: int, start: float, record: dict[str, Any], written: Future
    ) -> None:
        """Rank 0, in the writer thread: publish once the write (every rank's, then ``.metadata``) is done."""
        try:
            written.result()
            published.set_result(self._publish(tmp, step, start, record))
        except BaseException as exc:  # surfaced by the next wait()
            published.set_exception(exc)

    def _publish(self, tmp: Path, step: int, start: float, record: dict[str, Any]) -> Path:
        folder = self.checkpointer.publish(tmp, step, record)
        self._prune_and_log(folder, start)
        return folder

    def _prune_and_log(self, folder: Path, start: float) -> None:
        removed = self._prune(protect=self.resumed_from)
        kept = f"; removed {', '.join(p.name for p in removed)}" if removed else ""
        log.info(f"Saved {folder} ({self.format}) in {time.perf_counter() - start:.1f} s{kept}")

    def _prune(self, protect: Path | None) -> list[Path]:
        """Rank 0: keep the last ``keep_last_n_checkpoints`` (and ``protect``, and the folder ``best`` names)."""
        return prune_checkpoints(self._output_dir, self._cfg.keep_last_n_checkpoints, protect)

    def finish(self) -> None:
        """The end of a completed run: the last save is published before the run counts as done, and the
        folder it resumed from is no longer needed for saving (pruned if past the last K)."""
        self.wait()
        if self._is_rank_zero:
            self._prune(protect=None)

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
        try:
            if pending is not None:
                pending.result()
            if published is not None:
                published.result()
        except Exception as exc:
            self._reraise(exc)

    def _reraise(self, exc: Exception) -> None:
        """A save's failure; on a full or read-only file system, one naming the path, bytes needed and free."""
        explained = explain_write_error(exc, self._writing or self._output_dir, self.checkpoint_bytes)
        if explained is exc:
            raise exc
        raise explained from exc

    def close(self) -> None:
        """Wait for the save in flight (a run's last checkpoint must be complete before the process exits)."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self._async_group is not None and dist.is_initialized():
            dist.destroy_process_group(self._async_group)
            self._async_group = None
