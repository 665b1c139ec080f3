import json

import pytest
import yaml
from conftest import CONFIGS

from docev.cli import main
from docev.config import ConfigError, json_schema, load_config, parse_overrides

TINY = CONFIGS / "tiny.yaml"


def _errors(overrides, path=TINY):
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides)
    return exc.value.errors


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny_lora.yaml", "docev_preview.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.datasets and cfg.tokenizer.chat_template == "docev_chatml"


def test_preview_config_carries_reference_values():
    cfg = load_config(CONFIGS / "docev_preview.yaml")
    tok = cfg.tokenizer
    assert (tok.tile_size, tok.patch_size, tok.min_num_tiles, tok.max_num_tiles) == (560, 14, 1, 9)
    assert tok.sampling_ratio == [2, 3] and tok.apply_random_sampling_ratio and tok.max_seq_len == 8192
    assert cfg.optimizer.model_extra == {"lr": 1e-5, "weight_decay": 0.0, "fused": True}
    assert cfg.lr_scheduler.model_extra["num_warmup_steps"] == 100
    assert cfg.loss.component.endswith("CEWithChunkedOutputLoss")
    assert (cfg.clip_grad_norm, cfg.compile, cfg.dtype, cfg.gradient_accumulation_steps) == (1.0, True, "bf16", 32)
    assert cfg.metric_logger.component.endswith("WandBLogger")
    # interpolation resolved across sections
    assert cfg.checkpointer.checkpoint_dir == tok.model_name_or_path


def test_unknown_key_names_path_and_suggests():
    assert _errors(["model.tile_siz=112"]) == [f"{TINY}: model.tile_siz: unknown key (did you mean 'tile_size'?)"]
    assert _errors(["datasets.1.wieght=2"]) == [f"{TINY}: datasets.1.wieght: unknown key (did you mean 'weight'?)"]
    assert _errors(["optimizer.lrr=0.1"]) == [
        f"{TINY}: optimizer.lrr: unknown argument of torch.optim.AdamW (did you mean 'lr'?)"
    ]


