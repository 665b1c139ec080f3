"""The recipe's resumable pieces as objects with ``state_dict()`` / ``load_state_dict()`` (torch's Stateful).

The checkpoint manager holds them, saves the union of their state dicts as ``recipe_state.pt`` beside the
weights, and hands each its part back on resume; the recipe no longer packs or unpacks a dict. Keys stay
flat (``global_step``, ``sampler``, ``rng``, …) so existing checkpoints read the same. The step, world size
and sampler position are also sealed into the step folder's manifest, and checked against it before use.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torchtune import utils

from docev.run.checkpoints import RECIPE_STATE, step_of

log = utils.get_logger("INFO")

LR_SCHEDULER_KEY = "lr_scheduler"
SAMPLER_KEY = "sampler"
RNG_KEY = "rng"
STEP_KEY = "global_step"
TOKENS_KEY = "tokens_seen"
SEED_KEY = "seed"
WORLD_SIZE_KEY = "world_size"
WANDB_RUN_KEY = "wandb_run_id"  # a restarted run continues this W&B run (None without W&B)
SCHEDULE_KEY = "schedule"  # the schedule a checkpoint was trained on
SCHEDULE_FIELDS = ("epochs", "max_steps_per_epoch", "batch_size", "gradient_accumulation_steps", "world_size")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Progress:
    """Optimizer steps taken and tokens seen, with the seed and world size they were reached with: a resumed
    run continues the count, refuses another seed (the data order would change) and warns on another world
    size (the samples after the checkpoint differ from an uninterrupted run)."""

    def __init__(self, seed: int, world_size: int):
        self.seed, self.world_size = seed, world_size
        self.step = 0
        self.tokens = 0

    def state_dict(self) -> dict[str, Any]:
        return {STEP_KEY: self.step, TOKENS_KEY: self.tokens, SEED_KEY: self.seed, WORLD_SIZE_KEY: self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
        self.step, self.tokens = int(state[STEP_KEY]), int(state[TOKENS_KEY])


class Entry:
    """Another object's state dict under one key (the sampler, the lr scheduler; ``None`` when absent)."""

    def __init__(self, key: str, obj: Any):
        self.key, self.obj = key, obj

    def state_dict(self) -> dict[str, Any]:
        return {self.key: None if self.obj is None else self.obj.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.obj is not None and state.get(self.key) is not None:
            self.obj.load_state_dict(state[self.key])


class RNG:
    """Every rank's random generators. ``state_dict`` gathers them (collective: every rank saves together);
    a resume on the same world size puts this rank's back, so random draws repeat exactly."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def state_dict(self) -> dict[str, Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, capture_rng())
        return {RNG_KEY: gathered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state[RNG_KEY]) == self.world_size:
            restore_rng(state[RNG_KEY][self.rank])


class WandbRun:
    """The W&B run this training logs to (``id``, set when the logger starts), and the one a resumed checkpoint
    logged to (``saved``), so a restarted job continues one run."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.saved: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {WANDB_RUN_KEY: self.id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = state.get(WANDB_RUN_KEY)


class Schedule:
    """The schedule a run trains on (``SCHEDULE_FIELDS`` and the total steps), saved with each checkpoint. A
    resume with another one says what changes: the lr curve spans the new total, so the lr at the resumed
    step moves (checkpoints from before the schedule was recorded resume silently)."""

    def __init__(self, values: dict[str, Any]):
        self.values = values
        self.saved: dict[str, Any] | None = None
        self.saved_lr: list[float] | None = None  # the lr scheduler's last lr in the checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {SCHEDULE_KEY: self.values}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = state.get(SCHEDULE_KEY)
        self.saved_lr = (state.get(LR_SCHEDULER_KEY) or {}).get("_last_lr")

    def change(self, step: int, lr: float) -> str | None:
        """The line a resume with another schedule logs (None when nothing changed)."""
        saved, now = self.saved, self.values
        if saved is None:
            return None
        changed = [f"{k} {saved.get(k)} → {now[k]}" for k in SCHEDULE_FIELDS if saved.get(k) != now[k]]
        if not changed and saved.get("total_steps") == now["total_steps"]:
            return None
        was = self.saved_lr
        lr_note = f"the lr at step {step} goes {was[0]:.3g} → {lr:.3g}" if was else f"the lr is {lr:.3g}"
        return (
            f"Resuming with another schedule ({', '.join(changed) or 'the data'}): total steps "
            f"{saved.get('total_steps')} → {now['total_steps']}; the lr schedule now spans {now['total_steps']} "
            f"steps, so {lr_note} and follows the new curve from here"
        )


def capture_rng() -> dict[str, Any]:
    """This process's random generator states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def manifest_record(state: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records of the recipe state, to check it against before it is used."""
    return {k: dict(state[k]) if k == SAMPLER_KEY else state[k] for k in (STEP_KEY, WORLD_SIZE_KEY, SAMPLER_KEY)
            if k in state}  # fmt: skip


def recipe_problems(folder: Path, state: dict[str, Any], manifest: dict[str, Any] | None) -> list[str]:
    """Disagreements between a step folder's recipe state, its name and its manifest's record (step, sampler
    position, world size, one RNG state per rank)."""
    problems = []
    step = step_of(folder)
    if state.get(STEP_KEY) != step:
        problems.append(f"{RECIPE_STATE}: {STEP_KEY} is {state.get(STEP_KEY)!r}, the folder is step_{step}")
    record = (manifest or {}).get("recipe", {})
    for key, want in record.items():
        got = state.get(key)
        if (dict(got) if isinstance(got, dict) else got) != want:
            problems.append(f"{RECIPE_STATE}: {key} is {got!r}, the manifest recorded {want!r}")
    rng = state.get(RNG_KEY)
    if rng is not None and len(rng) != state.get(WORLD_SIZE_KEY):
        problems.append(f"{RECIPE_STATE}: {len(rng)} RNG states for {WORLD_SIZE_KEY} {state.get(WORLD_SIZE_KEY)!r}")
    return problems
