"""Train: torchrun in this task (backend local), or a PyTorchJob (backend kubernetes) or TrainJob (backend
trainjob) followed to completion."""

from kfp.dsl import HTML, Metrics, Output

from components import lightweight


def train(
    config_json: str,
    learning_rate: float,
    epochs: int,
    max_steps_per_epoch: int,
    num_nodes: int,
    gpus_per_node: int,
    resume: str,
    eval_every_n_steps: int,
    lora_rank: int,
    run_id: str,
    task: str,
    metrics: Output[Metrics],
    loss_plot: Output[HTML],
) -> int:
    run = dict(locals())  # first: the run parameters and this step's arguments
    import base64
    from pathlib import Path

    from docev.pipeline.steps import load, train_step

    result = train_step(run, run_id, task)
    for key, value in result.items():
        metrics.log_metric(key, value)
    png = load(run).work_root / "logs" / "loss.png"
    body = f"<img src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'>" if png.is_file() else ""
    Path(loss_plot.path).write_text(f"<!doctype html><title>loss</title><h1>Training loss</h1>{body}")
    return int(result["steps"])


def build(image: str):
    return lightweight(train, image)
