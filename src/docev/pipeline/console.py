"""A short console for ``docev run``: one line per task as it starts and ends, everything else to files.

``kfp.local`` writes its own logging (executor inputs, outputs, warnings) and every task's streamed
output to ``sys.stdout``. :class:`TaskConsole` stands in for it during the run: it recognises kfp's
"Executing task" / "finished with status" lines, writes each task's lines to
``{output_dir}/pipeline/logs/<task>.log`` (and the rest to ``pipeline.log``), prints a start line and an
end line with the time and the task's key numbers (read from the files the task wrote), shows the
training progress bar on a terminal, and prints the tail of a failing task's log.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from docev.config import DocEVConfig
from docev.training.metrics import read_metrics

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
_BAR = re.compile(r"\d+\|\d+\|loss [0-9.]+")  # the recipe's tqdm description: epoch|step|loss
TAIL_LINES = 40


def _read(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.is_file() else None


def task_summary(cfg: DocEVConfig, task: str) -> str:
    """The key numbers of a finished task, from what it wrote under ``output_dir``."""
    out = Path(cfg.output_dir)
    if task == "validate-merge" and (report := _read(out / "validate" / "report.json")):
        s = report["sources"].values()
        held = sum(v.get("eval", 0) for v in report.get("split", {}).values())
        return (f"{sum(x['accepted'] for x in s)} accepted, {sum(x['rejected'] for x in s)} rejected"
                + (f", {held} held out" if held else ""))  # fmt: skip
    if task == "preprocess-merge" and (m := _read(out / "shards" / "manifest.json")):
        held = _read(out / "shards" / "eval" / "manifest.json")
        extra = f", {held['total_samples']} held out" if held else ""
        return f"{m['total_samples']} samples in {len(m['shards'])} shards{extra}"
    if task == "train":
        rows = read_metrics(out / "logs" / "metrics.jsonl")
        train = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "eval_loss" in r]
        if not train:
            return ""
        text = f"{train[-1]['step']} steps, loss {train[0]['loss']:.3f} → {train[-1]['loss']:.3f}"
        return text + (f", eval loss {evals[0]['eval_loss']:.3f} → {evals[-1]['eval_loss']:.3f}" if evals else "")
    if task.startswith("evaluate"):
        done = sorted((out / "eval").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
        if done and (m := _read(done[-1])):
            if not m.get("n"):
                return f"{m['label']}: no held-out questions"
            return f"{m['label']}: {m['n']} questions, ANLS {m['anls']:.3f}, exact match {m['exact_match']:.3f}"
    if task == "export":
        return f"→ {cfg.export.destination or out / 'export'}"
    return ""


class TaskConsole(io.TextIOBase):
    """A ``sys.stdout`` stand-in that routes kfp.local's output (see the module docstring)."""

    def __init__(self, cfg: DocEVConfig, console: TextIO, summarize: Callable[[DocEVConfig, str], str] = task_summary):
        self.cfg, self.console, self.summarize = cfg, console, summarize
        self.log_dir = Path(cfg.output_dir) / "pipeline" / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.run_log = (self.log_dir / "pipeline.log").open("w")
        self.task: str | None = None
        self.task_log: TextIO | None = None
        self.task_path: Path | None = None
        self.started = 0.0
        self.seen: dict[str, int] = {}
        self.failed: str | None = None
        self._pending = ""
        self._tty = console.isatty()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = re.split(r"(?<=\n)|(?<=\r)", self._pending)
        for line in lines:
            self._line(line)
        return len(text)

    def _say(self, text: str) -> None:
        self.console.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.console.flush()

    def _line(self, line: str) -> None:
        plain = _ANSI.sub("", line)
        if m := _START.search(plain):
            name = m.group(1)
            self.seen[name] = self.seen.get(name, 0) + 1
            suffix = f"-{self.seen[name]}" if self.seen[name] > 1 else ""
            self.task, self.started = name, time.perf_counter()
            self.task_path = self.log_dir / f"{name}{suffix}.log"
            self.task_log = self.task_path.open("w")
            self._say(f"▶ {name}{suffix}")
        target = self.task_log or self.run_log
        target.write(plain if plain.endswith(("\n", "\r")) else plain + "\n")
        target.flush()
        if self._tty and self.task == "train" and _BAR.search(plain):
            self.console.write("\r  " + plain.strip()[-100:])
            self.console.flush()
        if m := _END.search(plain):
            self._end(m.group(1), m.group(2))

    def _end(self, name: str, status: str) -> None:
        seconds = time.perf_counter() - self.started
        if self._tty and name == "train":
            self.console.write("\r\033[K")
        path = self.task_path
        if self.task_log is not None:
            self.task_log.close()
        self.task, self.task_log, self.task_path = None, None, None
        if status == "SUCCESS":
            summary = self.summarize(self.cfg, name)
            self._say(f"✓ {name} {seconds:.0f} s" + (f"  {summary}" if summary else ""))
            return
        self.failed = name
        self._say(f"✗ {name} failed after {seconds:.0f} s; last lines of {path}:")
        lines = path.read_text().splitlines() if path is not None else []
        for line in lines[-TAIL_LINES:]:
            self.console.write(f"    {line}\n")
        self.console.flush()

    def close(self) -> None:
        if self._pending:
            self._line(self._pending)
            self._pending = ""
        for f in (self.task_log, self.run_log):
            if f is not None and not f.closed:
                f.close()
        super().close()
