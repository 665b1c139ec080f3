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
    eval_every_n_steps: int,
    lora_rank: int,
) -> str:
    run = dict(locals())  # first: the run parameters and this step's arguments
    from docev.pipeline.steps import resolve_step

    return resolve_step(run)


def build(image: str):
    return lightweight(resolve_config, image)
