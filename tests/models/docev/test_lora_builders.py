"""LoRA / DoRA / QLoRA builders: adapters where asked, trainable groups, refused combinations."""

from dataclasses import replace

import pytest
import torch
from conftest import tiny_config
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune.modules.low_precision import FrozenNF4Linear
from torchtune.modules.peft import DoRALinear, LoRALinear, get_adapter_params

from docev.config import ConfigError, ModelSection
from docev.models.docev import docev_from_arch, docev_tiny, init_rope, lora_docev_tiny, tiny


def test_adapters_on_the_targets_only():
    model = lora_docev_tiny(lora_attn_modules=["q_proj", "output_proj"], apply_lora_to_mlp=True, lora_rank=4)
    layer = model.decoder.layers[0]
    for m in (layer.attn.q_proj, layer.attn.output_proj, layer.mlp.w1, layer.mlp.w2, layer.mlp.w3):
        assert type(m) is LoRALinear and m.rank == 4 and m.alpha == 16.0
    assert type(layer.attn.k_proj) is torch.nn.Linear and type(model.decoder.output) is torch.nn.Linear
    assert all(type(m) is torch.nn.Linear for m in model.encoder.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("use_dora", [False, True])
def test_trainable_are_adapters_plus_flagged_groups(use_dora):
    model = lora_docev_tiny(use_dora=use_dora, fusion_trainable=True, encoder_trainable=False)
    groups = model.param_groups()
    adapters = set(get_adapter_params(model))
    assert set(groups["adapter"]) == adapters and adapters
    assert all(n.endswith(("lora_a.weight", "lora_b.weight", "magnitude")) for n in adapters)
    assert any(n.endswith("magnitude") for n in adapters) == use_dora
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapters | set(groups["fusion"])
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in groups["decoder"])
    assert isinstance(model.decoder.layers[1].attn.v_proj, DoRALinear if use_dora else LoRALinear)


def test_no_adapter_state_in_a_full_model():
    assert docev_tiny().param_groups()["adapter"] == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decoder_trainable": True}, "both fully trained and adapted"),
        ({"decoder_trainable": True, "quantize_base": True}, "NF4, which cannot be trained"),
        ({"lora_attn_modules": []}, "no adapter to train"),
        ({"lora_attn_modules": ["o_proj"]}, r"\['o_proj'\]: not attention projections"),
        ({"lora_rank": 0}, "lora_rank: 0: must be at least 1"),
        ({"lora_dropout": 1.0}, r"must be in \[0, 1\)"),
    ],
)
def test_builder_refuses_impossible_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora_docev_tiny(**kwargs)


def test_nf4_needs_whole_blocks():
    """tiny's k_proj (64 rows × 128) is half an NF4 scaler block: the error says so instead of torchao's assert."""
    with torch.device("meta"), pytest.raises(ValueError, match="k_proj holds 128x64 weights, not a multiple of 16384"):
        lora_docev_tiny(quantize_base=True)


def test_qlora_builds_and_trains_a_step_on_cpu():
    """torchao's NF4 runs on CPU (quantise, dequantising matmul, backward into the adapters)."""
    torch.manual_seed(0)
    arch = replace(tiny(), kv_heads=4)  # every decoder projection a whole number of NF4 blocks
    lora = {"lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": True, "quantize_base": True}
    model = docev_from_arch(arch, decoder_trainable=False, lora=lora)
    layer = model.decoder.layers[0]
    assert isinstance(layer.attn.q_proj.weight, NF4Tensor) and isinstance(layer.mlp.w1.weight, NF4Tensor)
    assert type(layer.attn.k_proj) is FrozenNF4Linear and isinstance(layer.attn.k_proj.weight, NF4Tensor)
    init_rope(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, arch.vocab_size, (2, 16))
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert layer.attn.q_proj.weight.grad is None and layer.attn.q_proj.lora_a.weight.grad is not None
    opt.step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert {n for n in changed if "lora_" in n}  # lora_b starts at zero, so lora_b moves first
    assert torch.isfinite(loss)


def test_config_lora_checks(tmp_path, tiny_checkpoint):
    section = ModelSection.model_validate({"_component_": "docev.models.docev.lora_docev_tiny"})
    assert section.decoder_trainable is False and section.lora_rank == 8 and section.use_dora is False
    src = [{"source": str(tmp_path)}]
    lora = ["model._component_=docev.models.docev.lora_docev_tiny", "model.decoder_trainable=false"]
    cfg = tiny_config(tmp_path, tiny_checkpoint, src, *lora, "model.lora_rank=4")
    assert cfg.to_dict()["model"]["lora_attn_modules"] == ["q_proj", "v_proj"] and cfg.model.lora_rank == 4
    assert "lora_rank" not in tiny_config(tmp_path, tiny_checkpoint, src).to_dict()["model"]
    with pytest.raises(ConfigError, match="model.lora_rank: docev.models.docev.docev_tiny takes no LoRA arguments"):
        tiny_config(tmp_path, tiny_checkpoint, src, "model.lora_rank=4")
    with pytest.raises(ConfigError, match="model.decoder_trainable: true with LoRA on the decoder: quantize_base"):
        tiny_config(tmp_path, tiny_checkpoint, src, lora[0], "model.quantize_base=true")
