"""Reading the validate step's manifest: the accepted records, in source order, that preprocess encodes,
evaluation asks about and the export's smoke test draws from."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from docev.config import DocEVConfig
from docev.outputs import outputs
from docev.run.paths import MANIFEST


def iter_manifest(cfg: DocEVConfig, path: Path | None = None) -> Iterator[dict[str, Any]]:
    """Accepted entries in source order (what preprocess consumes), from the published manifest or ``path``."""
    with (path or outputs(cfg).fetch(MANIFEST)).open() as fh:
        for line in fh:
            yield json.loads(line)
