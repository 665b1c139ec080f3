"""What the recipe keeps beside the weights (``recipe_state.pt``): its keys, every rank's RNG states, and the
summary sealed into the step folder's manifest that the state is checked against before use."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from docev.run.checkpoints import RECIPE_STATE, step_of

# Keys of the recipe state saved beside the weights (in recipe_state.pt).
LR_SCHEDULER_KEY = "lr_scheduler"
SAMPLER_KEY = "sampler"
RNG_KEY = "rng"
STEP_KEY = "global_step"
TOKENS_KEY = "tokens_seen"
SEED_KEY = "seed"
WORLD_SIZE_KEY = "world_size"
WANDB_RUN_KEY = "wandb_run_id"  # a restarted run continues this W&B run (None without W&B)


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
