"""Where the validate step's outputs live and how its manifest is read: shared by the runner (which writes
them) and the report (which reads them), so neither imports the other's module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from docev.config import DocEVConfig
from docev.outputs import outputs

VALIDATE = "validate"
MANIFEST = f"{VALIDATE}/manifest.jsonl"


def validate_dir(cfg: DocEVConfig) -> Path:
    """The local folder of the validate outputs (this process's copy when ``output_dir`` is an object store)."""
    return outputs(cfg).local(VALIDATE)


def iter_manifest(cfg: DocEVConfig, path: Path | None = None) -> Iterator[dict[str, Any]]:
    """Accepted entries in source order (what preprocess consumes), from the published manifest or ``path``."""
    with (path or outputs(cfg).fetch(MANIFEST)).open() as fh:
        for line in fh:
            yield json.loads(line)
