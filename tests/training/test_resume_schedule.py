"""A resume that changes the schedule (here ``epochs`` 1 → 2) says so: what changed, the new total steps and the
lr at the resumed step before and after (the cosine now spans the new total), and the progress bar counts to the
new total. One process in this interpreter, 3 + 3 steps."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import CONFIGS, one_process_group
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

from docev.config import load_config
from docev.data.preprocess import run_preprocess
from docev.training import recipe
from docev.training.metrics_log import read_metrics
from docev.validate.runner import run_validate

LR, WARMUP, STEPS = 2.0e-3, 2, 3


def _lr(step: int, total: int) -> float:
    """torchtune's cosine with warm-up at ``step`` of ``total``, on an optimizer of its own."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=WARMUP, num_training_steps=total)
    for _ in range(step):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def test_resume_with_more_epochs_logs_the_new_schedule(tmp_path, tiny_checkpoint, synth_sources, monkeypatch, caplog,
                                                       capsys):  # fmt: skip
    datasets = [{"source": str(synth_sources["instruct"]), "name": "instruct"}]
    overrides = [f"output_dir={tmp_path}", f"tokenizer.model_name_or_path={tiny_checkpoint}", "synthetic=null",
                 f"datasets={json.dumps(datasets)}", f"max_steps_per_epoch={STEPS}", "save_every_n_steps=100",
                 f"optimizer.lr={LR}", f"lr_scheduler.num_warmup_steps={WARMUP}", "eval_every_n_steps=null",
                 "checkpoint_format=hf"]  # fmt: skip
    cfg = load_config(CONFIGS / "tiny.yaml", [*overrides, "epochs=1"])
    run_validate(cfg, workers=1)
    run_preprocess(cfg, workers=1)
    one_process_group(monkeypatch)

    assert recipe.main(["--config", str(CONFIGS / "tiny.yaml"), *overrides, "epochs=1"]) == 0
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        assert recipe.main(["--config", str(CONFIGS / "tiny.yaml"), *overrides, "epochs=2"]) == 0
    was, now = _lr(STEPS, STEPS), _lr(STEPS, 2 * STEPS)
    assert now > was + 1e-4  # the change the line reports is real: the lr jumps back up the longer cosine
    line = next(r.getMessage() for r in caplog.records if "another schedule" in r.getMessage())
    assert line == (f"Resuming with another schedule (epochs 1 → 2): total steps {STEPS} → {2 * STEPS}; the lr "
                    f"schedule now spans {2 * STEPS} steps, so the lr at step {STEPS} goes {was:.3g} → {now:.3g} "
                    "and follows the new curve from here")  # fmt: skip
    rows = [r for r in read_metrics(tmp_path / "logs" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 2 * STEPS + 1))
    assert rows[STEPS]["lr"] == pytest.approx(_lr(STEPS, 2 * STEPS))  # step 4 trains at the new curve's lr
    err = capsys.readouterr().err
    assert f"{2 * STEPS}/{2 * STEPS}" in err and f"{STEPS}/{2 * STEPS}" in err  # the bar counts to the new total
