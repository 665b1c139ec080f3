"""Whether the long steps (preprocess, training, evaluation) draw a tqdm bar.

On a terminal they do (tqdm's ``disable=None``). Under ``docev run`` a task's output is a pipe into
kfp.local, so tqdm would turn itself off; the run sets ``DOCEV_PROGRESS=1`` for its tasks and its
console draws their bars on one line of the terminal (``docev.pipeline.console``).
"""

from __future__ import annotations

import os

ENV = "DOCEV_PROGRESS"


def bar_disabled() -> bool | None:
    """tqdm's ``disable``: False (always draw) when the run's console asks for bars, else None."""
    return False if os.environ.get(ENV) == "1" else None
