"""Bytes one checkpoint save writes, counted from the architecture without torch.

``docev render-manifests`` (which imports no torch) needs the size of a save to check the pods' grace period
against it (``docev.k8s.pod.save_grace_warning``). The counts follow the builders' layout, checked against
models built on the meta device in ``tests/models/test_checkpoint_size.py``:

- **saved weights**: every tensor of the HF layout (``hf_param_shapes``: the model's parameters plus the
  unused SigLIP head, which a DCP save carries as its ``unused`` entry);
- **trained**: the decoder (its fusion rows only with ``fusion_trainable``) when ``decoder_trainable``; the
  connector, ``image_newline`` and the fusion rows with ``fusion_trainable``; the vision tower up to its
  feature layer (``vision_feature_layer`` -2: the last layer and ``post_layernorm`` feed nothing and stay
  frozen) with ``encoder_trainable``; the LoRA (DoRA: + magnitude) adapters of a ``lora_*`` builder.

A full or hf save writes the saved weights plus two AdamW moments per trained element, all in
``master_dtype`` (as ``docev.training.memory.checkpoint_bytes`` plans it); an adapter run writes its trained
tensors and their moments only. The recipe state (data position, RNG, metrics) is kilobytes and not counted.
"""

from __future__ import annotations

import math

from docev.models.arch import DECODER, LM_HEAD, PROJECTOR, VISION, DocEVArch, hf_config, hf_param_shapes

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
OPTIMIZER_MOMENTS = 2  # AdamW's exp_avg and exp_avg_sq per trained element


def _adapter_elements(arch: DocEVArch, lora: dict) -> int:
    """LoRA A and B (and DoRA's magnitude) of every adapted projection, over all decoder layers."""
    d, kv, mlp = arch.dim, arch.kv_heads * arch.head_dim, arch.mlp
    attn = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "output_proj": (d, d)}
    per_layer = [attn[name] for name in lora["lora_attn_modules"]]
    if lora["apply_lora_to_mlp"]:
        per_layer += [(d, mlp), (mlp, d), (d, mlp)]  # w1, w2, w3
    adapted = per_layer * arch.layers
    if lora["apply_lora_to_output"]:
        adapted.append((d, arch.vocab_size + arch.fusion_vocab_size))
    magnitude = 1 if lora["use_dora"] else 0
    return sum(lora["lora_rank"] * (n_in + n_out) + magnitude * n_out for n_in, n_out in adapted)


def _trained_tower_keys(arch: DocEVArch) -> set[str]:
    """Vision keys the tower trains with ``encoder_trainable``: embeddings and the layers up to its feature layer."""
    used_layers = arch.vision_layers + 1 + hf_config(arch)["vision_feature_layer"]
    layer = f"{VISION}.encoder.layers."
    return {
        k
        for k in hf_param_shapes(arch)
        if k.startswith(f"{VISION}.embeddings.") or (k.startswith(layer) and int(k.split(".")[4]) < used_layers)
    }


def element_counts(
    arch: DocEVArch,
    *,
    decoder_trainable: bool,
    encoder_trainable: bool,
    fusion_trainable: bool,
    lora: dict | None = None,
) -> tuple[int, int]:
    """(saved weight elements, trained elements) of a model built from ``arch`` with these flags; ``lora``: the
    LoRA arguments of a ``lora_*`` builder (``ModelSection.lora_args()``)."""
    shapes = {k: math.prod(s) for k, s in hf_param_shapes(arch).items()}
    fusion_rows = arch.fusion_vocab_size * arch.dim
    trained = 0
    if decoder_trainable:
        decoder = [v for k, v in shapes.items() if k.startswith(f"{DECODER}.") or k == LM_HEAD]
        trained += sum(decoder) - fusion_rows  # the fusion rows train with the fusion
    if fusion_trainable:
        trained += sum(v for k, v in shapes.items() if k.startswith(f"{PROJECTOR}.") or k == "image_newline")
        trained += fusion_rows
    if encoder_trainable:
        trained += sum(shapes[k] for k in _trained_tower_keys(arch))
    saved = sum(shapes.values())
    if lora is not None:
        adapters = _adapter_elements(arch, lora)
        saved, trained = saved + adapters, trained + adapters
    return saved, trained


def checkpoint_write_bytes(
    arch: DocEVArch,
    *,
    master_dtype: str,
    decoder_trainable: bool,
    encoder_trainable: bool,
    fusion_trainable: bool,
    lora: dict | None = None,
) -> int:
    """Bytes one save writes (all ranks together): see the module docstring."""
    saved, trained = element_counts(
        arch,
        decoder_trainable=decoder_trainable,
        encoder_trainable=encoder_trainable,
        fusion_trainable=fusion_trainable,
        lora=lora,
    )
    weights = trained if lora is not None else saved  # an adapter run saves its trained tensors only
    return (weights + OPTIMIZER_MOMENTS * trained) * DTYPE_BYTES[master_dtype]
