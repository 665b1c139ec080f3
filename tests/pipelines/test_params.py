import json

import pytest
from conftest import CONFIGS

from docev.config import ConfigError, load_config
from docev.pipeline.params import knob_defaults, resolve_run_config

PREVIEW = load_config(CONFIGS / "docev_preview.yaml")
EMBEDDED = json.dumps(PREVIEW.to_dict())


def test_defaults_are_the_config_values():
    assert knob_defaults(PREVIEW) == {"learning_rate": 1e-5, "epochs": 1, "max_steps_per_epoch": 0, "num_nodes": 2,
                                      "gpus_per_node": 8, "resume": "auto", "eval_every_n_steps": 0,
                                      "lora_rank": 0}  # fmt: skip


def test_knobs_override_the_embedded_config_with_kfp_types():
    # KFP may deliver ints as floats and, inside structs, numbers as strings
    cfg = resolve_run_config(EMBEDDED, learning_rate="2e-5", epochs=3.0, max_steps_per_epoch=200.0, num_nodes=4,
                             gpus_per_node="4", resume="false")  # fmt: skip
    assert cfg.optimizer.model_extra["lr"] == 2e-5 and cfg.epochs == 3 and cfg.max_steps_per_epoch == 200
    assert (cfg.train.nnodes, cfg.train.nproc_per_node, cfg.train.resources.gpu) == (4, 4, 4)
    assert cfg.resume_from_checkpoint is False
    assert resolve_run_config(EMBEDDED, max_steps_per_epoch=0, resume="auto").max_steps_per_epoch is None
    assert resolve_run_config(EMBEDDED, eval_every_n_steps=50.0).eval_every_n_steps == 50
    assert resolve_run_config(EMBEDDED, eval_every_n_steps=0).eval_every_n_steps is None  # 0: after the last step


def test_bad_knob_names_the_path():
    with pytest.raises(ConfigError, match=r"run parameters: epochs: Input should be greater than or equal to 1"):
        resolve_run_config(EMBEDDED, epochs=0)
    with pytest.raises(ValueError, match="unknown run parameter"):
        resolve_run_config(EMBEDDED, batch=3)


def test_lora_rank_knob():
    lora = load_config(CONFIGS / "tiny_lora.yaml")
    embedded = json.dumps(lora.to_dict())
    assert knob_defaults(lora)["lora_rank"] == 8
    assert resolve_run_config(embedded, lora_rank=16.0).model.lora_rank == 16
    assert resolve_run_config(embedded, lora_rank=0).model.lora_rank == 8  # 0 keeps the config's
    assert resolve_run_config(EMBEDDED, lora_rank=0).model.lora_rank is None
    with pytest.raises(ConfigError, match="model.lora_rank: docev.models.docev.docev_preview takes no LoRA arguments"):
        resolve_run_config(EMBEDDED, lora_rank=4)


def test_run_parameters_are_declared_once():
    """Every component starts with the run parameters generated from RUN_PARAMETERS, and the files are current."""
    import inspect

    from components import evaluate, export, generate, preprocess, resolve, train, validate
    from docev.pipeline.params import KNOBS, RUN_PARAMETERS

    assert list(RUN_PARAMETERS) == ["config_json", *KNOBS]
    funcs = [resolve.resolve_config, validate.validate_shard, validate.validate_merge, preprocess.preprocess_shard,
             preprocess.preprocess_merge, train.train, evaluate.evaluate, export.export]  # fmt: skip
    for func in funcs:
        params = list(inspect.signature(func).parameters.values())[: len(RUN_PARAMETERS)]
        assert {p.name: p.annotation for p in params} == RUN_PARAMETERS, func
    assert len(generate.component_files()) == 6 and generate.main(["--check"]) == 0
    stale = generate.block().replace("    lora_rank: int,\n", "")  # a knob added to KNOBS but not to a component
    assert generate.render(stale) == generate.block() != stale
