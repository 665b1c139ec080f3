"""Run the compiled pipeline's own function on this machine with ``kfp.local`` (no cluster).

Same DAG, same components, same run parameters as on Kubeflow: ``kfp.local``'s SubprocessRunner runs
each lightweight component in a subprocess of this environment (the project is installed here as it is
in the image), ignoring the kfp-kubernetes settings. The train step uses the ``local`` backend:
``docev train`` → torchrun with ``train.nproc_per_node`` CPU processes. With a ``synthetic`` section the
embedded default is made first (tiny checkpoint + synthetic UFX documents, only when missing), so
``make demo`` needs nothing but this repository.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from docev.config import DocEVConfig, is_store_url, load_config
from docev.pipeline.console import TaskConsole
from docev.progress import ENV as PROGRESS_ENV
from docev.run.paths import REJECTS, VALIDATE_REPORTS, run_paths, shards_manifest_key


def local_config(path: str | Path, overrides: list[str]) -> DocEVConfig:
    """The config with ``output_dir`` made absolute (component subprocesses share it), the local backend, and
    no checkpoint volume (kfp.local ignores volumes; checkpoints stay under ``output_dir``)."""
    cfg = load_config(path, overrides)
    extra = [] if cfg.train.backend == "local" else ["train.backend=local"]
    if cfg.kubernetes.checkpoint_pvc is not None:
        extra.append("kubernetes.checkpoint_pvc=null")
    for key, value in (("output_dir", cfg.output_dir), ("work_dir", cfg.work_dir)):
        if value is not None and not is_store_url(value) and not Path(value).is_absolute():
            extra.append(f"{key}={Path(value).resolve()}")
    return load_config(path, [*overrides, *extra]) if extra else cfg


def ensure_assets(cfg: DocEVConfig) -> None:
    """Create the tiny checkpoint and synthetic sources named by the config when they are missing."""
    syn = cfg.synthetic
    if syn is None:
        return
    from docev.assets import init_checkpoint
    from docev.synth import synth_data

    ckpt = Path(cfg.checkpointer.checkpoint_dir)
    if not (ckpt / "model.safetensors.index.json").exists():
        print(f"[assets] writing tiny DocEV checkpoint to {ckpt}")
        init_checkpoint(ckpt, size=syn.checkpoint_size, seed=syn.seed)
    data = Path(syn.data_dir)
    if not all((data / kind).exists() for kind in ("instruct", "pretrain")):
        print(f"[assets] rendering {syn.records} synthetic documents to {data}")
        synth_data(data, syn.records, seed=syn.seed, fmt=syn.format)


def release_console(console: TaskConsole) -> None:
    """Point logging handlers made during the run back at the real stderr. A handler created while stderr was
    redirected (kfp's, urllib3's) keeps the console as its stream; after the run the console is closed, and
    every later log record through it would print a "Logging error" traceback."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for handler in (h for lg in loggers for h in getattr(lg, "handlers", [])):
        if isinstance(handler, logging.StreamHandler) and handler.stream is console:
            handler.setStream(sys.__stderr__)


def run_pipeline_locally(cfg: DocEVConfig, params: dict[str, Any] | None = None) -> dict[str, Path | str]:
    """Run the whole pipeline; ``params`` are run parameters (the knobs, as in "Clone run")."""
    from kfp import local

    from docev.pipeline.params import knob_defaults
    from pipelines.pipeline import build_pipeline

    ensure_assets(cfg)
    out = cfg.work_root
    out.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(run_paths(cfg).kfp))
    run = {**knob_defaults(cfg), **(params or {})}
    console = TaskConsole(cfg, sys.stdout)  # kfp.local's output goes to per-task logs; one line per task here
    # kfp.local indents print() per task by swapping builtins.print; concurrent loop tasks restore each
    # other's swapped version, leaving print indented after the run. Put the real one back.
    real_print = builtins.print
    progress = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "1"  # the tasks' output is a pipe: their tqdm bars stay on for the console
    try:
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            build_pipeline(cfg)(**run)
    finally:
        builtins.print = real_print
        release_console(console)
        console.close()
        if progress is None:
            os.environ.pop(PROGRESS_ENV)
        else:
            os.environ[PROGRESS_ENV] = progress
    from docev.outputs import outputs

    data = outputs(cfg)

    def published(rel: str) -> Path | str:  # an object-store output_dir's files are named by their URL
        return data.where(rel) if data.remote else data.local(rel)

    paths = run_paths(cfg)
    export = Path(paths.export)
    return {
        "exported model": export,
        "model card": export / "README.md",
        "validation report": published(VALIDATE_REPORTS["md"]),
        "validation report (html)": published(VALIDATE_REPORTS["html"]),
        "rejects": published(REJECTS),
        "shards": published(shards_manifest_key()),
        "training metrics": paths.metrics,
        "loss plot": paths.loss_plot,
        "evaluation report": paths.eval_file("tuned", "report.html"),
        "predictions (tuned)": paths.eval_file("tuned", "predictions.jsonl"),
        "task logs": paths.pipeline_logs,
        "kfp artifacts": paths.kfp,
    }
