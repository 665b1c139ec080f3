"""The demo learns: configs/tiny.yaml as `make demo` runs it (its data, its held-out split, its training
budget), base vs tuned on the held-out pages. The same steps as the pipeline, without kfp.local."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS

from docev.data.preprocess import run_preprocess
from docev.evaluation.evaluate import evaluate
from docev.pipeline.local import ensure_assets, local_config
from docev.validate.runner import run_validate

pytestmark = pytest.mark.slow

# Measured on the demo (see docs/architecture.md, "Evaluation"); the margins leave room for noise.
MIN_ANLS_GAIN = 0.15
MIN_EXACT_GAIN = 0.15


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    overrides = [f"output_dir={out}"]
    cfg = local_config(CONFIGS / "tiny.yaml", overrides)
    ensure_assets(cfg)
    run_validate(cfg)
    run_preprocess(cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "WANDB_"))}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "docev.cli", "train", "--config", str(CONFIGS / "tiny.yaml"), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return cfg, evaluate(cfg, checkpoint="base"), evaluate(cfg, checkpoint="latest")


def test_tuned_beats_base_on_held_out_pages(demo):
    cfg, base, tuned = demo
    assert base["n"] == tuned["n"] >= 8
    assert tuned["anls"] >= base["anls"] + MIN_ANLS_GAIN, (base["anls"], tuned["anls"])
    assert tuned["exact_match"] >= base["exact_match"] + MIN_EXACT_GAIN
    kind = tuned["question_types"]["kind"]  # the question type the synthetic data makes learnable
    assert kind["exact_match"] > base["question_types"]["kind"]["exact_match"]
    saved = json.loads((Path(cfg.output_dir) / "eval" / "tuned" / "metrics.json").read_text())
    assert saved["n"] == tuned["n"] and "eval_loss" in saved
