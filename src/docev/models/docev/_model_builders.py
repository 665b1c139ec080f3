"""DocEV model builders named in configs (``model._component_``).

The keyword arguments are the config's ``model`` section: trainable flags, ``image_token_id``,
and tiling sizes. Tiling sizes that are given must agree with the architecture (the position
embedding and the checkpoint are fixed by them); the tile counts only bound the grids the
transform produces, which the model reads from each batch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from docev.models.arch import DocEVArch, preview, tiny
from docev.models.docev._attention import AttentionKind
from docev.models.docev._component_builders import docev
from docev.models.docev._fusion import DocEVModel
from docev.models.lora_rules import lora_problems


def docev_from_arch(
    arch: DocEVArch,
    *,
    decoder_trainable: bool = True,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
    image_token_id: int | None = None,
    tile_size: int | None = None,
    patch_size: int | None = None,
    max_num_tiles: int | None = None,
    min_num_tiles: int | None = None,
    lora: dict[str, Any] | None = None,
    attention: AttentionKind = "auto",
) -> DocEVModel:
    """A model at ``arch``'s widths from the config's ``model`` section (what the fixed-size builders call);
    ``lora`` holds the LoRA arguments of the ``lora_*`` builders."""
    for name, value in (("tile_size", tile_size), ("patch_size", patch_size)):
        if value is not None and value != getattr(arch, name):
            raise ValueError(f"model.{name} = {value}, but this architecture's checkpoint has {getattr(arch, name)}")
    given = {"max_num_tiles": max_num_tiles, "min_num_tiles": min_num_tiles}
    arch = replace(arch, **{k: v for k, v in given.items() if v is not None})
    return docev(
        arch,
        image_token_id=image_token_id,
        decoder_trainable=decoder_trainable,
        encoder_trainable=encoder_trainable,
        fusion_trainable=fusion_trainable,
        lora=lora,
        attention=attention,
    )


def docev_preview(
    decoder_trainable: bool = True,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
    image_token_id: int | None = None,
    tile_size: int | None = None,
    patch_size: int | None = None,
    max_num_tiles: int | None = None,
    min_num_tiles: int | None = None,
    attention: AttentionKind = "auto",
) -> DocEVModel:
    """DocEV Preview (11.6B): SigLIP so400m/14 at 560 px, LDPv2, 48-layer Solar-mini decoder."""
    return docev_from_arch(preview(), **locals())


def docev_tiny(
    decoder_trainable: bool = True,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
    image_token_id: int | None = None,
    tile_size: int | None = None,
    patch_size: int | None = None,
    max_num_tiles: int | None = None,
    min_num_tiles: int | None = None,
    attention: AttentionKind = "auto",
) -> DocEVModel:
    """The same structure at toy widths (tests, local demo); matches ``docev init-checkpoint``."""
    return docev_from_arch(tiny(), **locals())


_LORA_KEYS = ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank", "lora_alpha",
              "lora_dropout", "use_dora", "quantize_base")  # fmt: skip


def _lora_model(arch: DocEVArch, args: dict[str, Any]) -> DocEVModel:
    problems = lora_problems(**args)
    if problems:
        raise ValueError("; ".join(f"model.{key}: {why}" for key, why in problems))
    lora = {k: args.pop(k) for k in _LORA_KEYS}
    lora["lora_attn_modules"] = list(lora["lora_attn_modules"])
    return docev_from_arch(arch, lora=lora, **args)


def lora_docev_preview(
    lora_attn_modules: list[str] = ("q_proj", "v_proj"),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
    image_token_id: int | None = None,
    tile_size: int | None = None,
    patch_size: int | None = None,
    max_num_tiles: int | None = None,
    min_num_tiles: int | None = None,
    attention: AttentionKind = "auto",
) -> DocEVModel:
    """DocEV Preview with LoRA/DoRA adapters on the decoder (torchtune's LoRA arguments); the trainable flags
    keep their meaning for the groups without adapters (e.g. connector trained, tower frozen).
    ``quantize_base`` stores the decoder layers' frozen weights in NF4 (QLoRA)."""
    return _lora_model(preview(), dict(locals()))


def lora_docev_tiny(
    lora_attn_modules: list[str] = ("q_proj", "v_proj"),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
    image_token_id: int | None = None,
    tile_size: int | None = None,
    patch_size: int | None = None,
    max_num_tiles: int | None = None,
    min_num_tiles: int | None = None,
    attention: AttentionKind = "auto",
) -> DocEVModel:
    """``lora_docev_preview`` at the tiny widths (tests, local demo)."""
    return _lora_model(tiny(), dict(locals()))
