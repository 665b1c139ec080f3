"""The step-folder rules of a run's checkpoint folder: names, partial → publish, the ``latest`` and ``best``
pointers, pruning, and what ``--checkpoint latest|best|step_N|base|DIR`` names.

A save writes ``.step_N.partial`` and renames it to ``step_N`` when complete, then moves ``latest``
(:func:`publish_step`), so a kill at any moment leaves ``latest`` naming a complete folder. ``best``
names the saved step with the lowest eval loss; its second line holds the loss and step as JSON, so a
resumed run compares its evaluations against the same record; it is written after the folder it names
is complete and kept out of pruning. Both pointers are read by one function (:func:`read_pointer`).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from docev.run.digests import MANIFEST, CheckpointCorrupt, verify_checkpoint
from docev.run.paths import run_paths
from docev.run.publish import publish, temp_name, write_text

if TYPE_CHECKING:
    from docev.config import DocEVConfig

LATEST = "latest"
BEST = "best"
RECIPE_STATE = "recipe_state.pt"  # a training checkpoint's state besides the weights (resume reads it)

_STEP_DIR = re.compile(r"step_(\d+)")
_PARTIAL = re.compile(r"\.step_\d+\.(partial|old-[0-9a-f]+)")  # an interrupted save or replace


class ResumeError(RuntimeError):
    """``resume_from_checkpoint`` cannot be honoured (no checkpoint, or one without recipe state)."""


class CheckpointError(ValueError):
    """A ``--checkpoint`` choice that names no checkpoint folder."""


def step_name(step: int) -> str:
    return f"step_{step}"


def is_step_name(name: str) -> bool:
    return _STEP_DIR.fullmatch(name) is not None


def step_of(folder: str | Path) -> int:
    """N of a ``step_N`` folder."""
    match = _STEP_DIR.fullmatch(Path(folder).name)
    if match is None:
        raise ValueError(f"{folder} is not a step_N checkpoint folder")
    return int(match.group(1))


def step_or_none(folder: str | Path) -> int | None:
    """N of a ``step_N`` folder, None for any other folder (a base model, an export)."""
    return step_of(folder) if is_step_name(Path(folder).name) else None


def step_folders(output_dir: str | Path) -> list[Path]:
    """The complete ``step_N`` folders, oldest step first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted((p for p in out.iterdir() if p.is_dir() and is_step_name(p.name)), key=step_of)


def partial_path(output_dir: str | Path, step: int) -> Path:
    """Where a save of step N is written before it is complete: ``.step_N.partial``."""
    return Path(output_dir) / f".{step_name(step)}.partial"


def partial_folder(output_dir: str | Path, step: int) -> Path:
    """An empty ``.step_N.partial`` to write a save into (what an earlier attempt left there is removed)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    tmp = partial_path(output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish_step(output_dir: str | Path, tmp: Path, step: int) -> Path:
    """Rename the complete ``tmp`` to ``step_N`` (replacing an older copy), then point ``latest`` at it."""
    out = Path(output_dir)
    final = publish(tmp, out / step_name(step))
    write_pointer(out, LATEST, final)
    return final


def write_pointer(output_dir: str | Path, name: str, folder: Path, record: dict | None = None) -> None:
    """Point ``name`` (``latest``/``best``) at a complete step folder, with an optional JSON record line."""
    text = folder.name + "\n" + (json.dumps(record) + "\n" if record is not None else "")
    write_text(Path(output_dir) / name, text)


def read_pointer(output_dir: str | Path, name: str) -> tuple[Path, dict] | None:
    """The folder a pointer names and its record (``{}`` without one); None when there is no pointer."""
    pointer = Path(output_dir) / name
    if not pointer.is_file():
        return None
    first, _, rest = pointer.read_text().partition("\n")
    folder = pointer.parent / first.strip()
    if not folder.is_dir():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which does not exist")
    return folder, json.loads(rest) if rest.strip() else {}


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The folder ``latest`` names, or None before the first save."""
    found = read_pointer(output_dir, LATEST)
    return found[0] if found else None


@dataclass(frozen=True)
class Best:
    """What the ``best`` pointer records."""

    folder: Path
    step: int
    eval_loss: float


def read_best(output_dir: str | Path) -> Best | None:
    """The ``best`` pointer, or None before the first evaluation with a checkpoint."""
    found = read_pointer(output_dir, BEST)
    if found is None:
        return None
    folder, record = found
    return Best(folder, int(record["step"]), float(record["eval_loss"]))


def write_best(output_dir: str | Path, folder: Path, eval_loss: float) -> Best:
    """Point ``best`` at a complete step folder."""
    step = step_of(folder)
    write_pointer(output_dir, BEST, folder, {"step": step, "eval_loss": eval_loss})
    return Best(Path(output_dir) / folder.name, step, eval_loss)


def resolve_checkpoint(cfg: DocEVConfig, which: str) -> Path:
    """``latest`` / ``best`` / ``step_N`` (in the run's checkpoint folder), ``base``
    (``checkpointer.checkpoint_dir``) or a folder path → the checkpoint folder."""
    if which == "base":
        return Path(cfg.checkpointer.checkpoint_dir)
    if which in (LATEST, BEST) or is_step_name(which):
        root = run_paths(cfg).checkpoints
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
        verify_checkpoint(folder, required=which != "base" and is_step_name(folder.name))
    except CheckpointCorrupt as exc:
        raise CheckpointError(f"--checkpoint {which}: {exc}") from None
    return folder


def older_checkpoints(output_dir: str | Path, folder: Path) -> list[Path]:
    """The step folders older than ``folder`` that hold a recipe state, newest first (``auto`` falls back
    through them when ``folder`` does not verify)."""
    newest = step_of(folder)
    return [p for p in reversed(step_folders(output_dir)) if step_of(p) < newest and (p / RECIPE_STATE).is_file()]


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
    steps = [(step_of(p), p) for p in step_folders(out) if p not in kept]
    older = [p for s, p in steps if s < newest]
    fallback = next((p for p in reversed(older) if (p / MANIFEST).is_file()), None)
    doomed = [p for p in older[: max(0, len(older) - (keep - 1))] if p != fallback]
    doomed += [p for s, p in steps if s > newest]
    doomed += [p for p in out.iterdir() if p.is_dir() and _PARTIAL.fullmatch(p.name)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    for pointer in (temp_name(out / LATEST), temp_name(out / BEST)):  # written before a pointer's publish
        if pointer.is_file():
            pointer.unlink()
            doomed.append(pointer)
    return sorted(doomed)
