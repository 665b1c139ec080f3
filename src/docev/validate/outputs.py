"""Where the validate step's outputs live and how its manifest is read: shared by the runner (which writes
them) and the report (which reads them), so neither imports the other's module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from docev.config import DocEVConfig


def validate_dir(cfg: DocEVConfig) -> Path:
    return Path(cfg.output_dir) / "validate"


def iter_manifest(cfg: DocEVConfig) -> Iterator[dict[str, Any]]:
    """Accepted entries in source order (what preprocess consumes)."""
    with (validate_dir(cfg) / "manifest.jsonl").open() as fh:
        for line in fh:
            yield json.loads(line)
