"""Timing shared by the benchmarks: interleaved repeats, medians.

The cores are shared and their speed drifts over a run, and whatever runs first pays for cold caches:
running each contestant once per round, round after round, exposes all of them to the same drift, and the
median of the rounds ignores a one-off stall in either direction.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Timed:
    median: float  # seconds
    seconds: list[float]  # every round, in order
    result: Any  # what the last round returned


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int, before: Callable[[], None] | None = None
                ) -> dict[str, Timed]:  # fmt: skip
    """Run ``runs`` in turn, ``repeats`` rounds; ``before`` (untimed) ahead of every run."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            if before is not None:
                before()
            start = time.perf_counter()
            results[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: Timed(statistics.median(s), s, results[name]) for name, s in seconds.items()}


def for_each(fn: Callable[[Any], Any], items: list[Any]) -> None:
    """``fn`` on every item: one timed run over a data set."""
    for item in items:
        fn(item)


def spread(seconds: list[float]) -> str:
    """``min / median / max`` of rounds, in ms."""
    return " / ".join(f"{x * 1e3:.1f}" for x in (min(seconds), statistics.median(seconds), max(seconds)))


def ratio_verdict(ours: list[float], theirs: list[float], target: float) -> tuple[float, float, float, str]:
    """Ratio of the medians of two contestants' rounds, its lowest and highest value the rounds allow
    (fastest ours / slowest theirs, slowest ours / fastest theirs), and whether ``ratio <= target`` holds over
    that whole range, fails over it, or is inconclusive (the spread of the rounds straddles the target)."""
    ratio = statistics.median(ours) / statistics.median(theirs)
    low, high = min(ours) / max(theirs), max(ours) / min(theirs)
    if high <= target:
        verdict = f"meets <= {target}"
    elif low > target:
        verdict = f"misses <= {target}"
    else:
        verdict = f"inconclusive: the rounds' spread allows {low:.3f} to {high:.3f}, across {target}"
    return ratio, low, high, verdict
