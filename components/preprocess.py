"""Preprocess: one task per shard group (k % n == i), then a merge writing shards/manifest.json."""

from typing import List  # noqa: UP035 - KFP reads typing annotations

from kfp.dsl import Artifact, Metrics, Output

from components import lightweight


def preprocess_shard(
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
    from docev.pipeline.steps import preprocess_shard_step

    return ",".join(map(str, preprocess_shard_step(run, shard, num_shards)))


def preprocess_merge(
    config_json: str,
    learning_rate: float,
    epochs: int,
    max_steps_per_epoch: int,
    num_nodes: int,
    gpus_per_node: int,
    resume: str,
    eval_every_n_steps: int,
    lora_rank: int,
    shards_done: List[str],  # noqa: UP006 - KFP reads typing annotations
    manifest: Output[Artifact],
    metrics: Output[Metrics],
) -> str:
    run = dict(locals())  # first: the run parameters and this step's arguments
    import json

    from docev.data.preprocess import shards_location
    from docev.pipeline.steps import load, preprocess_merge_step

    result = preprocess_merge_step(run)
    with open(manifest.path, "w") as fh:
        json.dump(result, fh, indent=2)
    metrics.log_metric("samples", result["total_samples"])
    metrics.log_metric("shards", len(result["shards"]))
    metrics.log_metric("dropped", sum(result["dropped"].values()))
    metrics.log_metric("eval_samples", result["eval_samples"])
    for name, n in result["sources"].items():
        metrics.log_metric(f"{name}/samples", n)
    return shards_location(load(run))  # a folder or, for an object-store output_dir, its URL


def build(image: str):
    return lightweight(preprocess_shard, image), lightweight(preprocess_merge, image)
