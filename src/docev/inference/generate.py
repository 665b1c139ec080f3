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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchtune.modules import local_kv_cache

from docev.data.collate import DocEVCollate
from docev.data.messages import Message
from docev.data.transform import DocEVTransform, docev_preview_transform
from docev.inference.adapter import adapter_run_state, apply_adapter
from docev.models.docev import DocEVCheckpointer, DocEVModel, docev, docev_hf_to_tune
from docev.models.docev._peft import is_trained_only

# What to show for an empty answer: a blank line reads as a broken tool.
NO_TEXT = "(no text: the model answered the stop token)"


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
    token). Returns (generated ids, whether a stop token ended the generation). The cached path is
    :func:`greedy_generate_batch` with one row; ``use_cache=False`` recomputes the whole sequence at
    every step (the reference both are tested against)."""
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one prompt [1, S], got shape {tuple(tokens.shape)}")
    if use_cache:
        kwargs = {"max_new_tokens": max_new_tokens, "stop_token_ids": stop_token_ids}
        return greedy_generate_batch(model, [tokens[0]], suppress_token_ids=suppress_token_ids, **kwargs, **images)[0]
    total = _check_length(model, tokens.shape[1], max_new_tokens)
    suppress = torch.tensor(sorted(set(suppress_token_ids)), dtype=torch.long, device=tokens.device)
    stops, out, seq = set(stop_token_ids), [], tokens
    logits = model(tokens, **images)
    for pos in range(tokens.shape[1], total):
        last = logits[0, -1].clone()
        last[suppress] = float("-inf")
        nxt = int(last.argmax())
        out.append(nxt)
        if nxt in stops:
            return out, True
        if pos + 1 == total:
            break
        seq = torch.cat([seq, torch.tensor([[nxt]], device=tokens.device)], dim=1)
        logits = model(seq, **images)
    return out, False


def _check_length(model: DocEVModel, prompt_len: int, max_new_tokens: int) -> int:
    total = prompt_len + max_new_tokens
    if total > model.decoder.max_seq_len:
        raise ValueError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's "
            f"max_seq_len {model.decoder.max_seq_len}"
        )
    return total


@torch.no_grad()
def greedy_generate_batch(
    model: DocEVModel,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    suppress_token_ids: Sequence[int] = (),
    pad_id: int = 0,
    **images: Any,
) -> list[tuple[list[int], bool]]:
    """Argmax decoding of several prompts (1-D id tensors) in one forward per step.

    Prompts are left-padded to the longest, so every row's next token sits in the same column; one KV
    cache of ``longest + max_new_tokens`` slots serves the batch. The mask lets each row attend only to
    its own real tokens (a padding slot attends to itself, so no row of the softmax is empty) and the
    positions count real tokens only, so a row computes what it would alone. ``images`` hold every
    prompt's images in row order (one ``sampling_ratio``). Rows that stopped keep decoding until all
    have (their extra tokens are dropped). Returns (generated ids, stopped) per prompt."""
    if not prompts:
        return []
    device, b = prompts[0].device, len(prompts)
    lengths = [int(p.numel()) for p in prompts]
    width = max(lengths)
    total = _check_length(model, width, max_new_tokens)
    tokens = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros(b, total, dtype=torch.bool, device=device)
    real[:, width:] = True  # generated tokens
    for i, p in enumerate(prompts):
        tokens[i, width - lengths[i] :] = p
        real[i, width - lengths[i] :] = True
    mask = torch.tril(torch.ones(total, total, dtype=torch.bool, device=device))[None] & real[:, None, :]
    mask.diagonal(dim1=1, dim2=2)[:] = True
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    suppress = torch.tensor(sorted(set(suppress_token_ids)), dtype=torch.long, device=device)
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    out = torch.empty(b, 0, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    dtype = model.image_newline.dtype
    with local_kv_cache(model, batch_size=b, device=device, dtype=dtype, decoder_max_seq_len=total):
        with last_position_logits(model):
            logits = model(tokens, mask=mask[:, :width], input_pos=positions[:, :width], **images)
        for pos in range(width, total):
            last = logits[:, -1].clone()
            last[:, suppress] = float("-inf")
            nxt = last.argmax(-1)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= torch.isin(nxt, stops)
            if bool(done.all()) or pos + 1 == total:
                break
            step = {"mask": mask[:, pos : pos + 1], "input_pos": positions[:, pos : pos + 1]}
            logits = model(nxt[:, None], **step)
    results = []
    stop_set = set(stop_token_ids)
    for row in out.tolist():
        end = next((k for k, t in enumerate(row) if t in stop_set), None)
        results.append((row[: end + 1], True) if end is not None else (row, False))
    return results


@contextlib.contextmanager
def last_position_logits(model: DocEVModel) -> Iterator[None]:
    """Forwards inside give the logits of the last position only, [B, 1, vocab]: what a prefill needs. The final
    norm and the output projection act per position, so the row is the one the whole sequence would give, without
    computing (and holding, in float32) logits for every prompt position: a third of a tiny model's prefill
    FLOPs, and at a real vocabulary the largest tensor of a long prompt."""
    handle = model.decoder.norm.register_forward_pre_hook(lambda _module, args: (args[0][:, -1:],))
    try:
        yield
    finally:
        handle.remove()


class DocEVGenerator:
    """A model folder loaded for inference: weights, tokenizer, chat template, tiling, stop tokens.

    Args:
        model_dir (str | Path): HF-format DocEV folder (``config.json``, safetensors, tokenizer files), a
            DCP ``step_N`` (its shards consolidated on CPU), or an adapter run's ``step_N`` (read over its base
            with the adapters merged).
        device (str | torch.device): where the model runs.
        dtype (torch.dtype | None): compute dtype; None keeps the stored dtype.
        adapter (str | Path | None): a PEFT LoRA/DoRA adapter folder (an export's ``adapter/``) merged into
            ``model_dir``'s weights before they load (the base + adapter model).
        base (str | Path | None): the base checkpoint an adapter run's ``step_N`` is read over (default: the
            one its ``peft.json`` names); ignored for other folders.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        adapter: str | Path | None = None,
        base: str | Path | None = None,
    ):
        self.model_dir = Path(model_dir)
        if is_trained_only(self.model_dir):  # a LoRA/DoRA run's step folder: base + trained tensors
            if adapter is not None:
                raise ValueError(f"{self.model_dir} is an adapter run's checkpoint; --adapter applies to a base model")
            state, self.arch = adapter_run_state(self.model_dir, base)
        else:
            ckpt = DocEVCheckpointer(self.model_dir)
            self.arch = ckpt.arch
            hf = ckpt.load_hf_state_dict()
            if adapter is not None:  # `docev generate --adapter`: the base + a PEFT adapter
                hf = apply_adapter(hf, Path(adapter), self.model_dir)
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
        parts: list[dict[str, Any]] = []
        for image in images:
            parts += [{"type": "image", "content": image}, {"type": "text", "content": "\n"}]
        parts.append({"type": "text", "content": prompt})
        prompts, inputs = self.prepare_batch([[Message(role="user", content=parts)]], sampling_ratio)
        return {"tokens": prompts[0][None], **inputs}

    def encode(self, conversation: Sequence[Message], sampling_ratio: int) -> dict[str, Any]:
        """A conversation ending in a user turn → one sample of the training collate (chat template, tiles);
        ``prompt_length`` gives its length, ``generate_encoded`` answers a list of them."""
        side = self.arch.patch_grid
        if not 1 <= sampling_ratio <= side:
            raise ValueError(f"sampling_ratio {sampling_ratio} outside 1..{side} (the tile's patch grid side)")
        encoded = self.transform.encode(list(conversation), add_generation_prompt=True)
        tiled = encoded.images or []
        return {"ratio": sampling_ratio, "tokens": encoded.tokens, "loss_mask": encoded.loss_mask, "id": "",
                "row": 0, "image_sizes": encoded.image_sizes, "image_grids": [t.plan.grid for t in tiled],
                "images": tiled}  # fmt: skip

    def prompt_length(self, sample: dict[str, Any]) -> int:
        """The prompt's tokens, its ``<image>`` placeholders expanded: what a batch pads to the longest."""
        return self._collate.row_length(sample)

    def prepare_batch(
        self, conversations: Sequence[Sequence[Message]], sampling_ratio: int
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Conversations ending in a user turn → (one 1-D prompt per conversation, the batch's image
        inputs in conversation order), through the training transform and collate."""
        return self._collated([self.encode(c, sampling_ratio) for c in conversations])

    def _collated(self, samples: Sequence[dict[str, Any]]) -> tuple[list[torch.Tensor], dict[str, Any]]:
        batch = self._collate([{**s, "id": str(k)} for k, s in enumerate(samples)])  # errors name the row
        tokens = batch["tokens"].to(self.device)
        prompts = [tokens[i, :n] for i, n in enumerate(batch["row_lengths"])]
        inputs = {k: batch[k] for k in ("pixel_values", "image_sizes", "image_grids")}
        inputs = {k: v.to(self.device) if v is not None else None for k, v in inputs.items()}
        return prompts, {**inputs, "sampling_ratio": batch["sampling_ratio"]}

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
        return self._generation(ids, stopped, tokens.shape[1], sampling_ratio)

    def generate_batch(
        self, conversations: Sequence[Sequence[Message]], *, max_new_tokens: int = 64, sampling_ratio: int = 2
    ) -> list[Generation]:
        """The assistant's next answer for each conversation, all decoded together (one padded KV cache)."""
        samples = [self.encode(c, sampling_ratio) for c in conversations]
        return self.generate_encoded(samples, max_new_tokens=max_new_tokens)

    def generate_encoded(self, samples: Sequence[dict[str, Any]], *, max_new_tokens: int = 64) -> list[Generation]:
        """``generate_batch`` for prompts already encoded (``encode``; one sampling ratio)."""
        prompts, inputs = self._collated(samples)
        results = greedy_generate_batch(
            self.model, prompts, max_new_tokens=max_new_tokens, stop_token_ids=self.stop_token_ids,
            suppress_token_ids=self.suppress_token_ids, pad_id=self._collate.pad_id, **inputs,
        )  # fmt: skip
        pairs = zip(results, prompts, strict=True)
        return [self._generation(ids, stopped, len(p), inputs["sampling_ratio"]) for (ids, stopped), p in pairs]

    def _generation(self, ids: list[int], stopped: bool, prompt_tokens: int, sampling_ratio: int) -> Generation:
        text = self.transform.tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
        return Generation(text, ids, prompt_tokens, stopped, sampling_ratio)


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
