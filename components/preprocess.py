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
    shard: int,
    num_shards: int,
) -> str:
    from docev.pipeline.steps import preprocess_shard_step

    run = dict(
        config_json=config_json,
        learning_rate=learning_rate,
        epochs=epochs,
        max_steps_per_epoch=max_steps_per_epoch,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        resume=resume,
    )
    return ",".join(map(str, preprocess_shard_step(run, shard, num_shards)))


def preprocess_merge(
    config_json: str,
    learning_rate: float,
    epochs: int,
    max_steps_per_epoch: int,
    num_nodes: int,
    gpus_per_node: int,
    resume: str,
    shards_done: List[str],  # noqa: UP006 - KFP reads typing annotations
    manifest: Output[Artifact],
    metrics: Output[Metrics],
) -> str:
    import json

    from docev.data.preprocess import shards_dir
    from docev.pipeline.steps import load, preprocess_merge_step

    run = dict(
        config_json=config_json,
        learning_rate=learning_rate,
        epochs=epochs,
        max_steps_per_epoch=max_steps_per_epoch,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        resume=resume,
    )
    result = preprocess_merge_step(run)
    with open(manifest.path, "w") as fh:
        json.dump(result, fh, indent=2)
    metrics.log_metric("samples", result["total_samples"])
    metrics.log_metric("shards", len(result["shards"]))
    metrics.log_metric("dropped", sum(result["dropped"].values()))
    for name, n in result["sources"].items():
        metrics.log_metric(f"{name}/samples", n)
    return str(shards_dir(load(run)))


def build(image: str):
    return lightweight(preprocess_shard, image), lightweight(preprocess_merge, image)
