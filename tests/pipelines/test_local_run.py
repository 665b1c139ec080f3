"""The whole pipeline under kfp.local on a small synthetic set: outputs exist and agree, reruns do what the
edited run parameters say. Slow by nature (two real torchrun trainings); kept as small as it can be."""

import json

import pytest
from conftest import CONFIGS

from docev.pipeline.local import local_config, run_pipeline_locally
from docev.training.metrics import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local-run")
    base = [f"output_dir={out}", "synthetic.records=24", "max_steps_per_epoch=5", "save_every_n_steps=2"]
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
    assert shards["total_samples"] + sum(shards["dropped"].values()) == accepted
    assert [m["step"] for m in read_metrics(outputs["training metrics"])][-1] == 3
    card = outputs["model card"].read_text()
    assert "| training steps | 3 |" in card and "at step 3" in card  # the time-boxed run exported step_3
    assert (outputs["exported model"] / "SHA256SUMS").is_file()
    assert outputs["validation report (html)"].is_file() and outputs["loss plot"].is_file()
    # KFP artifacts of the run are there too (the markdown report as the UI would show it)
    assert any(p.name == "report_md" for p in outputs["kfp artifacts"].rglob("report_md"))


def test_rerun_with_edited_parameters(first_run):
    cfg, outputs = first_run
    metrics = outputs["training metrics"]
    run_pipeline_locally(cfg, {"resume": "true"})  # continue from `latest` (step 3) to the epoch's 5 steps
    steps = [m["step"] for m in read_metrics(metrics)]
    assert steps == [1, 2, 3, 4, 5]  # steps 4-5 added, 1-3 not redone
    run_pipeline_locally(cfg, {"max_steps_per_epoch": 2, "resume": "false"})  # a fresh run of 2 steps
    assert [m["step"] for m in read_metrics(metrics)][-1] == 2


def test_lora_config_end_to_end_and_a_rerun_with_another_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("local-lora")
    base = [f"output_dir={out}", "synthetic.records=24", "max_steps_per_epoch=3", "save_every_n_steps=2"]
    cfg = local_config(CONFIGS / "tiny_lora.yaml", base)
    outputs = run_pipeline_locally(cfg)
    adapter = outputs["exported model"] / "adapter" / "adapter_config.json"
    assert json.loads(adapter.read_text())["r"] == 8
    assert "| rank / alpha | 8 / 16 (scale alpha/rank = 2) |" in outputs["model card"].read_text()
    # resume=auto: the rank-8 checkpoint does not fit rank 4, so the rerun trains from the base
    run_pipeline_locally(cfg, {"lora_rank": 4})
    assert json.loads(adapter.read_text())["r"] == 4
    assert "| rank / alpha | 4 / 16 (scale alpha/rank = 4) |" in outputs["model card"].read_text()
    assert [m["step"] for m in read_metrics(outputs["training metrics"])] == [1, 2, 3]
