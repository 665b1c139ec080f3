"""Training metrics: the configured torchtune metric logger, ``logs/metrics.jsonl`` and ``logs/loss.png``.

``metrics.jsonl`` is written whatever logger the config names (one JSON object per logged step, and
one per eval-loss pass with ``eval_loss`` / ``eval_loss_r{R}``), so
later steps (export, the pipeline's metrics artifact) read the run without knowing the logger. A
resumed run first drops the lines past its checkpoint, which the interrupted run wrote but the
resumed run repeats, so each step appears once.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from docev.run.publish import publishing, write_text


def wandb_mode(component: str, env: MutableMapping[str, str] = os.environ) -> str | None:
    """W&B runs offline (files under its log_dir, ``wandb sync`` later) unless an API key is present.
    Sets ``WANDB_MODE`` when the config uses ``WandBLogger`` and nobody chose a mode; returns the mode."""
    if not component.endswith("WandBLogger"):
        return None
    if "WANDB_MODE" not in env:
        env["WANDB_MODE"] = "online" if env.get("WANDB_API_KEY") else "offline"
    return env["WANDB_MODE"]


def wandb_run_id(metric_logger: Any, saved: str | None) -> str | None:
    """The W&B run this training logs to: the config's ``id``, else the one saved with the checkpoint being
    resumed (so a restarted job continues one run, one loss curve), else a new one; None without W&B."""
    if not metric_logger.component.endswith("WandBLogger"):
        return None
    configured = (metric_logger.model_extra or {}).get("id")
    if configured:
        return str(configured)
    return saved or secrets.token_hex(8)  # W&B ids: letters, digits, '-', '_'


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The logged steps of a run (``logs/metrics.jsonl``), in order."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Rank 0's sink: every logged step goes to the torchtune logger (if any) and to ``metrics.jsonl``.

    Args:
        path (Path): the metrics file (``RunPaths.metrics``).
        plot_path (Path): the loss plot (``RunPaths.loss_plot``).
        logger (Any): a torchtune ``MetricLoggerInterface`` (``log_dict``/``close``), or None.
    """

    def __init__(self, path: str | Path, plot_path: str | Path, logger: Any = None):
        self.path, self.plot_path = Path(path), Path(plot_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.logger = logger
        self._file = None

    def truncate_after(self, step: int) -> int:
        """Drop lines for steps after ``step`` (a resumed run logs them again); returns how many."""
        rows = read_metrics(self.path)
        kept = [r for r in rows if r["step"] <= step]
        if len(kept) != len(rows):
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return len(rows) - len(kept)

    def log(self, metrics: Mapping[str, float | int], step: int) -> None:
        if self.logger is not None:
            self.logger.log_dict(dict(metrics), step=step)
        if self._file is None:
            self._file = self.path.open("a")
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def event(self, name: str, step: int, **fields: Any) -> None:
        """A line that is no step's metrics (``{"step", "event", ...}``); the logger gets ``event/<name>``: 1."""
        if self.logger is not None:
            self.logger.log_dict({f"event/{name}": 1.0}, step=step)
        if self._file is None:
            self._file = self.path.open("a")
        self._file.write(json.dumps({"step": step, "event": name, **fields}) + "\n")
        self._file.flush()

    def plot(self) -> Path | None:
        """``loss.png``: loss, the eval losses (eval-loss lines) and lr (second axis) over the steps."""
        every = read_metrics(self.path)
        rows = [r for r in every if "loss" in r]
        evals = [r for r in every if "eval_loss" in r]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
        for key in sorted({k for r in evals for k in r if k.startswith("eval_loss")}):
            points = [(r["step"], r[key]) for r in evals if key in r]
            style = {"marker": "o", "color": "tab:green"} if key == "eval_loss" else {"marker": ".", "alpha": 0.5}
            ax.plot(*zip(*points, strict=True), linestyle="--", label=key, **style)
        if evals:
            ax.legend(loc="upper right", fontsize="small")
        ax.set_xlabel("step")
        ax.set_ylabel("loss", color="tab:blue")
        lr = ax.twinx()
        lr.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
        lr.set_ylabel("learning rate", color="tab:orange")
        ax.set_title("DocEV fine-tuning")
        fig.tight_layout()
        with publishing(self.plot_path, "wb") as fh:
            fig.savefig(fh, format="png")
        plt.close(fig)
        return self.plot_path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.logger is not None:
            self.logger.close()
            self.logger = None
