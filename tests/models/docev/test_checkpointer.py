"""DocEVCheckpointer: HF folder -> torchtune state dict -> HF folder, bit for bit."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from docev.models.docev import DocEVCheckpointer, docev_tiny
from docev.run.checkpoints import latest_checkpoint


def _folder_tensors(folder):
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_load_save_round_trip_is_bit_identical(tiny_checkpoint, hf_tensors, tmp_path):
    ckpt = DocEVCheckpointer(tiny_checkpoint, model_type="DOCEV", output_dir=tmp_path / "out", max_shard_bytes=200_000)
    loaded = ckpt.load_checkpoint()
    assert set(loaded) == {"model"}
    model = docev_tiny()
    model.load_state_dict(loaded["model"], strict=True)
    step = ckpt.save_checkpoint({"model": model.state_dict()}, step=3)

    assert step == tmp_path / "out" / "step_3" and latest_checkpoint(tmp_path / "out") == step
    saved = _folder_tensors(step)
    assert set(saved) == set(hf_tensors)  # SigLIP head.* carried through
    for key, value in hf_tensors.items():
        assert saved[key].dtype == value.dtype and torch.equal(saved[key], value), key
    index = json.loads((step / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in step.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(hf_tensors)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "generation_config.json"):  # fmt: skip
        assert (step / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    config = json.loads((step / "config.json").read_text())
    assert config == json.loads((tiny_checkpoint / "config.json").read_text())  # fp32 in, fp32 out
    assert not list((tmp_path / "out").glob(".*"))  # no temporary folders or pointer files left

    again = DocEVCheckpointer(step).load_checkpoint()["model"]
    assert all(torch.equal(again[k], v) for k, v in loaded["model"].items())


def test_bf16_save_updates_dtype_and_recipe_state_round_trips(tiny_checkpoint, tune_state, tmp_path):
    ckpt = DocEVCheckpointer(tiny_checkpoint, output_dir=tmp_path)
    ckpt.load_checkpoint()
    bf16 = {k: v.to(torch.bfloat16) for k, v in tune_state.items()}
    recipe = {"optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3}]}, "steps_run": 3}
    first = ckpt.save_checkpoint({"model": bf16, **recipe}, step=1)
    second = ckpt.save_checkpoint({"model": bf16, **recipe}, step=2)
    assert latest_checkpoint(tmp_path) == second and first.is_dir()
    assert json.loads((second / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert _folder_tensors(second)["image_newline"].dtype == torch.bfloat16
    assert _folder_tensors(second)["vision_tower.vision_model.head.probe"].dtype == torch.float32  # untouched
    resumed = DocEVCheckpointer(second).load_checkpoint()
    assert resumed["steps_run"] == 3 and resumed["optimizer"]["param_groups"] == [{"lr": 1e-3}]
    assert torch.equal(resumed["model"]["decoder.output.weight"], bf16["decoder.output.weight"])
    # the weights alone, as stored (export reads these without the optimizer state)
    stored = DocEVCheckpointer(second).load_hf_state_dict()
    assert set(stored) == set(_folder_tensors(second))
    assert all(torch.equal(v, _folder_tensors(second)[k]) for k, v in stored.items())


def test_checkpoint_files_forms(tiny_checkpoint):
    files = sorted(p.name for p in tiny_checkpoint.glob("model-*.safetensors"))
    n = len(files)
    by_list = DocEVCheckpointer(tiny_checkpoint, checkpoint_files=files)
    by_format = DocEVCheckpointer(
        tiny_checkpoint,
        checkpoint_files={"filename_format": "model-{}-of-{}.safetensors", "max_filename": f"{n:05d}"},
    )
    assert by_list.checkpoint_files == by_format.checkpoint_files == DocEVCheckpointer(tiny_checkpoint).checkpoint_files
    with pytest.raises(FileNotFoundError, match=r"\['nope.safetensors'\] not found"):
        DocEVCheckpointer(tiny_checkpoint, checkpoint_files=["nope.safetensors"])
    with pytest.raises(ValueError, match="mapping form needs 'max_filename'"):
        DocEVCheckpointer(tiny_checkpoint, checkpoint_files={"filename_format": "x"})


def test_bad_checkpoints_are_named(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="model_type 'LLAMA3'"):
        DocEVCheckpointer(tiny_checkpoint, model_type="LLAMA3")
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        DocEVCheckpointer(tmp_path)
    with pytest.raises(RuntimeError, match="call load_checkpoint"):
        DocEVCheckpointer(tiny_checkpoint, output_dir=tmp_path).save_checkpoint({"model": {}}, step=1)
    with pytest.raises(ValueError, match="output_dir is not set"):
        DocEVCheckpointer(tiny_checkpoint).save_checkpoint({"model": {}}, step=1)

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    first = broken / "model-00001-of-{:05d}.safetensors".format(len(list(broken.glob("model-*.safetensors"))))
    tensors = load_file(str(first))
    key = next(iter(tensors))
    save_file({**tensors, key: torch.zeros(2, 2)}, str(first))
    with pytest.raises(ValueError, match=rf"{key} \(in {first.name}\): shape \(2, 2\)"):
        DocEVCheckpointer(broken).load_checkpoint()
    (broken / "model.safetensors.index.json").unlink()
    save_file({key: tensors[key]}, str(broken / "zz-extra.safetensors"))
    with pytest.raises(ValueError, match=f"{key} is in both"):
        DocEVCheckpointer(broken).load_checkpoint()
