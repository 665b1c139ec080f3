"""DocEV architecture sizes and the HF checkpoint key layout (DESIGN §4).

One dataclass holds every width so that the checkpoint writer, the torchtune builders and
the weight converter agree on shapes; ``hf_param_shapes`` is the key layout of the released
HF checkpoint (``vision_tower.*``, ``multi_modal_projector.*``, ``image_newline``,
``language_model.*``), including the unused SigLIP ``head.*`` that is carried through. Kept outside
:mod:`docev.models.docev` (which imports torch and torchtune), like ``lora_rules``, so that commands that only
read a config (``docev render-manifests`` sizing a checkpoint) need no training stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

VISION = "vision_tower.vision_model"
PROJECTOR = "multi_modal_projector"
DECODER = "language_model.model"
LM_HEAD = "language_model.lm_head.weight"


@dataclass(frozen=True)
class DocEVArch:
    # vision tower (SigLIP-style ViT, no CLS token)
    tile_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    # decoder (Llama architecture)
    vocab_size: int  # base vocabulary; ids >= vocab_size are the trainable fusion rows
    fusion_vocab_size: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    rope_base: float = 1_000_000.0
    max_seq_len: int = 8192
    vision_eps: float = 1e-6
    norm_eps: float = 1e-5
    max_num_tiles: int = 9
    min_num_tiles: int = 1

    @property
    def image_token_id(self) -> int:
        """``<image>`` is the first fusion row (64000 in the released model)."""
        return self.vocab_size

    @property
    def patch_grid(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def as_dict(self) -> dict:
        return asdict(self)


def preview() -> DocEVArch:
    """The released DocEV Preview (11.6B)."""
    return DocEVArch(
        tile_size=560, patch_size=14, vision_width=1152, vision_layers=27, vision_heads=16, vision_mlp=4304,
        vocab_size=64000, fusion_vocab_size=64, dim=4096, layers=48, heads=32, kv_heads=8, mlp=14336,
    )  # fmt: skip


def tiny() -> DocEVArch:
    """Same structure at toy widths for tests and the local demo (tile 112 → 8×8 patch grid)."""
    return DocEVArch(
        tile_size=112, patch_size=14, vision_width=64, vision_layers=2, vision_heads=4, vision_mlp=256,
        vocab_size=1024, fusion_vocab_size=64, dim=128, layers=2, heads=4, kv_heads=2, mlp=256,
        max_seq_len=2048,
    )  # fmt: skip


ARCHS = {"preview": preview, "tiny": tiny}


def arch_of_component(component: str) -> DocEVArch:
    """The architecture a builder (``model._component_``: ``docev_tiny``, ``lora_docev_preview`` ...) builds."""
    name = component.rpartition(".")[2]
    for key, make in ARCHS.items():
        if name.endswith(f"_{key}"):
            return make()
    raise ValueError(f"model._component_ {component}: only the *_tiny and *_preview builders have a known size")


def hf_param_shapes(a: DocEVArch) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF-format checkpoint with its shape, in a stable order."""
    w, m = a.vision_width, a.vision_mlp
    s: dict[str, tuple[int, ...]] = {
        f"{VISION}.embeddings.patch_embedding.weight": (w, 3, a.patch_size, a.patch_size),
        f"{VISION}.embeddings.patch_embedding.bias": (w,),
        f"{VISION}.embeddings.position_embedding.weight": (a.patch_grid**2, w),
    }
    for i in range(a.vision_layers):
        p = f"{VISION}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}.self_attn.{proj}.weight"] = (w, w)
            s[f"{p}.self_attn.{proj}.bias"] = (w,)
        for ln in ("layer_norm1", "layer_norm2"):
            s[f"{p}.{ln}.weight"] = (w,)
            s[f"{p}.{ln}.bias"] = (w,)
        s.update({f"{p}.mlp.fc1.weight": (m, w), f"{p}.mlp.fc1.bias": (m,)})
        s.update({f"{p}.mlp.fc2.weight": (w, m), f"{p}.mlp.fc2.bias": (w,)})
    s.update({f"{VISION}.post_layernorm.weight": (w,), f"{VISION}.post_layernorm.bias": (w,)})
    s.update(siglip_head_shapes(a))
    d = a.dim
    s.update({
        f"{PROJECTOR}.mlp.0.weight": (d, w), f"{PROJECTOR}.mlp.0.bias": (d,),
        f"{PROJECTOR}.mlp.2.weight": (d, d), f"{PROJECTOR}.mlp.2.bias": (d,),
        f"{PROJECTOR}.peg.0.weight": (d, 1, 3, 3), f"{PROJECTOR}.peg.0.bias": (d,),
        "image_newline": (d,),
    })  # fmt: skip
    vocab = a.vocab_size + a.fusion_vocab_size
    s[f"{DECODER}.embed_tokens.weight"] = (vocab, d)
    kv = a.kv_heads * a.head_dim
    for i in range(a.layers):
        p = f"{DECODER}.layers.{i}"
        s.update({
            f"{p}.self_attn.q_proj.weight": (d, d), f"{p}.self_attn.k_proj.weight": (kv, d),
            f"{p}.self_attn.v_proj.weight": (kv, d), f"{p}.self_attn.o_proj.weight": (d, d),
            f"{p}.mlp.gate_proj.weight": (a.mlp, d), f"{p}.mlp.up_proj.weight": (a.mlp, d),
            f"{p}.mlp.down_proj.weight": (d, a.mlp),
            f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,),
        })  # fmt: skip
    s[f"{DECODER}.norm.weight"] = (d,)
    s[LM_HEAD] = (vocab, d)
    return s


