"""Tiny DocEV assets made locally: an HF-format checkpoint and a tokenizer.

Nothing can be downloaded at run time, so the demo and the tests use a checkpoint with the
released key layout (DESIGN §4) at toy widths, random weights, safetensors shards + index,
``config.json``, ``preprocessor_config.json`` and a byte-level BPE tokenizer trained here
on synthetic document text. Deterministic for a seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from docev.models.arch import ARCHS, PROJECTOR, VISION, DocEVArch, hf_config, hf_param_shapes
from docev.models.docev._folder import save_sharded
from docev.text.chat_template import bundled_template

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
IMAGE_TOKEN = "<image>"


def init_weights(arch: DocEVArch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the HF layout: norms at 1, biases small, decoder matrices N(0, 0.02).

    The vision tower and connector stand in for a pretrained encoder, whose features differ between pages:
    their matrices are fan-in scaled (variance preserving) and their biases zero. At N(0, 0.02) the signal
    shrinks layer by layer until the biases dominate and every page gets nearly the same features (mean
    features' cosine 0.96-0.999 between pages), so a fine-tune could never learn anything from the image."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_param_shapes(arch).items():
        encoder = name.startswith((VISION, PROJECTOR)) and not name.endswith(("probe", "position_embedding.weight"))
        if name.endswith("norm.weight") or ".layer_norm" in name and name.endswith(".weight"):
            t = torch.ones(shape)
        elif encoder and len(shape) == 1:
            t = torch.zeros(shape)
        elif encoder:
            t = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif len(shape) == 1 or name.endswith("probe"):
            t = torch.randn(shape, generator=gen) * 0.01
        else:
            t = torch.randn(shape, generator=gen) * 0.02
        out[name] = t.contiguous()
    return out


def train_tokenizer(arch: DocEVArch, seed: int = 0):
    """Byte-level BPE with exactly ``arch.vocab_size`` base ids; ``<image>`` = the first fusion id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from docev.synth import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=arch.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=seed), trainer)
    if tok.get_vocab_size() != arch.vocab_size:
        raise RuntimeError(f"tokenizer corpus too small: {tok.get_vocab_size()} ids, need {arch.vocab_size}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", IMAGE_TOKEN],
    )
    fast.chat_template = bundled_template()
    if fast.convert_tokens_to_ids(IMAGE_TOKEN) != arch.image_token_id:
        raise RuntimeError(f"{IMAGE_TOKEN} got id {fast.convert_tokens_to_ids(IMAGE_TOKEN)}")
    return fast


def init_checkpoint(out: str | Path, size: str = "tiny", seed: int = 0, max_shard_mb: float = 1.0) -> Path:
    """Write a DocEV HF-format checkpoint folder (weights, configs, tokenizer) to ``out``."""
    if size not in ARCHS or size == "preview":
        raise ValueError(f"--size {size!r}: only 'tiny' can be generated (the preview model is 11.6B)")
    arch = ARCHS[size]()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = init_weights(arch, seed)
    save_sharded(weights, out, max_shard_bytes=math.ceil(max_shard_mb * 2**20))
    config = hf_config(arch)
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = {
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 3,  # PIL bicubic
        "image_grid_pinpoints": config["image_grid_pinpoints"],
        "size": {"height": arch.tile_size, "width": arch.tile_size},
        "crop_size": {"height": arch.tile_size, "width": arch.tile_size},
        "do_pad": True,
        "rescale_factor": 1 / 255,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    train_tokenizer(arch, seed).save_pretrained(str(out))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": _token_id(out, "<|im_end|>"), "pad_token_id": 0}, indent=2)
    )
    return out


def _token_id(folder: Path, token: str) -> int:
    vocab = json.loads((folder / "tokenizer.json").read_text())
    for added in vocab["added_tokens"]:
        if added["content"] == token:
            return added["id"]
    raise KeyError(token)
