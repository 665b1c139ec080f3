"""Shared fixtures: the tiny checkpoint and a small synthetic corpus, made once per session."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from docev.assets import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def synth_sources(tmp_path_factory) -> dict[str, Path]:
    from docev.synth import synth_data

    return synth_data(tmp_path_factory.mktemp("synth"), 20, seed=3, fmt="jsonl", workers=1)
