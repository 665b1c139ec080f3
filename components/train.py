"""Train: torchrun in this task (backend local) or a PyTorchJob followed to completion (backend kubernetes)."""

from kfp.dsl import HTML, Metrics, Output

from components import lightweight


def train(config_json: str, run_id: str, task: str, metrics: Output[Metrics], loss_plot: Output[HTML]) -> int:
    import base64
    from pathlib import Path

    from docev.pipeline.steps import load, train_step

    result = train_step(config_json, run_id, task)
    for key, value in result.items():
        metrics.log_metric(key, value)
    png = Path(load(config_json).output_dir) / "logs" / "loss.png"
    body = f"<img src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'>" if png.is_file() else ""
    Path(loss_plot.path).write_text(f"<!doctype html><title>loss</title><h1>Training loss</h1>{body}")
    return int(result["steps"])


def build(image: str):
    return lightweight(train, image)
