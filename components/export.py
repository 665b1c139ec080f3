"""Export: the trained checkpoint → a verified Hugging Face folder with a model card."""

from kfp.dsl import Markdown, Metrics, Output

from components import lightweight


def export(
    config_json: str,
    learning_rate: float,
    epochs: int,
    max_steps_per_epoch: int,
    num_nodes: int,
    gpus_per_node: int,
    resume: str,
    eval_every_n_steps: int,
    lora_rank: int,
    model_card: Output[Markdown],
    metrics: Output[Metrics],
) -> str:
    run = dict(locals())  # first: the run parameters and this step's arguments
    import shutil
    from pathlib import Path

    from docev.pipeline.steps import export_step

    result = export_step(run)
    card = Path(result["destination"]) / "README.md"
    if card.is_file():
        shutil.copyfile(card, model_card.path)
    else:  # an object-store destination: the card is there, say where
        Path(model_card.path).write_text(f"Model exported to {result['destination']}\n")
    metrics.log_metric("files", result["files"])
    metrics.log_metric("step", result["step"] if result["step"] is not None else 0)
    return str(result["destination"])


def build(image: str):
    return lightweight(export, image)
