"""Export of an adapter run: the merged model against an independent merge, the PEFT adapter loaded by the
real ``peft`` library onto transformers' LlamaForCausalLM, and ``DocEVGenerator`` on base + adapter."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_adapter_step
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from docev.export import ExportError, export_checkpoint, verify_checksums
from docev.export.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from docev.inference import DocEVGenerator
from docev.inference.adapter import ADAPTER_BASE, BaseMismatchError
from docev.models.docev import docev_tune_to_hf, hf_config, tiny

from .conftest import folder_tensors, sources_list

RANK, ALPHA = 4, 8.0
LORA = ["model._component_=docev.models.docev.lora_docev_tiny", "model.decoder_trainable=false",
        "model.apply_lora_to_mlp=true", f"model.lora_rank={RANK}", f"model.lora_alpha={ALPHA}"]  # fmt: skip


def _config(run: Path, checkpoint: Path, synth_sources, *extra: str):
    return tiny_config(run, checkpoint, sources_list(synth_sources), *LORA, *extra)


def _trained_run(run: Path, checkpoint: Path, synth_sources, *extra: str):
    """A step_8 folder as an adapter run writes it, with random adapters (lora_b non-zero) and fusion group."""
    cfg = _config(run, checkpoint, synth_sources, *extra)
    trained, state = write_adapter_step(cfg)
    return cfg, trained, state


def _independent_merge(state, trained, dora):
    """W + (alpha/rank)·B·A in float32 (DoRA: rows rescaled to magnitude / ‖W + (alpha/rank)·B·A‖)."""
    out = {k: v for k, v in state.items()}
    out.update({k: v for k, v in trained.items() if k in state})
    for key in [k for k in trained if k.endswith(".lora_a.weight")]:
        module = key.removesuffix(".lora_a.weight")
        w, a, b = state[f"{module}.weight"].float(), trained[key], trained[f"{module}.lora_b.weight"]
        merged = w + (ALPHA / RANK) * b @ a
        if dora:
            merged = merged * (trained[f"{module}.magnitude"] / torch.linalg.norm(merged, dim=1)).view(-1, 1)
        out[f"{module}.weight"] = merged
    return out


@pytest.mark.parametrize("dora, dtype", [(False, "bf16"), (False, "fp32"), (True, "bf16")])
def test_merged_export_equals_an_independent_merge(tmp_path, tiny_checkpoint, synth_sources, dora, dtype):
    cfg, trained, state = _trained_run(tmp_path, tiny_checkpoint, synth_sources, f"model.use_dora={str(dora).lower()}",
                                       f"export.dtype={dtype}")  # fmt: skip
    result = export_checkpoint(cfg)
    out = Path(result.destination)
    got = folder_tensors(out)
    cast = torch.bfloat16 if dtype == "bf16" else torch.float32
    want = docev_tune_to_hf(_independent_merge(state, trained, dora), tiny())
    assert set(want) <= set(got)
    assert all(got[k].dtype == cast and torch.equal(got[k], want[k].to(cast)) for k in want), [
        k for k in want if not torch.equal(got[k], want[k].to(cast))
    ][:5]
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    k_proj = "language_model.model.layers.0.self_attn.k_proj.weight"
    base = folder_tensors(tiny_checkpoint)
    assert not torch.equal(got[q], base[q].to(cast)) and torch.equal(got[k_proj], base[k_proj].to(cast))
    sums = verify_checksums(out)
    assert f"adapter/{ADAPTER_WEIGHTS}" in sums and f"adapter/{ADAPTER_CONFIG}" in sums
    card = (out / "README.md").read_text()
    method = "DoRA" if dora else "LoRA"
    assert f"| method | {method} on the decoder" in card and "| rank / alpha | 4 / 8 (scale alpha/rank = 2) |" in card
    assert "| adapter targets | q_proj, v_proj, w1, w2, w3" in card
    config = json.loads((out / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and config["use_dora"] == dora
    assert config["modules_to_save"] == ["image_newline", "language_model.model.embed_tokens",
                                         "multi_modal_projector.mlp.0", "multi_modal_projector.mlp.2",
                                         "multi_modal_projector.peg.0"]  # fmt: skip


class _LanguageOnly(torch.nn.Module):
    """The released model's module path for the decoder (``language_model``), holding transformers' Llama."""

    def __init__(self, llama: LlamaForCausalLM):
        super().__init__()
        self.language_model = llama


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_on_llama_matches_the_merged_decoder(tmp_path, tiny_checkpoint, synth_sources, dora):
    cfg, _, _ = _trained_run(tmp_path, tiny_checkpoint, synth_sources, f"model.use_dora={str(dora).lower()}",
                             "export.dtype=fp32")  # fmt: skip
    out = Path(export_checkpoint(cfg).destination)
    base_export = Path(export_checkpoint(cfg, checkpoint="base", destination=str(tmp_path / "base_export")).destination)

    text = {k: v for k, v in hf_config(tiny())["text_config"].items() if k != "model_type"}
    llama = LlamaForCausalLM(LlamaConfig(**text)).eval()
    lm = {k.removeprefix("language_model."): v for k, v in folder_tensors(base_export).items()
          if k.startswith("language_model.")}  # fmt: skip
    llama.load_state_dict(lm)
    peft_model = PeftModel.from_pretrained(_LanguageOnly(llama), str(out / "adapter")).eval()
    assert type(peft_model.base_model.model.language_model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert hasattr(peft_model.base_model.model.language_model.model.layers[0].self_attn.q_proj, "lora_A")

    tokens = torch.randint(0, tiny().vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    tokens[0, 3] = tiny().vocab_size + 5  # a fusion row: the embedding is a saved module
    merged = DocEVGenerator(out)
    with torch.no_grad():
        ours = merged.model(tokens)
        theirs = peft_model.base_model.model.language_model(input_ids=tokens).logits
        base_plus_adapter = DocEVGenerator(tiny_checkpoint, adapter=out / "adapter").model(tokens)
        step = DocEVGenerator(Path(cfg.checkpointer.output_dir) / "step_8").model(tokens)  # base + trained, in memory
    diff = (ours - theirs).abs().max().item()
    print(f"max |logits(ours merged) - logits(peft on LlamaForCausalLM)| = {diff:.3g} (dora={dora})")
    assert diff <= 1e-5
    assert (ours - base_plus_adapter).abs().max().item() <= 1e-5
    assert (ours - step).abs().max().item() <= 1e-5
    unadapted = DocEVGenerator(base_export).model(tokens)
    assert (ours - unadapted).abs().max().item() > 1e-2  # the adapters change the model


def test_export_refuses_other_adapter_settings(tmp_path, tiny_checkpoint, synth_sources):
    cfg, _, _ = _trained_run(tmp_path, tiny_checkpoint, synth_sources)
    other = _config(tmp_path, tiny_checkpoint, synth_sources, "model.lora_rank=8")
    with pytest.raises(ExportError, match="rank: checkpoint 4, config 8"):
        export_checkpoint(other)


def test_adapters_refuse_a_base_they_were_not_trained_on(tmp_path, tiny_checkpoint, synth_sources):
    """The base export holds the same weights in other files: its fingerprint differs, so both the exported
    adapter and the step folder are refused, naming both fingerprints."""
    cfg, _, _ = _trained_run(tmp_path, tiny_checkpoint, synth_sources)
    out = Path(export_checkpoint(cfg).destination)
    other = Path(export_checkpoint(cfg, checkpoint="base", destination=str(tmp_path / "other")).destination)
    recorded = json.loads((out / "adapter" / ADAPTER_BASE).read_text())
    assert recorded["base_dir"] == str(tiny_checkpoint)
    want = recorded["base"]["model.safetensors.index.json"]
    with pytest.raises(
        BaseMismatchError, match=f"recorded fingerprint .*index.json: {want}}}; {other} has .*index.json: (?!{want})"
    ):
        DocEVGenerator(other, adapter=out / "adapter")
    with pytest.raises(BaseMismatchError, match=f"step_8 was trained on another base than {other}"):
        DocEVGenerator(Path(cfg.checkpointer.output_dir) / "step_8", base=other)
