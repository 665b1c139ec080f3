"""What each KFP task does, as plain functions (the components in ``components/`` are thin wrappers).

Every step receives the run parameters as they are (the embedded ``config_json`` and the knobs, a
dict ``run``) and resolves them with :func:`~docev.pipeline.params.resolve_run_config`, the same pure
function in every task, so every step sees the same config. (Passing the first task's output into
the fan-out loops instead is what KFP on a cluster would allow, but ``kfp.local`` substitutes the loop
item for such inputs; the parameters themselves reach loop bodies intact.) Steps work on the shared
volume under ``output_dir``; what they return is small (counts, paths) and travels through KFP as
metrics, reports and parameters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from docev.config import DocEVConfig
from docev.pipeline.params import KNOBS, resolve_run_config
from docev.run.paths import run_paths
from docev.run.publish import write_text


def load(run: dict[str, Any]) -> DocEVConfig:
    """The run's config: the embedded config with the knobs applied (other entries of ``run`` are ignored)."""
    return resolve_run_config(run["config_json"], **{k: run[k] for k in KNOBS})


def config_path(cfg: DocEVConfig) -> Path:
    """Where the run's resolved config lives on the volume (the PyTorchJob reads it from there)."""
    return run_paths(cfg).config_copy


def resolve_step(run: dict[str, Any]) -> str:
    """Validate the run's config (a bad knob fails the run here, first), check every prerequisite the run
    needs (base checkpoint, tokenizer, sources, credentials, writable outputs: deterministic failures, found
    by this task, which is never retried, before any work) and write the config to the volume."""
    from docev.preflight import require

    cfg = load(run)
    require(cfg, "pipeline")
    path = config_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(cfg.to_dict(), indent=2))
    return str(path)


def validate_shard_step(run: dict[str, Any], shard: int, num_shards: int) -> None:
    from docev.validate.runner import run_shard

    run_shard(load(run), int(shard), int(num_shards))


def validate_merge_step(run: dict[str, Any], num_shards: int) -> dict[str, Any]:
    """Merge the shards; the reject policy raises after the reports are written."""
    from docev.validate.runner import merge

    return merge(load(run), int(num_shards))


def preprocess_shard_step(run: dict[str, Any], shard: int, num_shards: int) -> list[int]:
    """The training shards of this fan-out index, then the held-out split's (built the same way)."""
    from docev.data.preprocess import run_shards, splits_to_build

    cfg = load(run)
    return [k for split in splits_to_build(cfg) for k in run_shards(cfg, int(shard), int(num_shards), split=split)]


def preprocess_merge_step(run: dict[str, Any]) -> dict[str, Any]:
    from docev.data.preprocess import merge_all

    return merge_all(load(run))


def train_step(run: dict[str, Any], run_id: str, task: str) -> dict[str, Any]:
    """Train with the configured backend; return the last logged metrics and the step count.

    ``local``: ``docev train`` (torchrun with ``train.nproc_per_node`` processes) in this pod or process.
    ``kubernetes`` / ``trainjob``: a PyTorchJob / TrainJob created (or adopted on retry) and followed to
    completion; its failure fails this step. Resuming from ``latest`` is the recipe's, so a retried step
    continues, not restarts.
    """
    from docev.preflight import PREFLIGHT_EXIT, PreflightError
    from docev.training.metrics_log import read_metrics
    from docev.training.preemption import PREEMPTED_EXIT_CODE

    cfg = load(run)
    path = config_path(cfg)
    if cfg.train.backend != "local":
        from docev.k8s.launcher import launch_job

        launch_job(cfg, config_path=str(path), run_id=run_id, task=task)
    else:
        cmd = [sys.executable, "-m", "docev.cli", "train", "--config", str(path)]
        done = subprocess.run(cmd, check=False)
        if done.returncode == PREFLIGHT_EXIT:
            raise PreflightError("train", [f"training prerequisites missing (exit {done.returncode}); see above"])
        if done.returncode == PREEMPTED_EXIT_CODE:
            raise RuntimeError(
                f"training was preempted (SIGTERM, exit {done.returncode}) after saving the step in flight; "
                "a retry of this step resumes from it"
            )
        if done.returncode != 0:
            raise RuntimeError(f"training failed (exit {done.returncode}); see {run_paths(cfg).logs}")
    logged = read_metrics(run_paths(cfg).metrics)
    if not logged:
        raise RuntimeError(f"training wrote no metrics to {run_paths(cfg).metrics}")
    train = [r for r in logged if "loss" in r]  # eval-loss lines hold eval_loss only
    last = {**train[-1], **next((r for r in reversed(logged) if "eval_loss" in r), {})} if train else logged[-1]
    return {"steps": last["step"], **{k: v for k, v in last.items() if isinstance(v, int | float)}}


def export_step(run: dict[str, Any]) -> dict[str, Any]:
    from docev.export.export import export_checkpoint

    cfg = load(run)
    result = export_checkpoint(cfg)
    return {
        "destination": result.destination,
        "step": result.step,
        "dtype": result.dtype,
        "files": len(result.checksums),
        "smoke": result.smoke.text if result.smoke else None,
    }


def evaluate_step(run: dict[str, Any], label: str, checkpoint: str) -> dict[str, Any]:
    """Score a checkpoint on the held-out split (``export``: the one the export step publishes) and write
    the HTML report; a run without held-out questions reports ``n`` = 0 instead of failing."""
    from tqdm import tqdm

    from docev.evaluation.evaluate import NoQuestionsError, evaluate
    from docev.evaluation.report import write_report
    from docev.progress import bar_disabled

    cfg = load(run)
    which = cfg.export.checkpoint if checkpoint == "export" else checkpoint
    try:
        with tqdm(unit="q", desc=f"evaluate {label}", disable=bar_disabled(), mininterval=1.0) as bar:
            metrics = evaluate(cfg, checkpoint=which, label=label, progress=bar.update)
    except NoQuestionsError as exc:
        metrics = {"n": 0, "label": label, "note": str(exc)}
    return {**metrics, "report": str(write_report(cfg, label))}
