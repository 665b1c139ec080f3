"""The torch-free checkpoint size (``docev.models.checkpoint_size``) against models built on the meta device."""

import math

import pytest
import torch

from docev.config import LORA_DEFAULTS
from docev.models.arch import preview, siglip_head_shapes, tiny
from docev.models.checkpoint_size import checkpoint_write_bytes, element_counts
from docev.models.docev import docev_from_arch
from docev.training.memory import checkpoint_bytes

FLAGS = [  # (decoder, encoder, fusion)
    (True, False, True),
    (True, True, False),
    (False, True, True),
    (False, False, False),
]
LORAS = [
    None,
    dict(LORA_DEFAULTS),
    {**LORA_DEFAULTS, "lora_attn_modules": ["k_proj", "output_proj"], "apply_lora_to_mlp": True,
     "apply_lora_to_output": True, "use_dora": True, "lora_rank": 4},
]  # fmt: skip


def _meta(arch, decoder, encoder, fusion, lora):
    with torch.device("meta"):
        return docev_from_arch(
            arch, decoder_trainable=decoder, encoder_trainable=encoder, fusion_trainable=fusion, lora=lora
        )


@pytest.mark.parametrize("lora", LORAS, ids=["full", "lora", "lora_mlp_output_dora"])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "dec{}_enc{}_fus{}".format(*map(int, f)))
def test_counts_equal_the_built_model(flags, lora):
    decoder, encoder, fusion = flags
    if lora is not None and decoder:
        pytest.skip("a lora_* builder refuses a trainable decoder")
    arch = tiny()
    model = _meta(arch, decoder, encoder, fusion, lora)
    head = sum(math.prod(s) for s in siglip_head_shapes(arch).values())  # saved as the DCP's unused entry
    saved, trained = element_counts(
        arch, decoder_trainable=decoder, encoder_trainable=encoder, fusion_trainable=fusion, lora=lora
    )
    assert saved == sum(p.numel() for p in model.parameters()) + head
    assert trained == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("lora", [None, dict(LORA_DEFAULTS)], ids=["full", "lora"])
def test_preview_bytes_equal_the_recipes_plan_plus_the_unused_head(lora):
    """At real widths, the bytes equal what the recipe plans (``memory.checkpoint_bytes`` on the built model)
    plus the unused head a full DCP save also writes."""
    arch = preview()
    model = _meta(arch, lora is None, False, True, lora)
    planned = checkpoint_bytes(model, torch.float32, trained_only=lora is not None)
    head = 0 if lora else 4 * sum(math.prod(s) for s in siglip_head_shapes(arch).values())
    flags = {"decoder_trainable": lora is None, "encoder_trainable": False, "fusion_trainable": True}
    assert checkpoint_write_bytes(arch, master_dtype="fp32", lora=lora, **flags) == planned + head
    assert checkpoint_write_bytes(arch, master_dtype="bf16", lora=lora, **flags) * 2 == planned + head
