"""Greedy generation from a DocEV model folder (an export, a ``step_N`` or a base checkpoint).

The prompt goes through the training transform and collate (chat template, anyres tiles,
placeholder expansion at one sampling ratio), so inference sees exactly what training saw. The
images run through the vision tower once, in the prefill; each new token then costs one decoder
step against torchtune's KV caches. ``use_cache=False`` recomputes the whole sequence at every
step instead: the reference the cached path is tested against.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchtune.data import Message
from torchtune.modules import local_kv_cache

from docev.data.collate import DocEVCollate
from docev.data.transform import DocEVTransform, docev_preview_transform
from docev.export.adapter import apply_adapter
from docev.models.docev import DocEVCheckpointer, DocEVModel, docev, docev_hf_to_tune


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]  # generated ids, the stop token included when reached
    prompt_tokens: int
    stopped: bool  # True: ended on a stop token; False: ran to max_new_tokens
    sampling_ratio: int


@torch.no_grad()
def greedy_generate(
    model: DocEVModel,
    tokens: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    suppress_token_ids: Sequence[int] = (),
    use_cache: bool = True,
    **images: Any,
) -> tuple[list[int], bool]:
    """Argmax decoding of one prompt ``tokens`` [1, S]; ``images`` are the model's image inputs
    (``pixel_values``, ``image_sizes``, ``image_grids``, ``sampling_ratio``), used in the prefill only.
    ``suppress_token_ids`` are never chosen (``<image>`` has no image to fill it; fusion rows have no
    token). Returns (generated ids, whether a stop token ended the generation)."""
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one prompt [1, S], got shape {tuple(tokens.shape)}")
    prompt_len = tokens.shape[1]
    total = prompt_len + max_new_tokens
    if total > model.decoder.max_seq_len:
        raise ValueError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's "
            f"max_seq_len {model.decoder.max_seq_len}"
        )
    device = tokens.device
    suppress = torch.tensor(sorted(set(suppress_token_ids)), dtype=torch.long, device=device)
    stops = set(stop_token_ids)
    causal = torch.tril(torch.ones(total, total, dtype=torch.bool, device=device))
    dtype = model.image_newline.dtype
    caches = (
        local_kv_cache(model, batch_size=1, device=device, dtype=dtype, decoder_max_seq_len=total)
        if use_cache
        else contextlib.nullcontext()
    )
    out: list[int] = []
    seq = tokens
    with caches:
        prefill = {"mask": causal[None, :prompt_len], "input_pos": torch.arange(prompt_len, device=device)[None]}
        logits = model(tokens, **(prefill if use_cache else {}), **images)
        for pos in range(prompt_len, total):
            last = logits[0, -1].clone()
            last[suppress] = float("-inf")
            nxt = int(last.argmax())
            out.append(nxt)
            if nxt in stops:
                return out, True
            if pos + 1 == total:
                break
            new = torch.tensor([[nxt]], device=device)
            if use_cache:
                logits = model(new, mask=causal[None, pos : pos + 1], input_pos=torch.tensor([[pos]], device=device))
            else:
                seq = torch.cat([seq, new], dim=1)
                logits = model(seq, **images)
    return out, False


class DocEVGenerator:
    """A model folder loaded for inference: weights, tokenizer, chat template, tiling, stop tokens.

    Args:
        model_dir (str | Path): HF-format DocEV folder (``config.json``, safetensors, tokenizer files).
        device (str | torch.device): where the model runs.
        dtype (torch.dtype | None): compute dtype; None keeps the stored dtype.
        adapter (str | Path | None): a PEFT LoRA/DoRA adapter folder (an export's ``adapter/``) merged into
            ``model_dir``'s weights before they load (the base + adapter model).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        adapter: str | Path | None = None,
    ):
        self.model_dir = Path(model_dir)
        ckpt = DocEVCheckpointer(self.model_dir)
        self.arch = ckpt.arch
        hf = ckpt.load_hf_state_dict()
        if adapter is not None:
            hf = apply_adapter(hf, Path(adapter))
        state, _ = docev_hf_to_tune(hf, self.arch)
        self.dtype = dtype or state["image_newline"].dtype
        self.device = torch.device(device)
        with torch.device("meta"):
            model = docev(self.arch, decoder_trainable=False, encoder_trainable=False, fusion_trainable=False)
        # Weights cast, RoPE tables built in float32 on the device: as torchtune's recipes load a model.
        model.load_state_dict({k: v.to(self.device, self.dtype) for k, v in state.items()}, strict=True, assign=True)
        with self.device:
            for module in model.modules():
                if hasattr(module, "rope_init"):
                    module.rope_init()
        self.model = model.eval()
        self.transform = _transform(self.model_dir, self.arch)
        tokenizer = self.transform.tokenizer
        self.stop_token_ids = _stop_token_ids(self.model_dir, self.transform)
        vocab_out = self.arch.vocab_size + self.arch.fusion_vocab_size
        self.suppress_token_ids = [self.transform.image_token_id, *range(len(tokenizer), vocab_out)]
        a, t = self.arch, self.transform
        self._collate = DocEVCollate(  # the training collate: placeholder expansion, tiles, normalisation
            image_token_id=t.image_token_id, pad_id=tokenizer.pad_token_id or 0, tile_size=a.tile_size,
            patch_size=a.patch_size, min_num_tiles=a.min_num_tiles, max_num_tiles=a.max_num_tiles,
            max_seq_len=a.max_seq_len, mean=t.pixels.mean, std=t.pixels.std, dtype=self.dtype,
        )  # fmt: skip

    def prepare(self, images: Sequence[str | Path | Image.Image], prompt: str, sampling_ratio: int) -> dict[str, Any]:
        """One user turn (each image, a newline, then ``prompt``) + the assistant prefix → model inputs."""
        side = self.arch.patch_grid
        if not 1 <= sampling_ratio <= side:
            raise ValueError(f"sampling_ratio {sampling_ratio} outside 1..{side} (the tile's patch grid side)")
        parts: list[dict[str, Any]] = []
        for image in images:
            parts += [{"type": "image", "content": image}, {"type": "text", "content": "\n"}]
        parts.append({"type": "text", "content": prompt})
        encoded = self.transform.encode([Message(role="user", content=parts)], add_generation_prompt=True)
        tiled = encoded.images or []
        sample = {
            "ratio": sampling_ratio, "tokens": encoded.tokens, "loss_mask": encoded.loss_mask, "id": "prompt",
            "row": 0, "image_sizes": encoded.image_sizes, "image_grids": [t.plan.grid for t in tiled], "images": tiled,
        }  # fmt: skip
        batch = self._collate([sample])
        inputs = {k: batch[k] for k in ("tokens", "pixel_values", "image_sizes", "image_grids")}
        inputs = {k: v.to(self.device) if v is not None else None for k, v in inputs.items()}
        return {**inputs, "sampling_ratio": sampling_ratio}

    def generate(
        self,
        images: Sequence[str | Path | Image.Image],
        prompt: str,
        *,
        max_new_tokens: int = 64,
        sampling_ratio: int = 2,
        use_cache: bool = True,
    ) -> Generation:
        inputs = self.prepare(images, prompt, sampling_ratio)
        tokens = inputs.pop("tokens")
        ids, stopped = greedy_generate(
            self.model, tokens, max_new_tokens=max_new_tokens, stop_token_ids=self.stop_token_ids,
            suppress_token_ids=self.suppress_token_ids, use_cache=use_cache, **inputs,
        )  # fmt: skip
        text_ids = ids[:-1] if stopped else ids
        text = self.transform.tokenizer.decode(text_ids, skip_special_tokens=True)
        return Generation(text, ids, tokens.shape[1], stopped, sampling_ratio)


def _transform(model_dir: Path, arch: Any) -> DocEVTransform:
    """The training transform for this folder: its tokenizer, image processor and chat template."""
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text()
    else:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        if not isinstance(config.get("chat_template"), str):
            raise FileNotFoundError(
                f"{model_dir}: no chat_template.jinja and no chat_template in tokenizer_config.json"
            )
        template = config["chat_template"]
    return docev_preview_transform(
        str(model_dir), image_token_id=arch.image_token_id, tile_size=arch.tile_size, patch_size=arch.patch_size,
        max_num_tiles=arch.max_num_tiles, min_num_tiles=arch.min_num_tiles, max_seq_len=arch.max_seq_len,
        chat_template=template, apply_random_sampling_ratio=False,
    )  # fmt: skip


def _stop_token_ids(model_dir: Path, transform: DocEVTransform) -> list[int]:
    """``eos_token_id`` of ``generation_config.json`` (an id or a list), else the transform's stop tokens."""
    path = model_dir / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    if eos is None:
        return list(transform.stop_token_ids)
    return [eos] if isinstance(eos, int) else list(eos)
