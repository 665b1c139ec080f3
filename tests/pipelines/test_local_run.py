"""The whole pipeline under kfp.local on a small synthetic set: outputs exist and agree, reruns do what the
edited run parameters say. Slow by nature (two real torchrun trainings); kept as small as it can be."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import CONFIGS

from docev.pipeline.local import local_config, run_pipeline_locally
from docev.training.metrics_log import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local-run")
    base = [f"output_dir={out}", "synthetic.records=24", "epochs=1", "max_steps_per_epoch=5", "save_every_n_steps=2"]
    # the first run is time-boxed at step 3 (as a preempted job would be); reruns go on from there
    cfg = local_config(CONFIGS / "tiny.yaml", [*base, "stop_after_steps=3"])
    return local_config(CONFIGS / "tiny.yaml", base), run_pipeline_locally(cfg)


def test_outputs_exist_and_counts_add_up(first_run):
    cfg, outputs = first_run
    report = json.loads(outputs["validation report"].with_suffix(".json").read_text())
    shards = json.loads(outputs["shards"].read_text())
    accepted = sum(s["accepted"] for s in report["sources"].values())
    for s in report["sources"].values():
        assert s["accepted"] + s["rejected"] == s["read"]
    # the held-out split (tiny.yaml holds out 30% of the instruction pages) has its own shards
    held_out = json.loads(outputs["shards"].with_name("eval").joinpath("manifest.json").read_text())
    assert held_out["total_samples"] > 0
    assert sum(sum(m["dropped"].values()) + m["total_samples"] for m in (shards, held_out)) == accepted
    # every synthetic record written is read, per source (24 instruction pages, a quarter as many pretraining)
    written = {d.name: len((Path(d.source) / "data.jsonl").read_text().splitlines()) for d in cfg.datasets}
    assert written == {"synthetic-instruct": 24, "synthetic-pretrain": 6}
    assert {name: s["read"] for name, s in report["sources"].items()} == written
    # and every accepted record is a stored sample or a named drop, per source
    folders = (outputs["shards"].parent, outputs["shards"].parent / "eval")
    drops = Counter(json.loads(line)["source"] for f in folders for line in (f / "dropped.jsonl").open())
    stored = {name: s["accepted"] - drops[name] for name, s in report["sources"].items()}
    assert Counter(shards["sources"]) + Counter(held_out["sources"]) == Counter(stored)
    assert [m["step"] for m in read_metrics(outputs["training metrics"]) if "loss" in m][-1] == 3
    # both evaluations on the same held-out questions, the HTML report, KFP metrics of each task
    root = outputs["evaluation report"].parents[1]
    base, tuned = (json.loads((root / k / "metrics.json").read_text()) for k in ("base", "tuned"))
    assert base["n"] == tuned["n"] > 0 and "eval_loss" in tuned
    assert "<table>" in outputs["evaluation report"].read_text()
    # kfp.local keeps Metrics in each task's executor output; the HTML report is an artifact file
    runs = [p for p in outputs["kfp artifacts"].rglob("executor_output.json") if p.parent.name.startswith("evaluate")]
    assert len(runs) >= 2 and all('"anls"' in p.read_text() for p in runs)
    assert all((p.parent / "report").is_file() for p in runs)
    assert "## Evaluation (held-out split)" in outputs["model card"].read_text()
    for qtype, m in tuned["question_types"].items():  # the card breaks the scores down, with counts
        assert f"\n| {qtype} | {m['n']} | " in outputs["model card"].read_text()
    assert (outputs["task logs"] / "train.log").is_file()
    card = outputs["model card"].read_text()
    # paths relative to the output folder (the card travels with the export), the smoke image's included
    assert str(Path(cfg.output_dir).resolve()) not in card and str(cfg.output_dir) not in card
    assert re.search(r'--model \. --image "\$RUN"/data/instruct/images/\S+ ', card)
    assert "| training steps | 3 |" in card and "at step 3" in card  # the time-boxed run exported step_3
    assert (outputs["exported model"] / "SHA256SUMS").is_file()
    assert outputs["validation report (html)"].is_file() and outputs["loss plot"].is_file()
    # KFP artifacts of the run are there too (the markdown report as the UI would show it)
    assert any(p.name == "report_md" for p in outputs["kfp artifacts"].rglob("report_md"))


def test_rerun_with_edited_parameters(first_run):
    cfg, outputs = first_run
    metrics = outputs["training metrics"]
    run_pipeline_locally(cfg, {"resume": "true"})  # continue from `latest` (step 3) to the epoch's 5 steps
    starts = _start_lines(outputs)
    checkpoints = Path(cfg.checkpointer.output_dir)
    assert starts == [f"Resuming from {checkpoints / 'step_3'}"], starts  # not a fresh start
    steps = [m["step"] for m in read_metrics(metrics) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5]  # steps 4-5 added, 1-3 not redone
    run_pipeline_locally(cfg, {"max_steps_per_epoch": 2, "resume": "false"})  # a fresh run of 2 steps
    assert _start_lines(outputs) == [f"Starting from {cfg.checkpointer.checkpoint_dir}"]
    assert [m["step"] for m in read_metrics(metrics) if "loss" in m][-1] == 2


def _start_lines(outputs) -> list[str]:
    """The recipe's "Resuming from DIR" / "Starting from DIR" lines (rank 0) in the train task's log of the
    latest run (the console rewrites each task's log per run)."""
    return re.findall(r"(?:Resuming|Starting) from \S+", (outputs["task logs"] / "train.log").read_text())


def test_lora_config_end_to_end_and_a_rerun_with_another_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("local-lora")
    base = [f"output_dir={out}", "synthetic.records=24", "epochs=1", "max_steps_per_epoch=3", "save_every_n_steps=2"]
    cfg = local_config(CONFIGS / "tiny_lora.yaml", base)
    outputs = run_pipeline_locally(cfg)
    adapter = outputs["exported model"] / "adapter" / "adapter_config.json"
    assert json.loads(adapter.read_text())["r"] == 8
    # tiny_lora.yaml holds records out: the tuned evaluation scores the adapter run's checkpoint (base + adapters)
    tuned = json.loads((outputs["evaluation report"].parents[1] / "tuned" / "metrics.json").read_text())
    assert tuned["n"] > 0 and tuned["model"].startswith("checkpoints/step_")
    card = outputs["model card"].read_text()
    assert (
        "| metric | base | tuned | change |" in card and "the held-out scores above are on pages it did not see" in card
    )
    assert "### By question type" in card
    assert "| rank / alpha | 8 / 16 (scale alpha/rank = 2) |" in outputs["model card"].read_text()
    # resume=auto: the rank-8 checkpoint does not fit rank 4, so the rerun trains from the base
    run_pipeline_locally(cfg, {"lora_rank": 4})
    assert json.loads(adapter.read_text())["r"] == 4
    assert "| rank / alpha | 4 / 16 (scale alpha/rank = 4) |" in outputs["model card"].read_text()
    assert [m["step"] for m in read_metrics(outputs["training metrics"]) if "loss" in m] == [1, 2, 3]
