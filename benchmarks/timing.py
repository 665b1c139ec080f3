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
    """Paired ratios of two contestants run in interleaved rounds (round i of ours over round i of theirs:
    both saw the same drift of the shared cores), their median, lowest and highest, and a verdict on
    ``ratio <= target``: met when at least two thirds of the rounds meet it, missed when at least two
    thirds miss it, else inconclusive (the rounds disagree)."""
    ratios = [o / t for o, t in zip(ours, theirs, strict=True)]
    ratio, low, high = statistics.median(ratios), min(ratios), max(ratios)
    met = sum(r <= target for r in ratios)
    if 3 * met >= 2 * len(ratios):
        verdict = f"meets <= {target} in {met} of {len(ratios)} rounds"
    elif 3 * (len(ratios) - met) >= 2 * len(ratios):
        verdict = f"misses <= {target} in {len(ratios) - met} of {len(ratios)} rounds"
    else:
        verdict = f"inconclusive: {met} of {len(ratios)} rounds meet <= {target} (ratios {low:.3f} to {high:.3f})"
    return ratio, low, high, verdict
