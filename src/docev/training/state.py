"""What the recipe keeps beside the weights (``recipe_state.pt``): its keys and every rank's RNG states."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

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
