"""Validate: one task per shard of the UFX sources, then a merge with the reports."""

from typing import List  # noqa: UP035 - KFP reads typing annotations

from kfp.dsl import HTML, Artifact, Markdown, Metrics, Output

from components import lightweight


def validate_shard(
    config_json: str,
    learning_rate: float,
    epochs: int,
    max_steps_per_epoch: int,
    num_nodes: int,
    gpus_per_node: int,
    resume: str,
    eval_every_n_steps: int,
    lora_rank: int,
    shard: int,
    num_shards: int,
) -> str:
    run = dict(locals())  # first: the run parameters and this step's arguments
    from docev.pipeline.steps import validate_shard_step

    validate_shard_step(run, shard, num_shards)
    return str(int(shard))


def validate_merge(
    config_json: str,
    learning_rate: float,
    epochs: int,
    max_steps_per_epoch: int,
    num_nodes: int,
    gpus_per_node: int,
    resume: str,
    eval_every_n_steps: int,
    lora_rank: int,
    num_shards: int,
    shards_done: List[str],  # noqa: UP006 - KFP reads typing annotations
    report_md: Output[Markdown],
    report_html: Output[HTML],
    report_json: Output[Artifact],
    metrics: Output[Metrics],
) -> str:
    run = dict(locals())  # first: the run parameters and this step's arguments
    import json
    import shutil

    from docev.outputs import outputs
    from docev.pipeline.steps import load, validate_merge_step
    from docev.validate.runner import ValidationFailed, validate_dir

    cfg = load(run)
    out = validate_dir(cfg)  # this task's copy of the reports (output_dir may be an object store)
    failure = None
    try:
        report = validate_merge_step(run, num_shards)
    except ValidationFailed as exc:  # reports are written before the policy fails the step
        failure, report = exc, json.loads((out / "report.json").read_text())
    for src, dst in (("report.md", report_md), ("report.html", report_html), ("report.json", report_json)):
        shutil.copyfile(out / src, dst.path)
    for name, s in report["sources"].items():
        for key in ("read", "accepted", "rejected", "reject_fraction"):
            metrics.log_metric(f"{name}/{key}", s[key])
    if failure is not None:
        raise failure
    return outputs(cfg).where("validate/manifest.jsonl")


def build(image: str):
    return lightweight(validate_shard, image), lightweight(validate_merge, image)
