"""Fixtures for the export tests: a validated + preprocessed run folder and a "trained" step checkpoint."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import perturb, tiny_config
from safetensors.torch import load_file

from docev.data.preprocess import run_preprocess
from docev.export.checksums import SUMS
from docev.models.docev import DocEVCheckpointer
from docev.validate.runner import run_validate


def sources_list(synth_sources):
    return [
        {"source": str(synth_sources["instruct"]), "name": "instruct"},
        {"source": str(synth_sources["pretrain"]), "name": "pretrain", "ufx_type": "pretrain", "context_col": "text"},
    ]


def make_config(run: Path, checkpoint: Path, synth_sources, *overrides: str):
    return tiny_config(run, checkpoint, sources_list(synth_sources), "preprocess.records_per_shard=10", *overrides)


def sha256sum_check(folder: Path) -> subprocess.CompletedProcess:
    """``sha256sum -c SHA256SUMS`` in ``folder``: the coreutils tool reading the same file, independently of
    our verifier. Call it last in a test: without the tool the test is skipped, saying which check did not run."""
    if shutil.which("sha256sum") is None:
        pytest.skip(f"sha256sum (GNU coreutils) is not on PATH: the cross-check of {SUMS} with it did not run")
    return subprocess.run(["sha256sum", "-c", SUMS], cwd=folder, capture_output=True, text=True)


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's shards, read with safetensors alone."""
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="session")
def export_run(tmp_path_factory, tiny_checkpoint, synth_sources) -> Path:
    """A run folder with validate and preprocess outputs, a step_8 checkpoint (recipe state included)
    and a metrics.jsonl whose last line was cut by a kill."""
    run = tmp_path_factory.mktemp("export_run")
    cfg = make_config(run, tiny_checkpoint, synth_sources)
    run_validate(cfg, workers=1)
    run_preprocess(cfg, workers=1)
    ckpt = DocEVCheckpointer(tiny_checkpoint, output_dir=cfg.checkpointer.output_dir)
    state = perturb(ckpt.load_checkpoint()["model"])
    recipe = {"global_step": 8, "world_size": 1, "rng": [{}], "sampler": {"epoch": 0, "step": 8, "seed": 0},
              "optimizer": {"state": {}, "param_groups": []}}  # fmt: skip
    ckpt.save_checkpoint({"model": state, **recipe}, step=8, record={k: recipe[k] for k in ("global_step", "world_size",
                                                                                             "sampler")})  # fmt: skip
    logs = run / "logs"
    logs.mkdir()
    lines = [json.dumps({"step": s, "loss": 7.0 - 0.25 * s, "lr": 1e-3}) for s in range(1, 11)]
    (logs / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 11, "lo')
    return run


@pytest.fixture(scope="session")
def step_checkpoint(export_run) -> Path:
    return export_run / "checkpoints" / "step_8"
