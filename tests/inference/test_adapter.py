"""A PEFT adapter applied for inference: the merge by hand, the errors, and no export package on the path."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from docev.inference import apply_adapter

Q = "language_model.model.layers.0.self_attn.q_proj"


def _adapter(folder, tensors, **config):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 8, **config}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_lora_merge_is_w_plus_scaled_ba_cast_back(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=gen).to(torch.bfloat16)
    a, b = torch.randn(2, 4, generator=gen), torch.randn(6, 2, generator=gen)
    head = torch.randn(3, 4, generator=gen)
    hf = {f"{Q}.weight": w, "language_model.lm_head.weight": torch.zeros(3, 4, dtype=torch.bfloat16)}
    folder = _adapter(tmp_path / "adapter", {f"base_model.model.{Q}.lora_A.weight": a,
                                             f"base_model.model.{Q}.lora_B.weight": b,
                                             "base_model.model.language_model.lm_head.weight": head})  # fmt: skip
    out = apply_adapter(hf, folder)
    expected = (w.float() + (8 / 2) * b @ a).to(torch.bfloat16)  # PEFT's LoRA: W + (alpha / r) B A
    assert out[f"{Q}.weight"].dtype == torch.bfloat16 and torch.equal(out[f"{Q}.weight"], expected)
    assert torch.equal(out["language_model.lm_head.weight"], head.to(torch.bfloat16))  # a modules_to_save tensor


def test_adapter_errors_name_the_folder(tmp_path):
    hf = {f"{Q}.weight": torch.zeros(6, 4)}
    lora = {f"base_model.model.{Q}.lora_A.weight": torch.zeros(2, 4)}
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        apply_adapter(hf, tmp_path)
    with pytest.raises(ValueError, match="only LoRA/DoRA"):
        apply_adapter(hf, _adapter(tmp_path / "ia3", lora, peft_type="IA3"))
    other = {"base_model.model.vision_tower.x.lora_A.weight": torch.zeros(2, 4)}
    with pytest.raises(ValueError, match=r"other: adapters on \['vision_tower.x'\]"):
        apply_adapter(hf, _adapter(tmp_path / "other", other))


def test_inference_evaluation_and_training_never_import_the_export_package():
    code = ("import sys, docev.inference, docev.evaluation.evaluate, docev.training.recipe, docev.eval_loss; "
            "print(sorted(m for m in sys.modules if m.startswith('docev.export')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
