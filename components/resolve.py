"""First task: check the run's config (embedded config + knobs) and write it to the volume."""

from components import lightweight


def resolve_config(
    config_json: str,
    learning_rate: float,
    epochs: int,
    max_steps_per_epoch: int,
    num_nodes: int,
    gpus_per_node: int,
    resume: str,
) -> str:
    from docev.pipeline.steps import resolve_step

    run = dict(
        config_json=config_json,
        learning_rate=learning_rate,
        epochs=epochs,
        max_steps_per_epoch=max_steps_per_epoch,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        resume=resume,
    )
    return resolve_step(run)


def build(image: str):
    return lightweight(resolve_config, image)