def siglip_head_shapes(a: DocEVArch) -> dict[str, tuple[int, ...]]:
    """SigLIP's attention-pool head: in every checkpoint, used by nothing (carried through on export)."""
    w, m, p = a.vision_width, a.vision_mlp, f"{VISION}.head"
    return {
        f"{p}.probe": (1, 1, w),
        f"{p}.attention.in_proj_weight": (3 * w, w), f"{p}.attention.in_proj_bias": (3 * w,),
        f"{p}.attention.out_proj.weight": (w, w), f"{p}.attention.out_proj.bias": (w,),
        f"{p}.layernorm.weight": (w,), f"{p}.layernorm.bias": (w,),
        f"{p}.mlp.fc1.weight": (m, w), f"{p}.mlp.fc1.bias": (m,),
        f"{p}.mlp.fc2.weight": (w, m), f"{p}.mlp.fc2.bias": (w,),
    }  # fmt: skip


def hf_config(a: DocEVArch) -> dict:
    """``config.json`` of a DocEV checkpoint: LLaVA-NeXT-like, with SigLIP and Llama sub-configs."""
    grid = [
        [i * a.tile_size, j * a.tile_size]
        for i in range(1, a.max_num_tiles + 1)
        for j in range(1, a.max_num_tiles + 1)
        if a.min_num_tiles <= i * j <= a.max_num_tiles
    ]
    return {
        "architectures": ["DocEVForConditionalGeneration"],
        "model_type": "docev",
        "image_token_index": a.image_token_id,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "full",
        "projector_type": "ldpv2",
        "image_grid_pinpoints": grid,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": a.vision_width,
            "intermediate_size": a.vision_mlp,
            "num_hidden_layers": a.vision_layers,
            "num_attention_heads": a.vision_heads,
            "image_size": a.tile_size,
            "patch_size": a.patch_size,
            "num_channels": 3,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": a.vision_eps,
            "vision_use_head": True,
        },
        "text_config": {
            "model_type": "llama",
            "vocab_size": a.vocab_size + a.fusion_vocab_size,
            "hidden_size": a.dim,
            "intermediate_size": a.mlp,
            "num_hidden_layers": a.layers,
            "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads,
            "rms_norm_eps": a.norm_eps,
            "rope_theta": a.rope_base,
            "max_position_embeddings": a.max_seq_len,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
        },
        "docev": a.as_dict(),
    }
