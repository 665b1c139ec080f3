"""What ``step_seconds`` (and the tokens/s made from it) and ``step_cpu_seconds`` cover: the whole optimizer
step, not only the forward/backward passes. One process in this interpreter, on clocks of the test's own (wall
and CPU): they move only inside ``optimizer.step`` and the lr-scheduler step, so the step window must read exactly
their sum."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import CONFIGS, one_process_group

from docev.config import load_config
from docev.data.preprocess import run_preprocess
from docev.training import recipe, step_stats
from docev.training.metrics_log import read_metrics
from docev.validate.runner import run_validate

OPTIMIZER_SECONDS, SCHEDULER_SECONDS = 3.0, 0.5  # what each call costs on the test's clock


class Clock:
    """``time.perf_counter`` for the recipe module: still, except where :meth:`costs` makes a call take time."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def costs(self, seconds: float, fn):
        def timed(obj, *args, **kwargs):
            self.now += seconds
            return fn(obj, *args, **kwargs)

        return timed


def test_step_seconds_include_the_optimizer_and_lr_steps(tmp_path, tiny_checkpoint, synth_sources, monkeypatch):
    datasets = [{"source": str(synth_sources["instruct"]), "name": "instruct"}]
    overrides = [f"output_dir={tmp_path}", f"tokenizer.model_name_or_path={tiny_checkpoint}", "synthetic=null",
                 f"datasets={json.dumps(datasets)}", "stop_after_steps=2", "log_every_n_steps=1",
                 "save_every_n_steps=100000"]  # fmt: skip
    cfg = load_config(CONFIGS / "tiny.yaml", overrides)
    run_validate(cfg, workers=1)
    run_preprocess(cfg, workers=1)
    # what the recipe instantiates: AdamW and torchtune's cosine schedule (a LambdaLR)
    assert cfg.optimizer.component == "torch.optim.AdamW"
    assert cfg.lr_scheduler.component == "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup"
    clock = Clock()
    cpu = Clock()  # the CPU clock advances at half the wall clock's pace inside the same calls
    monkeypatch.setattr(step_stats, "time", SimpleNamespace(perf_counter=clock.perf_counter,
                                                            process_time=cpu.perf_counter))  # fmt: skip
    optimizer_step = cpu.costs(OPTIMIZER_SECONDS / 2, torch.optim.AdamW.step)
    monkeypatch.setattr(torch.optim.AdamW, "step", clock.costs(OPTIMIZER_SECONDS, optimizer_step))
    scheduler_step = cpu.costs(SCHEDULER_SECONDS / 2, torch.optim.lr_scheduler.LambdaLR.step)
    scheduler_step = clock.costs(SCHEDULER_SECONDS, scheduler_step)
    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", scheduler_step)
    one_process_group(monkeypatch)

    assert recipe.main(["--config", str(CONFIGS / "tiny.yaml"), *overrides]) == 0
    rows = read_metrics(tmp_path / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # the window holds the optimizer step and the lr-scheduler step (the forward/backward passes
        # and the all-reduce are in it too, but take no time on this clock)
        assert r["step_seconds"] == OPTIMIZER_SECONDS + SCHEDULER_SECONDS, r
        assert r["step_cpu_seconds"] == (OPTIMIZER_SECONDS + SCHEDULER_SECONDS) / 2, r
        assert r["tokens_per_second"] == pytest.approx(r["num_tokens"] / r["step_seconds"])
