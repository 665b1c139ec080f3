"""A short console for ``docev run``: one line per task as it starts and ends, everything else to files.

``kfp.local`` writes its own logging (executor inputs, outputs, warnings) and every task's streamed
output to ``sys.stdout``. :class:`TaskConsole` stands in for it during the run: it recognises kfp's
"Executing task" / "finished with status" lines, writes each task's lines to
``{output_dir}/pipeline/logs/<task>.log`` (and the rest to ``pipeline.log``), prints a start line and an
end line with the time and the task's key numbers (read from the files the task wrote), draws the
running tasks' progress (their tqdm bars: preprocess, training, evaluation) on one line of a terminal,
and prints the tail of a failing task's log.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from docev.config import DocEVConfig
from docev.run.paths import VALIDATE_REPORTS, run_paths, shards_manifest_key
from docev.training.metrics_log import read_metrics

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
# a tqdm bar, "desc: 40%|####      | 4/10 [00:01<00:02, 2.9it/s]" or without a total "desc: 12rec [00:01, 9.5rec/s]"
_BAR = re.compile(
    r"(?:(?P<desc>[^\r\n:]*):\s+)?(?:\d+%\|[^|]*\| )?(?P<count>\d+(?:/\d+)?\s*[a-z]*) \[[\d:]+(?:<[\d:?]+)?,"
)
BAR_WIDTH = 110
TAIL_LINES = 40


def _read(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.is_file() else None


def task_summary(cfg: DocEVConfig, task: str) -> str:
    """The key numbers of a finished task, from what it wrote under ``output_dir``."""
    from docev.config import is_store_url
    from docev.outputs import outputs

    if is_store_url(cfg.output_dir) and task in ("validate-merge", "preprocess-merge"):
        # This runs under the console's lock; a read from an object store logs from the client's I/O thread,
        # which writes to this console and would wait on that lock forever. The counts are in the tasks' metrics.
        return f"outputs in {cfg.output_dir}"
    paths, data = run_paths(cfg), outputs(cfg)
    if task == "validate-merge" and (report := data.read_json(VALIDATE_REPORTS["json"])):
        s = report["sources"].values()
        held = sum(v.get("eval", 0) for v in report.get("split", {}).values())
        return (f"{sum(x['accepted'] for x in s)} accepted, {sum(x['rejected'] for x in s)} rejected"
                + (f", {held} held out" if held else ""))  # fmt: skip
    if task == "preprocess-merge" and (m := data.read_json(shards_manifest_key("train"))):
        held = data.read_json(shards_manifest_key("eval"))
        extra = f", {held['total_samples']} held out" if held else ""
        return f"{m['total_samples']} samples in {len(m['shards'])} shards{extra}"
    if task == "train":
        rows = read_metrics(paths.metrics)
        train = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "eval_loss" in r]
        if not train:
            return ""
        text = f"{train[-1]['step']} steps, loss {train[0]['loss']:.3f} → {train[-1]['loss']:.3f}"
        return text + (f", eval loss {evals[0]['eval_loss']:.3f} → {evals[-1]['eval_loss']:.3f}" if evals else "")
    if task.startswith("evaluate"):
        done = sorted(paths.eval_metrics(), key=lambda p: p.stat().st_mtime)
        if done and (m := _read(done[-1])):
            if not m.get("n"):
                return f"{m['label']}: no held-out questions"
            return f"{m['label']}: {m['n']} questions, ANLS {m['anls']:.3f}, exact match {m['exact_match']:.3f}"
    if task == "export":
        return f"→ {paths.export}"
    return ""


@dataclass
class _Running:
    name: str
    path: Path
    log: TextIO
    started: float
    bar: str = ""  # the task's latest progress (tqdm count), drawn on a terminal


class TaskConsole(io.TextIOBase):
    """A ``sys.stdout`` stand-in that routes kfp.local's output (see the module docstring).

    kfp.local runs the iterations of a ParallelFor in threads, each task's logging and streamed output
    in its own thread, so lines are attributed to the task running in the writing thread."""

    def __init__(self, cfg: DocEVConfig, console: TextIO, summarize: Callable[[DocEVConfig, str], str] = task_summary):
        self.cfg, self.console, self.summarize = cfg, console, summarize
        self.paths = run_paths(cfg)
        self.paths.pipeline_logs.mkdir(parents=True, exist_ok=True)
        self.run_log = self.paths.task_log("pipeline").open("w")
        self.running: dict[int, _Running] = {}
        self.seen: dict[str, int] = {}
        self.failed: str | None = None
        self._pending: dict[int, str] = {}
        self._lock = threading.Lock()
        self._tty = console.isatty()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        thread = threading.get_ident()
        with self._lock:
            pending = self._pending.get(thread, "") + text
            *lines, self._pending[thread] = re.split(r"(?<=\n)|(?<=\r)", pending)
            for line in lines:
                self._line(thread, line)
        return len(text)

    def _say(self, text: str) -> None:
        self.console.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.console.flush()

    def _line(self, thread: int, line: str) -> None:
        plain = _ANSI.sub("", line)
        if m := _START.search(plain):
            name = m.group(1)
            self.seen[name] = self.seen.get(name, 0) + 1
            label = f"{name}-{self.seen[name]}" if self.seen[name] > 1 else name
            path = self.paths.task_log(label)
            self.running[thread] = _Running(name, path, path.open("w"), time.perf_counter())
            self._say(f"▶ {label}")
        task = self.running.get(thread)
        target = task.log if task is not None else self.run_log
        target.write(plain if plain.endswith(("\n", "\r")) else plain + "\n")
        target.flush()
        if self._tty and task is not None and (bar := _BAR.search(plain)):
            desc = (bar.group("desc") or "").rsplit("|", 1)[-1].strip()  # the recipe's "epoch|step|loss L"
            task.bar = " ".join(x for x in (task.path.stem, desc, bar.group("count").strip()) if x)
            self._draw_bars()
        if (m := _END.search(plain)) and task is not None:
            self._end(self.running.pop(thread), m.group(2))

    def _draw_bars(self) -> None:
        """The running tasks' latest bars on one terminal line (concurrent loop tasks side by side)."""
        text = "  " + " · ".join(t.bar for t in self.running.values() if t.bar)
        self.console.write("\r\033[K" + text[:BAR_WIDTH])
        self.console.flush()

    def _end(self, task: _Running, status: str) -> None:
        seconds = time.perf_counter() - task.started
        if self._tty and any(t.bar for t in (task, *self.running.values())):
            self.console.write("\r\033[K")  # the bar line gives way to the end line, then comes back
        task.log.close()
        if status == "SUCCESS":
            summary = self.summarize(self.cfg, task.name)
            self._say(f"✓ {task.path.stem} {seconds:.0f} s" + (f"  {summary}" if summary else ""))
            if self._tty and any(t.bar for t in self.running.values()):
                self._draw_bars()
            return
        self.failed = task.name
        self._say(f"✗ {task.path.stem} failed after {seconds:.0f} s; last lines of {task.path}:")
        for line in task.path.read_text().splitlines()[-TAIL_LINES:]:
            self.console.write(f"    {line}\n")
        self.console.flush()

    def close(self) -> None:
        with self._lock:
            for thread, rest in self._pending.items():
                if rest:
                    self._line(thread, rest)
            self._pending.clear()
        for task in self.running.values():
            task.log.close()
        self.run_log.close()
        super().close()
