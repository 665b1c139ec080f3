"""HF ⇄ torchtune state dicts for DocEV.

HF layout: ``_arch.hf_param_shapes`` (the released checkpoint). torchtune layout: the
``DocEVModel`` state dict. The decoder goes through torchtune's own Llama converter (key names
and the RoPE q/k permutation); the HF embedding of ``vocab + fusion`` rows splits into the base
``tok_embeddings.weight`` and the trainable ``tok_embeddings.fusion_embedding.weight``. Keys the
model does not use (SigLIP's attention-pool ``head.*``, stored rotary ``inv_freq``) are returned
apart so the checkpointer can write them back unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torchtune.models import convert_weights as tt

from docev.models.docev._arch import PROJECTOR, VISION, DocEVArch, hf_param_shapes

LANGUAGE_MODEL = "language_model."
UNUSED_PREFIXES = (f"{VISION}.head.",)
BASE_EMBED, FUSION_EMBED = "tok_embeddings.weight", "tok_embeddings.fusion_embedding.weight"

_VISION_LAYER = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.output_proj",
    "layer_norm1": "sa_norm",
    "layer_norm2": "mlp_norm",
    "mlp.fc1": "mlp.w1",
    "mlp.fc2": "mlp.w2",
}


def is_unused(hf_key: str) -> bool:
    """Checkpoint tensors the model has no parameter for; carried through on save."""
    return hf_key.startswith(UNUSED_PREFIXES) or hf_key.endswith("rotary_emb.inv_freq")


def fusion_key_map(arch: DocEVArch) -> dict[str, str]:
    """HF -> torchtune names of the vision tower, the connector and ``image_newline``."""
    m = {
        f"{VISION}.embeddings.patch_embedding.weight": "encoder.patch_embed.weight",
        f"{VISION}.embeddings.patch_embedding.bias": "encoder.patch_embed.bias",
        f"{VISION}.embeddings.position_embedding.weight": "encoder.pos_embed",
        f"{VISION}.post_layernorm.weight": "encoder.post_norm.weight",
        f"{VISION}.post_layernorm.bias": "encoder.post_norm.bias",
        f"{PROJECTOR}.mlp.0.weight": "connector.mlp.w1.weight",
        f"{PROJECTOR}.mlp.0.bias": "connector.mlp.w1.bias",
        f"{PROJECTOR}.mlp.2.weight": "connector.mlp.w2.weight",
        f"{PROJECTOR}.mlp.2.bias": "connector.mlp.w2.bias",
        f"{PROJECTOR}.peg.0.weight": "connector.peg.weight",
        f"{PROJECTOR}.peg.0.bias": "connector.peg.bias",
        "image_newline": "image_newline",
    }
    for i in range(arch.vision_layers):
        for hf, tune in _VISION_LAYER.items():
            for p in ("weight", "bias"):
                m[f"{VISION}.encoder.layers.{i}.{hf}.{p}"] = f"encoder.layers.{i}.{tune}.{p}"
    return m


def check_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], arch: DocEVArch, files: Mapping[str, str] | None = None
) -> None:
    """Every tensor the model needs is present with its DESIGN §4 shape; nothing unknown."""
    files = files or {}
    expected = {k: v for k, v in hf_param_shapes(arch).items() if not is_unused(k)}
    errors = [f"missing tensor {k}" for k in expected if k not in state_dict]
    for key, t in state_dict.items():
        where = f" (in {files[key]})" if key in files else ""
        if key in expected and tuple(t.shape) != expected[key]:
            errors.append(f"{key}{where}: shape {tuple(t.shape)}, the architecture needs {expected[key]}")
        elif key not in expected and not is_unused(key):
            errors.append(f"{key}{where}: not a DocEV checkpoint tensor")
    if errors:
        more = f" (+{len(errors) - 10} more)" if len(errors) > 10 else ""
        raise ValueError("checkpoint does not match the DocEV layout: " + "; ".join(errors[:10]) + more)


def decoder_args(arch: DocEVArch) -> dict[str, int]:
    return {"num_heads": arch.heads, "num_kv_heads": arch.kv_heads, "dim": arch.dim, "head_dim": arch.head_dim}


def docev_hf_to_tune(
    state_dict: Mapping[str, torch.Tensor], arch: DocEVArch
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """HF state dict -> (torchtune state dict of ``DocEVModel``, unused tensors to carry through)."""
    check_hf_state_dict(state_dict, arch)
    fusion_map = fusion_key_map(arch)
    model, unused, decoder = {}, {}, {}
    for key, value in state_dict.items():
        if is_unused(key):
            unused[key] = value
        elif key in fusion_map:
            model[fusion_map[key]] = value
        else:
            decoder[key.removeprefix(LANGUAGE_MODEL)] = value
    for key, value in tt.hf_to_tune(decoder, **decoder_args(arch)).items():
        if key == BASE_EMBED:
            model[BASE_EMBED], model[FUSION_EMBED] = value.split([arch.vocab_size, arch.fusion_vocab_size])
        else:
            model[f"decoder.{key}"] = value
    return model, unused


def docev_tune_to_hf(state_dict: Mapping[str, torch.Tensor], arch: DocEVArch) -> dict[str, torch.Tensor]:
    """torchtune state dict of ``DocEVModel`` -> HF state dict (the model's tensors only)."""
    fusion_map = {tune: hf for hf, tune in fusion_key_map(arch).items()}
    out, decoder = {}, {}
    for key, value in state_dict.items():
        if key in fusion_map:
            out[fusion_map[key]] = value
        elif key.startswith("decoder."):
            decoder[key.removeprefix("decoder.")] = value
        elif key not in (BASE_EMBED, FUSION_EMBED):
            raise ValueError(f"{key}: not a DocEV model parameter")
    missing = [k for k in (BASE_EMBED, FUSION_EMBED) if k not in state_dict]
    if missing:
        raise ValueError(f"state dict lacks {missing}")
    decoder[BASE_EMBED] = torch.cat([state_dict[BASE_EMBED], state_dict[FUSION_EMBED]])
    for key, value in tt.tune_to_hf(decoder, **decoder_args(arch)).items():
        out[f"{LANGUAGE_MODEL}{key}"] = value
    return out


def arch_from_hf_config(config: Mapping, origin: str = "config.json") -> DocEVArch:
    """The architecture from a LLaVA-NeXT-style ``config.json`` (the released one has no ``docev`` key):
    ``<image>`` is the first fusion row, so the base vocabulary ends at ``image_token_index``."""
    try:
        v, t = config["vision_config"], config["text_config"]
        vocab = config["image_token_index"]
        tile = v["image_size"]
        tiles = [(h // tile) * (w // tile) for h, w in config["image_grid_pinpoints"]]
        rope = t["rope_theta"] if "rope_theta" in t else t["rope_parameters"]["rope_theta"]
        return DocEVArch(
            tile_size=tile,
            patch_size=v["patch_size"],
            vision_width=v["hidden_size"],
            vision_layers=v["num_hidden_layers"],
            vision_heads=v["num_attention_heads"],
            vision_mlp=v["intermediate_size"],
            vocab_size=vocab,
            fusion_vocab_size=t["vocab_size"] - vocab,
            dim=t["hidden_size"],
            layers=t["num_hidden_layers"],
            heads=t["num_attention_heads"],
            kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
            mlp=t["intermediate_size"],
            rope_base=float(rope),
            max_seq_len=t["max_position_embeddings"],
            vision_eps=v["layer_norm_eps"],
            norm_eps=t["rms_norm_eps"],
            max_num_tiles=max(tiles),
            min_num_tiles=min(tiles),
        )
    except KeyError as exc:
        raise ValueError(f"{origin}: missing field {exc.args[0]!r} needed to build the DocEV architecture") from None
