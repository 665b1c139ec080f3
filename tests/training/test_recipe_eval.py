"""The recipe's eval loss under torchrun (2 ranks): eval lines in metrics.jsonl, the ``best``
pointer, and a stop + resume that keeps ``best`` on the lowest eval loss of both runs. The run's config
leaves ``checkpointer.output_dir`` unset, so it also checks that ``docev export`` / ``docev evaluate``
find the checkpoints where training put them (one default, ``docev.run.paths``)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import CONFIGS, tiny_config

from docev.cli import main
from docev.config import load_config
from docev.data.preprocess import run_preprocess
from docev.run.checkpoints import latest_checkpoint, read_best
from docev.training.metrics_log import read_metrics
from docev.validate.runner import run_validate

pytestmark = pytest.mark.slow  # two torchrun trainings (`make test-fast` leaves it out)


def _train(args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "WANDB_"))}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "docev.cli", "train", *args], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint, synth_sources):
    data = [
        {"source": str(synth_sources["instruct"]), "name": "instruct", "eval_fraction": 0.25},
        {"source": str(synth_sources["pretrain"]), "name": "pretrain", "ufx_type": "pretrain",
         "context_col": "text", "weight": 0.25},
    ]  # fmt: skip
    out = tmp_path_factory.mktemp("evaltrain")
    knobs = ["epochs=2", "eval_every_n_steps=2", "save_every_n_steps=4", "keep_last_n_checkpoints=1",
             "checkpointer.output_dir=null"]  # fmt: skip
    cfg = tiny_config(out, tiny_checkpoint, data, *knobs)
    run_validate(cfg, workers=1)
    run_preprocess(cfg, workers=1)
    args = ["--config", str(CONFIGS / "tiny.yaml"), f"output_dir={out}", "synthetic=null",
            f"tokenizer.model_name_or_path={tiny_checkpoint}", f"datasets={json.dumps(data)}", *knobs]  # fmt: skip
    _train([*args, "stop_after_steps=3"])
    first = read_best(out / "checkpoints")
    _train(args)
    return out, first, args


def test_eval_lines_and_best_across_resume(run):
    out, first, _ = run
    rows = read_metrics(out / "logs" / "metrics.jsonl")
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 3, 4, 6, 8]  # every 2 steps, and the last step of each run
    assert all({"eval_loss_r2", "eval_loss_r3", "eval_tokens"} <= set(r) for r in evals)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))  # 2 epochs x 4 steps
    assert first is not None and first.step in (2, 3)
    best = read_best(out / "checkpoints")
    lowest = min(evals, key=lambda r: r["eval_loss"])
    assert best.step == lowest["step"] and best.eval_loss == pytest.approx(lowest["eval_loss"])
    assert (out / "checkpoints" / f"step_{best.step}" / "config.json").is_file()  # kept out of pruning
    assert (out / "logs" / "loss.png").is_file()


def test_export_and_evaluate_latest_without_checkpointer_output_dir(run, capsys):
    out, _, args = run
    assert load_config(args[1], args[2:]).checkpointer.output_dir is None
    latest = latest_checkpoint(out / "checkpoints")  # where training wrote, by the one default
    assert main(["export", *args, "--checkpoint", "latest", "--out", str(out / "exported")]) == 0
    assert f"{latest.name}" in capsys.readouterr().out
    assert (out / "exported" / "config.json").is_file() and (out / "exported" / "SHA256SUMS").is_file()
    assert main(["evaluate", *args, "--checkpoint", "latest", "--label", "latest"]) == 0
    metrics = json.loads((out / "eval" / "latest" / "metrics.json").read_text())
    assert metrics["n"] > 0 and metrics["model"] == f"checkpoints/{latest.name}"
