"""Evaluate: one checkpoint on the held-out split → KFP metrics and an HTML report (base vs tuned)."""

from kfp.dsl import HTML, Metrics, Output

from components import lightweight


def evaluate(
    config_json: str,
    learning_rate: float,
    epochs: int,
    max_steps_per_epoch: int,
    num_nodes: int,
    gpus_per_node: int,
    resume: str,
    eval_every_n_steps: int,
    lora_rank: int,
    label: str,
    checkpoint: str,
    metrics: Output[Metrics],
    report: Output[HTML],
) -> str:
    run = dict(locals())  # first: the run parameters and this step's arguments
    import shutil

    from docev.pipeline.steps import evaluate_step

    result = evaluate_step(run, label, checkpoint)
    shutil.copyfile(result["report"], report.path)
    for key in ("n", "anls", "exact_match", "relaxed_accuracy", "f1", "json_parse_rate", "eval_loss"):
        if isinstance(result.get(key), int | float):
            metrics.log_metric(key, result[key])
    return result["report"]


def build(image: str):
    return lightweight(evaluate, image)
