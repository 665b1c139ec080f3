"""What the recipe keeps beside the weights, and which checkpoint folders it keeps.

``DocEVCheckpointer`` writes a ``step_N`` folder atomically (under ``.step_N.partial``, renamed when
complete) and moves ``latest`` last, so a kill at any moment leaves ``latest`` naming a complete
folder. This module adds the recipe's side: choosing the folder a run starts from, the RNG states of
every rank, pruning to the last K folders (plus the leftovers of an interrupted save), and the ``best``
pointer: the saved step with the lowest eval loss, written after the folder it names is complete and
kept out of pruning. Its second line holds the loss and step as JSON, so a resumed run compares its
evaluations against the same record.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from docev.config import DocEVConfig
from docev.models.docev import latest_checkpoint
from docev.models.docev._checkpointer import LATEST, RECIPE_STATE
from docev.models.docev._digests import MANIFEST, CheckpointCorrupt, verify_checkpoint

BEST = "best"

_STEP_DIR = re.compile(r"step_(\d+)")
_PARTIAL = re.compile(r"\.step_\d+\.partial")

# Keys of the recipe state saved beside the weights (in recipe_state.pt).
OPTIMIZER_KEY = "optimizer"
LR_SCHEDULER_KEY = "lr_scheduler"
SAMPLER_KEY = "sampler"
RNG_KEY = "rng"
STEP_KEY = "global_step"
TOKENS_KEY = "tokens_seen"
SEED_KEY = "seed"
WORLD_SIZE_KEY = "world_size"
WANDB_RUN_KEY = "wandb_run_id"  # a restarted run continues this W&B run (None without W&B)
RECIPE_KEYS = (OPTIMIZER_KEY, LR_SCHEDULER_KEY, SAMPLER_KEY, RNG_KEY, STEP_KEY, TOKENS_KEY, SEED_KEY, WORLD_SIZE_KEY,
               WANDB_RUN_KEY)  # fmt: skip


class ResumeError(RuntimeError):
    """``resume_from_checkpoint`` cannot be honoured (no checkpoint, or one without recipe state)."""


class CheckpointError(ValueError):
    """A ``--checkpoint`` choice that names no checkpoint folder."""


@dataclass(frozen=True)
class Best:
    """What the ``best`` pointer records."""

    folder: Path
    step: int
    eval_loss: float


def read_best(output_dir: str | Path) -> Best | None:
    """The ``best`` pointer, or None before the first evaluation with a checkpoint."""
    pointer = Path(output_dir) / BEST
    if not pointer.is_file():
        return None
    name, _, record = pointer.read_text().partition("\n")
    folder = pointer.parent / name.strip()
    if not folder.is_dir():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which does not exist")
    data = json.loads(record)
    return Best(folder, int(data["step"]), float(data["eval_loss"]))


def write_best(output_dir: str | Path, folder: Path, eval_loss: float) -> Best:
    """Point ``best`` at a complete step folder (atomic replace)."""
    out = Path(output_dir)
    step = step_of(folder)
    tmp = out / f".{BEST}.tmp"
    tmp.write_text(f"{folder.name}\n{json.dumps({'step': step, 'eval_loss': eval_loss})}\n")
    os.replace(tmp, out / BEST)
    return Best(out / folder.name, step, eval_loss)


def resolve_checkpoint(cfg: DocEVConfig, which: str) -> Path:
    """``latest`` / ``best`` / ``step_N`` (under ``checkpointer.output_dir``), ``base``
    (``checkpointer.checkpoint_dir``) or a folder path → the checkpoint folder."""
    if which == "base":
        return Path(cfg.checkpointer.checkpoint_dir)
    if which in (LATEST, BEST) or _STEP_DIR.fullmatch(which):
        if cfg.checkpointer.output_dir is None:
            raise CheckpointError(f"--checkpoint {which}: checkpointer.output_dir is not set")
        root = Path(cfg.checkpointer.output_dir)
        if which == LATEST:
            folder = latest_checkpoint(root)
        elif which == BEST:
            best = read_best(root)
            folder = best.folder if best else None
        else:
            folder = root / which
        if folder is None:
            hint = "train first, or use 'base'" if which == LATEST else "no evaluation has run (eval shards?)"
            raise CheckpointError(f"--checkpoint {which}: no checkpoint under {root} yet ({hint})")
    else:
        folder = Path(which)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"--checkpoint {which}: {folder} is not a checkpoint folder (no config.json)")
    try:  # a step folder must carry its digests; any other folder is checked when it has them
        verify_checkpoint(folder, required=which != "base" and _STEP_DIR.fullmatch(folder.name) is not None)
    except CheckpointCorrupt as exc:
        raise CheckpointError(f"--checkpoint {which}: {exc}") from None
    return folder


def older_checkpoints(output_dir: str | Path, folder: Path) -> list[Path]:
    """The step folders older than ``folder`` that hold a recipe state, newest first (``auto`` falls back
    through them when ``folder`` does not verify)."""
    newest = step_of(folder)
    steps = [(step_of(p), p) for p in Path(output_dir).iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return [p for s, p in sorted(steps, reverse=True) if s < newest and (p / RECIPE_STATE).is_file()]


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


def start_folder(base: str | Path, output_dir: str | Path, resume: bool | str) -> tuple[Path, bool]:
    """The folder a run loads and whether it resumes: ``latest`` under ``output_dir`` for ``True`` (required)
    and ``"auto"`` (when present), else the base checkpoint."""
    if resume is False:
        return Path(base), False
    folder = latest_checkpoint(output_dir)
    if folder is None:
        if resume == "auto":
            return Path(base), False
        raise ResumeError(
            f"resume_from_checkpoint: true, but {Path(output_dir) / LATEST} does not exist (no checkpoint saved yet); "
            "use 'auto' to start from the base checkpoint when there is none"
        )
    if not (folder / RECIPE_STATE).is_file():
        raise ResumeError(f"{folder} has no {RECIPE_STATE}: it is a model folder, not a training checkpoint")
    return folder, True


def step_of(folder: Path) -> int:
    match = _STEP_DIR.fullmatch(folder.name)
    if match is None:
        raise ValueError(f"{folder} is not a step_N checkpoint folder")
    return int(match.group(1))


def prune_checkpoints(output_dir: str | Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Keep the newest ``keep`` step folders up to ``latest`` (``latest`` always among them); remove older
    ones, folders newer than ``latest`` (left by a run killed between renaming a folder and moving
    ``latest``; the resumed run writes that step again) and the partial folder or pointer of an interrupted
    save.
    ``protect`` survives regardless: a resumed run's checkpointer copies the tokenizer files from the
    folder it started from, so that folder stays until the next run prunes it. So does the folder
    ``best`` names, and the newest older folder sealed with its digests whatever ``keep`` says: a
    corrupt ``latest`` always has a verified checkpoint to fall back to."""
    out = Path(output_dir)
    latest = latest_checkpoint(out)
    if latest is None:
        return []
    newest = step_of(latest)
    best = read_best(out)
    kept = (latest, protect, best.folder if best else None)
    steps = sorted(
        (step_of(p), p) for p in out.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name) and p not in kept
    )
    older = [p for s, p in steps if s < newest]
    fallback = next((p for p in reversed(older) if (p / MANIFEST).is_file()), None)
    doomed = [p for p in older[: max(0, len(older) - (keep - 1))] if p != fallback]
    doomed += [p for s, p in steps if s > newest]
    doomed += [p for p in out.iterdir() if p.is_dir() and _PARTIAL.fullmatch(p.name)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    for pointer in (out / f".{LATEST}.tmp", out / f".{BEST}.tmp"):  # written before a pointer's atomic replace
        if pointer.is_file():
            pointer.unlink()
            doomed.append(pointer)
    return sorted(doomed)


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