def test_unknown_key_in_file(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    data["dataloder"] = {"num_workers": 1}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert _errors([], path) == [f"{path}: dataloder: unknown key (did you mean 'dataloader'?)"]


def test_wrong_type_names_path_and_value():
    (err,) = _errors(["batch_size=two"])
    assert err.startswith(f"{TINY}: batch_size: ") and "integer" in err and "'two'" in err
    (err,) = _errors(["optimizer.lr=fast"])
    assert err == f"{TINY}: optimizer.lr: expected a number, got 'fast'"


def test_missing_required(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    del data["tokenizer"]["model_name_or_path"]
    data["checkpointer"]["checkpoint_dir"] = "/x"
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(data))
    assert _errors([], path) == [f"{path}: tokenizer.model_name_or_path: required key is missing"]


@pytest.mark.parametrize("bad", ["noequals", "=1", "a..b=1", "a.b=[unclosed"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError) as exc:
        parse_overrides([bad])
    assert repr(bad) in str(exc.value)


def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config(TINY, ["optimizer.lr=5e-4", "dataloader.packed=true", "tokenizer.sampling_ratio=[3]"])
    assert cfg.optimizer.model_extra["lr"] == 5e-4 and cfg.dataloader.packed and cfg.tokenizer.sampling_ratio == [3]
    # interpolation sees the override
    cfg = load_config(TINY, ["output_dir=/tmp/elsewhere"])
    assert cfg.checkpointer.checkpoint_dir == "/tmp/elsewhere/base_checkpoint"


def test_broken_interpolation():
    (err,) = _errors(["output_dir=${nowhere}"])
    assert err.startswith(f"{TINY}: output_dir: interpolation failed")


def test_cross_section_rules():
    assert _errors(["model.tile_size=56"]) == [
        f"{TINY}: model.tile_size: 56 disagrees with tokenizer.tile_size = 112; state it once"
    ]
    assert _errors(["tokenizer.image_token_id=7"])[0].startswith(f"{TINY}: model.image_token_id: 1024 disagrees")
    assert "not a multiple" in _errors(["tokenizer.tile_size=100"])[0]
    assert "min_num_tiles" in _errors(["tokenizer.min_num_tiles=4", "tokenizer.max_num_tiles=2"])[0]
    assert "outside 1..8" in _errors(["tokenizer.sampling_ratio=[9]"])[0]
    assert "cannot hold one image" in _errors(["tokenizer.max_seq_len=16", "tokenizer.sampling_ratio=[2]"])[0]
    assert "packing" in _errors(["dataloader.packed=true", "dataloader.bucket_by_length=true"])[0]


def test_default_feature_select_rejected_with_reason():
    (err,) = _errors(["tokenizer.vision_feature_select_strategy=default"])
    assert "tokenizer.vision_feature_select_strategy" in err and "no CLS token" in err


def test_unimportable_component():
    (err,) = _errors(["loss._component_=torchtune.modules.loss.NoSuchLoss"])
    assert err == f"{TINY}: loss._component_: cannot import 'torchtune.modules.loss.NoSuchLoss'"


def test_json_schema_lists_sections():
    schema = json_schema()
    for key in ("model", "tokenizer", "checkpointer", "datasets", "validate", "kubernetes", "train", "export"):
        assert key in schema["properties"]
    assert schema["properties"]["model"]["$ref"]


def test_cli_validate_ok_and_error_exit_code(capsys):
    assert main(["config", "validate", str(TINY), "epochs=3"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 3
    assert main(["config", "validate", str(TINY), "epochz=3"]) == 2
    assert "epochz: unknown key (did you mean 'epochs'?)" in capsys.readouterr().err
    assert main(["config", "schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "DocEVConfig"


def test_export_shard_size():
    from docev.config import parse_byte_size

    sizes = {"5GB": 5 * 10**9, "1MB": 10**6, "2GiB": 2**31, "0.5 MB": 500_000, "100": 100}
    assert {text: parse_byte_size(text) for text in sizes} == sizes
    cfg = load_config(CONFIGS / "tiny.yaml", ["export.max_shard_size=300KiB"])
    assert cfg.export.max_shard_bytes == 300 * 1024
    with pytest.raises(ConfigError, match=r"export\.max_shard_size: .*'5XB' is not a size \(e\.g\. 5GB"):
        load_config(CONFIGS / "tiny.yaml", ["export.max_shard_size=5XB"])
    with pytest.raises(ValueError, match="'0GB' is not a size"):
        parse_byte_size("0GB")


def test_training_run_control_fields():
    cfg = load_config(TINY, ["stop_after_steps=6", "train.collective_timeout_seconds=60"])
    assert (cfg.stop_after_steps, cfg.train.collective_timeout_seconds) == (6, 60)
    assert load_config(TINY).stop_after_steps is None
    (err,) = _errors(["stop_after_steps=0"])
    assert err.startswith(f"{TINY}: stop_after_steps: ") and "greater than or equal to 1" in err
    (err,) = _errors(["train.collective_timeout_seconds=0"])
    assert err.startswith(f"{TINY}: train.collective_timeout_seconds: ") and "greater than 0" in err


def test_master_dtype():
    assert load_config(TINY).master_dtype == "fp32"  # the default: fp32 master weights
    preview = load_config(CONFIGS / "docev_preview.yaml")
    assert (preview.dtype, preview.master_dtype) == ("bf16", "fp32")
    assert load_config(TINY, ["dtype=bf16", "master_dtype=bf16"]).master_dtype == "bf16"
    assert _errors(["master_dtype=bf16"]) == [
        f"{TINY}: master_dtype: bf16 with dtype fp32: the master weights cannot be coarser than the compute dtype"
    ]
    (err,) = _errors(["master_dtype=fp16"])
    assert err.startswith(f"{TINY}: master_dtype: ") and "'fp32' or 'bf16'" in err
    assert load_config(TINY, ["train.termination_grace_seconds=90"]).train.termination_grace_seconds == 90


def test_checkpoint_format_and_async():
    cfg = load_config(TINY)
    assert (cfg.checkpoint_format, cfg.enable_async_checkpointing) == ("dcp", False)
    assert load_config(TINY, ["enable_async_checkpointing=true"]).enable_async_checkpointing is True
    assert load_config(TINY, ["checkpoint_format=hf"]).checkpoint_format == "hf"
    (err,) = _errors(["checkpoint_format=safetensors"])
    assert err.startswith(f"{TINY}: checkpoint_format: ") and "'dcp' or 'hf'" in err
    assert _errors(["checkpoint_format=hf", "enable_async_checkpointing=true"]) == [
        f"{TINY}: enable_async_checkpointing: needs checkpoint_format: dcp (is 'hf'): an hf save gathers to rank 0"
    ]
    lora = CONFIGS / "tiny_lora.yaml"
    assert load_config(lora).enable_async_checkpointing is False
    assert _errors(["enable_async_checkpointing=true"], lora) == [
        f"{lora}: enable_async_checkpointing: docev.models.docev.lora_docev_tiny saves only its adapter, gathered to "
        "rank 0 and written at once (a few MB); set enable_async_checkpointing: false"
    ]
    preview = load_config(CONFIGS / "docev_preview.yaml")
    assert (preview.checkpoint_format, preview.enable_async_checkpointing) == ("dcp", True)


def test_sharding_and_attention_keys():
    (err,) = _errors(
        ["train.nnodes=2", "train.fsdp_strategy=full", "train.gradient_reduction=last_micro_batch_across_nodes"]
    )
    assert err.startswith(f"{TINY}: train: ") and "needs hybrid sharding across nodes" in err
    assert load_config(TINY, ["train.gradient_reduction=last_micro_batch_across_nodes"])  # one node: nothing to defer
    cfg = load_config(TINY, ["train.nnodes=2", "train.gradient_reduction=last_micro_batch_across_nodes"])
    assert cfg.train.fsdp_strategy == "auto" and cfg.train.gradient_reduction == "last_micro_batch_across_nodes"
    assert any("fsdp_strategy" in e for e in _errors(["train.fsdp_strategy=zero3"]))
    assert any("model.attention" in e for e in _errors(["model.attention=flash"]))
    assert any("pad_to_multiple_of" in e for e in _errors(["dataloader.pad_to_multiple_of=0"]))


@pytest.mark.parametrize("text", ["8", "500m", "64Gi", "1.5Ti", "2e3", "0.5", "100k", "3E", "7n", "1e-3", ".5Mi"])
def test_quantities_parse_as_the_kubernetes_client_does(text):
    from kubernetes.utils import parse_quantity as client_parse

    from docev.config.jobs import parse_quantity

    assert parse_quantity(text) == client_parse(text)
    for bad in ("8 Gi", "Gi", "1Gb", "--1", ""):
        with pytest.raises(ValueError):
            parse_quantity(bad)


def test_packed_rows_with_buckets_under_compiled_flex_are_refused():
    base = ["dataloader.packed=true", "dataloader.bucket_by_length=false", "compile=true", "model.attention=flex"]
    with pytest.raises(ConfigError, match="dataloader.pad_to_multiple_of: 512 with packed rows"):
        load_config(CONFIGS / "docev_preview.yaml", [*base, "dataloader.pad_to_multiple_of=512"])
    load_config(CONFIGS / "docev_preview.yaml", [*base, "dataloader.pad_to_multiple_of=null"])
    load_config(CONFIGS / "docev_preview.yaml", [*base[:2], "compile=false", "dataloader.pad_to_multiple_of=512"])


def test_qlora_across_nodes_needs_the_one_dimensional_mesh():
    qlora = ["model._component_=docev.models.docev.lora_docev_preview", "model.quantize_base=true",
             "model.decoder_trainable=false", "enable_async_checkpointing=false",
             "train.gradient_reduction=every_micro_batch"]  # fmt: skip
    with pytest.raises(ConfigError, match="train.fsdp_strategy: auto on 2 nodes with QLoRA .* 1-D mesh only"):
        load_config(CONFIGS / "docev_preview.yaml", qlora)
    load_config(CONFIGS / "docev_preview.yaml", [*qlora, "train.fsdp_strategy=full"])
    load_config(CONFIGS / "docev_preview.yaml", [*qlora, "train.nnodes=1"])


RECORDED: list[dict] = []


def recording_transform(**kwargs):
    """A tokenizer component of this test: the stock transform, with its arguments recorded."""
    from docev.data.transform import docev_preview_transform

    RECORDED.append(kwargs)
    return docev_preview_transform(**kwargs)


def test_tokenizer_component_is_instantiated(tiny_checkpoint):
    from docev.data.transform import transform_from_config

    (err,) = _errors(["tokenizer._component_=no.such.transform"])
    assert err == f"{TINY}: tokenizer._component_: cannot import 'no.such.transform'"
    other = "docev.data.transform.expand_placeholders"  # a callable that takes other arguments
    assert f"{TINY}: tokenizer.max_seq_len: not an argument of {other}" in _errors([f"tokenizer._component_={other}"])
    cfg = load_config(CONFIGS / "tiny.yaml", [f"tokenizer._component_={__name__}.recording_transform",
                                              f"tokenizer.model_name_or_path={tiny_checkpoint}"])  # fmt: skip
    RECORDED.clear()
    transform = transform_from_config(cfg)
    assert [cfg.tokenizer.arguments()] == RECORDED and transform.max_seq_len == cfg.tokenizer.max_seq_len
