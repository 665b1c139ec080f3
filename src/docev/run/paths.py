"""Every path of a run, resolved once from the config: the one place that spells a run's layout.

Two roots. ``output_dir`` holds the data outputs (validate, shards) and may be an object store, so
those are *keys* relative to it, read and written through ``docev.outputs``. ``work_root``
(``work_dir``, default ``output_dir``) is a filesystem folder for the rest::

    {output_dir}/validate/manifest.jsonl, rejects.jsonl, report.{json,md,html}, thumbnails/,
                 parts/00000-of-00001/{accepted,rejects}.jsonl + stats.json
    {output_dir}/shards/            train shards + manifest.json, dropped.jsonl
    {output_dir}/shards/eval/       held-out shards, same layout
    {work_root}/checkpoints/        step_N/, latest, best (checkpointer.output_dir overrides the folder)
    {work_root}/logs/               metrics.jsonl, loss.png
    {work_root}/eval/<label>/       predictions.jsonl, metrics.json, report.md, report.html
    {work_root}/export/             the exported model (export.destination overrides)
    {work_root}/pipeline/           config.json (the resolved config), logs/<task>.log, logs/pipeline.log
    {work_root}/kfp/                kfp.local's artifacts (docev run)

The training pod, every step, the CLI, the console and the card use these, so a default changed here
changes everywhere at once (the checkpoint folder used to have one default in the pod spec and none in
``--checkpoint latest``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from docev.config import DocEVConfig

# Data outputs: keys relative to output_dir.
VALIDATE = "validate"
# Record files of the validate step (in a part folder, and merged at the top of validate/).
ACCEPTED_FILE, REJECTS_FILE, MANIFEST_FILE, STATS_FILE = (
    "accepted.jsonl",
    "rejects.jsonl",
    "manifest.jsonl",
    "stats.json",
)
MANIFEST = f"{VALIDATE}/{MANIFEST_FILE}"
# What identified each data file validate read (docev.sources.fingerprints): per part, then merged.
FINGERPRINTS_FILE = "fingerprints.json"
SOURCE_FINGERPRINTS = f"{VALIDATE}/sources.json"
REJECTS = f"{VALIDATE}/{REJECTS_FILE}"
VALIDATE_REPORTS = {kind: f"{VALIDATE}/report.{kind}" for kind in ("json", "md", "html")}
THUMBNAILS = f"{VALIDATE}/thumbnails"
SHARDS = "shards"
SHARDS_MANIFEST = "manifest.json"  # the done-marker of a shard folder (a folder of its own when staged)
SHARDS_DROPPED = "dropped.jsonl"
EXPORT_UPLOAD = "export-upload"  # where an export to an object store is built and checked before the upload


def validate_part(shard: int, num_shards: int) -> str:
    """The folder of one ``--shard i/n`` part of the validate step."""
    return f"{VALIDATE}/parts/{shard:05d}-of-{num_shards:05d}"


def shards_key(split: str = "train") -> str:
    """The shards of a split: ``shards/`` (train) or ``shards/eval/`` (held out)."""
    return f"{SHARDS}/eval" if split == "eval" else SHARDS


def shards_manifest_key(split: str = "train") -> str:
    return f"{shards_key(split)}/{SHARDS_MANIFEST}"


# Files inside an eval/<label>/ folder.
EVAL_FILES = ("predictions.jsonl", "metrics.json", "report.md", "report.html")


@dataclass(frozen=True)
class RunPaths:
    """The filesystem side of a run (everything under ``work_root``)."""

    work: Path
    checkpoints: Path
    logs: Path
    metrics: Path
    loss_plot: Path
    eval: Path
    export: str  # a folder, or a store URL when export.destination is one
    pipeline: Path
    pipeline_logs: Path
    config_copy: Path
    kfp: Path  # kfp.local's pipeline root (docev run)

    def eval_dir(self, label: str) -> Path:
        """``eval/<label>/`` of one scored model (``base``, ``tuned``, …)."""
        return self.eval / label

    def eval_file(self, label: str, name: str) -> Path:
        if name not in EVAL_FILES:
            raise ValueError(f"{name}: an eval folder holds {', '.join(EVAL_FILES)}")
        return self.eval / label / name

    def eval_metrics(self) -> list[Path]:
        """Every ``eval/<label>/metrics.json`` written so far."""
        return sorted(self.eval.glob(f"*/{EVAL_FILES[1]}"))

    def task_log(self, task: str) -> Path:
        """The log of one pipeline task (``pipeline/logs/<task>.log``)."""
        return self.pipeline_logs / f"{task}.log"


def run_paths(cfg: DocEVConfig) -> RunPaths:
    """The run's paths from its config (pure: nothing is created or read)."""
    work = Path(cfg.work_root)
    logs = work / "logs"
    pipeline = work / "pipeline"
    return RunPaths(
        work=work,
        checkpoints=Path(cfg.checkpointer.output_dir) if cfg.checkpointer.output_dir else work / "checkpoints",
        logs=logs,
        metrics=logs / "metrics.jsonl",
        loss_plot=logs / "loss.png",
        eval=work / "eval",
        export=cfg.export.destination or str(work / "export"),
        pipeline=pipeline,
        pipeline_logs=pipeline / "logs",
        config_copy=pipeline / "config.json",
        kfp=work / "kfp",
    )
