"""The DocEV model transform: messages → token ids, loss mask and uint8 tiles.

Instantiated from the config's ``tokenizer:`` section (``_component_:
docev.data.transform.docev_preview_transform``). Work is split at the sampling ratio:

* :meth:`DocEVTransform.encode` is ratio-independent: token ids with ONE ``<image>`` placeholder
  per image, a per-token loss mask, and the images (uint8 base tile + resized canvas image, or only their
  sizes). This is what the preprocessor stores.
* :meth:`DocEVTransform.expand` picks up a ratio (per batch, later) and expands each placeholder
  to the image's exact token count (:func:`docev.vision.geometry.num_image_tokens`), giving
  ``tokens`` and ``labels`` (``-100`` on masked and image positions). A sample longer than
  ``max_seq_len`` follows ``overflow_policy``: a larger ratio from ``sampling_ratio``, else the
  text after the last image is cut, else it is dropped and counted in :attr:`DocEVTransform.drops`.
  An image block is never cut and no filler sample is made up.

Counting needs no pixels (:meth:`DocEVTransform.count_tokens`): the validator calls it with sizes
read from image headers.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from docev.config import resolve_component
from docev.data.messages import Message, UFXType, message_dicts, message_images, ufx_to_messages
from docev.text.chat_template import ChatTemplate, resolve_chat_template, token_loss_mask
from docev.text.tokenizer import Tokenizer, load_tokenizer
from docev.ufx import UFXRecord
from docev.vision.geometry import TilePlan, num_image_tokens, plan_tiles
from docev.vision.image_io import load_image, read_image_size
from docev.vision.tiling import PixelConfig, TiledImage, normalize, tile_image

if TYPE_CHECKING:
    import torch

OVERFLOW_STEPS = ("larger_ratio", "truncate_text", "drop")
DROP_REASONS = ("too_long", "no_loss_after_truncation")
IGNORE_INDEX = -100  # torchtune's CROSS_ENTROPY_IGNORE_IDX (its loss skips these labels), without importing it
# Vision towers whose first output token is a CLS token ('default' feature selection drops it).
_CLS_ENCODERS = frozenset({"clip_vision_model"})


class SampleTooLongError(ValueError):
    """A sample that fits no allowed ratio and whose ``overflow_policy`` has no ``drop`` step."""


@dataclass(frozen=True)
class TokenCount:
    """Sequence length of a sample per sampling ratio (image placeholders expanded)."""

    text: int  # tokens from the chat template, one placeholder per image
    per_ratio: dict[int, int]

    @property
    def max(self) -> int:
        """The longest variant (the least aggressive ratio)."""
        return max(self.per_ratio.values())

    @property
    def min(self) -> int:
        """The shortest variant (the most aggressive ratio)."""
        return min(self.per_ratio.values())


@dataclass
class EncodedSample:
    """Ratio-independent result of :meth:`DocEVTransform.encode`."""

    tokens: list[int]  # one image_token_id per image
    loss_mask: list[bool]  # True where the token carries loss
    image_sizes: list[tuple[int, int]]  # original (height, width), order of appearance
    images: list[TiledImage] | None = None  # uint8 base + resized image; None when encoded without pixels


@dataclass(frozen=True)
class FitDecision:
    """How a sample fits ``max_seq_len``: the ratio used, the expanded length, how many (unexpanded)
    tokens to keep when the trailing text is cut, or why it is dropped."""

    ratio: int | None
    length: int
    keep: int | None = None
    drop_reason: str | None = None

    @property
    def truncated(self) -> bool:
        return self.keep is not None


def expand_placeholders(
    tokens: Sequence[int], loss_mask: Sequence[bool], image_token_id: int, image_token_counts: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Each ``image_token_id`` placeholder → ``image_token_counts[k]`` copies (images in order);
    labels = token where ``loss_mask`` else ``-100``, and ``-100`` on every image position."""
    t = np.asarray(tokens, dtype=np.int64)
    is_image = t == image_token_id
    if int(is_image.sum()) != len(image_token_counts):
        raise ValueError(f"{int(is_image.sum())} image placeholders but {len(image_token_counts)} image token counts")
    labels = np.where(np.asarray(loss_mask, dtype=bool) & ~is_image, t, IGNORE_INDEX)
    repeats = np.ones(len(t), dtype=np.int64)
    repeats[is_image] = image_token_counts
    return np.repeat(t, repeats).tolist(), np.repeat(labels, repeats).tolist()


class DocEVTransform:
    """Tokenizer + chat template + anyres tiling for DocEV (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate,
        *,
        image_token: str = "<image>",
        stop_tokens: Sequence[str] = ("<|im_end|>",),
        tile_size: int = 560,
        patch_size: int = 14,
        max_num_tiles: int = 9,
        min_num_tiles: int = 1,
        sampling_ratio: Sequence[int] = (2, 3),
        apply_random_sampling_ratio: bool = True,
        max_seq_len: int = 8192,
        add_vision_id: bool = False,
        overflow_policy: Sequence[str] = OVERFLOW_STEPS,
        ufx_type: UFXType = "instruction",
        pixels: PixelConfig | None = None,
        seed: int = 0,
    ):
        unknown = [s for s in overflow_policy if s not in OVERFLOW_STEPS]
        if unknown:
            raise ValueError(f"overflow_policy: unknown step(s) {unknown}; expected some of {OVERFLOW_STEPS}")
        if not sampling_ratio:
            raise ValueError("sampling_ratio needs at least one ratio")
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self._backend = tokenizer.backend_tokenizer
        self.image_token, self.image_token_id = image_token, _token_id(tokenizer, image_token, "image_token")
        self.stop_token_ids = [_token_id(tokenizer, t, "stop_tokens") for t in stop_tokens]
        self.tile_size, self.patch_size = tile_size, patch_size
        self.min_num_tiles, self.max_num_tiles = min_num_tiles, max_num_tiles
        self.sampling_ratio = tuple(sampling_ratio)
        self.apply_random_sampling_ratio = apply_random_sampling_ratio
        self.max_seq_len = max_seq_len
        self.add_vision_id = add_vision_id
        self.overflow_policy = tuple(overflow_policy)
        self.ufx_type = ufx_type
        self.pixels = pixels or PixelConfig()
        self.drops: Counter[str] = Counter()
        self._rng = random.Random(seed)

    # -- text --------------------------------------------------------------------------------------

    def tokenize_messages(
        self, messages: Sequence[Message], *, ufx_type: UFXType | None = None, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids (one placeholder per image) and the loss mask. Instruction: the chat template,
        loss on assistant replies and their closing stop token. Pretraining: bos + text + eos, all loss."""
        if (ufx_type or self.ufx_type) == "pretrain":
            tokens = self._pretrain_tokens(messages)
            mask = [True] * len(tokens)
        else:
            rendered = self.chat_template.render(
                message_dicts(messages),
                add_generation_prompt=add_generation_prompt,
                add_vision_id=self.add_vision_id,
                bos_token=self.tokenizer.bos_token,
                eos_token=self.tokenizer.eos_token,
            )
            enc = self._backend.encode(rendered.text, add_special_tokens=False)
            tokens = enc.ids
            mask = token_loss_mask(enc.offsets, tokens, rendered.spans, self.stop_token_ids)
        n_images = sum(1 for m in messages for p in m.content if p["type"] == "image")
        found = tokens.count(self.image_token_id)
        if found != n_images:
            raise ValueError(
                f"{found} {self.image_token} tokens for {n_images} images: the chat template must write "
                f"{self.image_token} once per image part, and the text must not contain it"
            )
        return tokens, mask

    def _pretrain_tokens(self, messages: Sequence[Message]) -> list[int]:
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if bos is None or eos is None:
            raise ValueError("pretraining sources need a tokenizer with bos and eos tokens")
        text = "".join(self.image_token if p["type"] == "image" else p["content"] for m in messages for p in m.content)
        return [bos, *self._backend.encode(text, add_special_tokens=False).ids, eos]

    # -- counting ----------------------------------------------------------------------------------

    def image_tokens(self, height: int, width: int, ratio: int) -> int:
        """Tokens one image of (height, width) costs at ``ratio``."""
        return num_image_tokens(
            height, width, ratio, tile_size=self.tile_size, patch_size=self.patch_size,
            min_num_tiles=self.min_num_tiles, max_num_tiles=self.max_num_tiles,
        )  # fmt: skip

    def plan(self, height: int, width: int) -> TilePlan:
        """Canvas, resized size and grid of an image of (height, width)."""
        return plan_tiles(height, width, self.tile_size, self.min_num_tiles, self.max_num_tiles)

    def _image_extra(self, sizes: Sequence[tuple[int, int]], ratio: int) -> int:
        """Tokens the images add over their placeholders at ``ratio``."""
        return sum(self.image_tokens(h, w, ratio) - 1 for h, w in sizes)

    def count_tokens(
        self, messages: Sequence[Message], image_sizes: Sequence[tuple[int, int]], *, ufx_type: UFXType | None = None
    ) -> TokenCount:
        """Sequence length per sampling ratio, without pixels (sizes from image headers)."""
        tokens, _ = self.tokenize_messages(messages, ufx_type=ufx_type)
        return self._count(len(tokens), image_sizes)

    def _count(self, n_text: int, sizes: Sequence[tuple[int, int]]) -> TokenCount:
        return TokenCount(n_text, {r: n_text + self._image_extra(sizes, r) for r in self.sampling_ratio})

    def count_record(
        self, record: UFXRecord, image_sizes: Sequence[tuple[int, int]], *, new_system_prompt: str | None = None
    ) -> TokenCount:
        """:meth:`count_tokens` for a parsed UFX record (pretraining when it has ``text``)."""
        ufx_type: UFXType = "pretrain" if record.text is not None else "instruction"
        messages = ufx_to_messages(record, ufx_type=ufx_type, new_system_prompt=new_system_prompt)
        return self.count_tokens(messages, image_sizes, ufx_type=ufx_type)

    # -- encoding and expansion --------------------------------------------------------------------

    def tile(self, image: Image.Image) -> TiledImage:
        """RGB image → (base, resized/canvas, plan), uint8, with this checkpoint's resampling filter."""
        return tile_image(
            image, tile_size=self.tile_size, min_num_tiles=self.min_num_tiles,
            max_num_tiles=self.max_num_tiles, resample=self.pixels.resample,
        )  # fmt: skip

    def encode(
        self,
        messages: Sequence[Message],
        *,
        ufx_type: UFXType | None = None,
        load_pixels: bool = True,
        add_generation_prompt: bool = False,
    ) -> EncodedSample:
        """Ratio-independent sample. Image parts hold a path, a PIL image or a :class:`TiledImage` already tiled
        for this transform (e.g. read back from a shard); with ``load_pixels=False`` only sizes are read (from
        headers for paths)."""
        tokens, mask = self.tokenize_messages(messages, ufx_type=ufx_type, add_generation_prompt=add_generation_prompt)
        sources = message_images(messages)
        if not load_pixels:
            sizes = [_size(s) for s in sources]
            return EncodedSample(tokens, mask, sizes)
        tiled = [self._tiled(s) for s in sources]
        return EncodedSample(tokens, mask, [t.plan.size for t in tiled], tiled)

    def _tiled(self, source: Any) -> TiledImage:
        if isinstance(source, TiledImage):
            if source.plan != self.plan(*source.plan.size):
                raise ValueError(f"an image tiled as {source.plan}; this transform tiles it as "
                                 f"{self.plan(*source.plan.size)}")  # fmt: skip
            return source
        return self.tile(source if isinstance(source, Image.Image) else load_image(source))

    def choose_ratio(self) -> int:
        """A random ratio from ``sampling_ratio`` when ``apply_random_sampling_ratio``, else the first."""
        return self._rng.choice(self.sampling_ratio) if self.apply_random_sampling_ratio else self.sampling_ratio[0]

    def fit(self, sample: EncodedSample, ratio: int, *, allow_larger_ratio: bool = True) -> FitDecision:
        """Apply ``overflow_policy`` for ``ratio`` (pure: counts nothing); ``allow_larger_ratio=False``
        skips its ``larger_ratio`` step (a batch already at its ratio). Raises :class:`SampleTooLongError`
        when nothing fits and the policy has no ``drop``."""
        order = [ratio]
        if allow_larger_ratio and "larger_ratio" in self.overflow_policy:
            order += sorted(r for r in set(self.sampling_ratio) if r > ratio)
        extra = {r: self._image_extra(sample.image_sizes, r) for r in order}
        n = len(sample.tokens)
        for r in order:
            if n + extra[r] <= self.max_seq_len:
                return FitDecision(r, n + extra[r])
        reason = "too_long"
        if "truncate_text" in self.overflow_policy:
            tokens = np.asarray(sample.tokens)
            is_image = tokens == self.image_token_id
            after_last_image = int(np.flatnonzero(is_image)[-1]) + 1 if is_image.any() else 0
            carries_loss = np.asarray(sample.loss_mask, dtype=bool) & ~is_image
            for r in order:
                keep = self.max_seq_len - extra[r]
                if keep < max(after_last_image, 1):
                    continue
                if carries_loss[:keep].any():
                    return FitDecision(r, keep + extra[r], keep=keep)
                reason = "no_loss_after_truncation"
        if "drop" in self.overflow_policy:
            return FitDecision(None, n + extra[order[-1]], drop_reason=reason)
        raise SampleTooLongError(
            f"{n + extra[order[-1]]} tokens at sampling ratio {order[-1]} > max_seq_len {self.max_seq_len} "
            f"({reason}); overflow_policy {list(self.overflow_policy)} has no 'drop' step"
        )

    def batch_ratio(self, samples: Sequence[EncodedSample], ratio: int) -> int:
        """The ratio for a batch that shares one (the model pools a batch at one ratio): the smallest
        ratio ≥ ``ratio`` at which ``larger_ratio`` fits every sample that is not dropped. Expand the
        batch at it with ``allow_larger_ratio=False``."""
        chosen = [d.ratio for d in (self.fit(s, ratio) for s in samples) if d.ratio is not None]
        return max(chosen, default=ratio)

    def expand(
        self, sample: EncodedSample, ratio: int | None = None, *, allow_larger_ratio: bool = True
    ) -> dict[str, Any] | None:
        """Model-ready sample at ``ratio`` (chosen with :meth:`choose_ratio` when None), or None when the
        overflow policy drops it (counted in :attr:`drops`). Keys: ``tokens``, ``labels``, ``sampling_ratio``,
        ``image_sizes`` and ``image_grids`` ((rows, cols), base tile not counted) per image, ``truncated``
        and, with pixels, ``pixel_values`` (uint8 [1 + rows·cols, 3, T, T] per image)."""
        ratio = self.choose_ratio() if ratio is None else ratio
        decision = self.fit(sample, ratio, allow_larger_ratio=allow_larger_ratio)
        if decision.drop_reason is not None:
            self.drops[decision.drop_reason] += 1
            return None
        r = decision.ratio
        assert r is not None
        tokens, mask = sample.tokens, sample.loss_mask
        if decision.keep is not None:
            tokens, mask = tokens[: decision.keep], mask[: decision.keep]
        counts = [self.image_tokens(h, w, r) for h, w in sample.image_sizes]
        ids, labels = expand_placeholders(tokens, mask, self.image_token_id, counts)
        out: dict[str, Any] = {
            "tokens": ids, "labels": labels, "sampling_ratio": r, "truncated": decision.truncated,
            "image_sizes": list(sample.image_sizes),
            "image_grids": [self.plan(h, w).grid for h, w in sample.image_sizes],
        }  # fmt: skip
        if sample.images is not None:
            out["pixel_values"] = [t.pixels(self.tile_size) for t in sample.images]
        return out

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """uint8 tiles → model input with the checkpoint's mean/std (call in the collate or on device)."""
        return normalize(pixels, self.pixels.mean, self.pixels.std, dtype)

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> dict[str, Any] | None:
        """torchtune-style: ``{"messages": [...], "ufx_type"?: ...}`` → :meth:`expand` of :meth:`encode`
        at a ratio from :meth:`choose_ratio` (or ``sample["sampling_ratio"]``)."""
        encoded = self.encode(sample["messages"], ufx_type=sample.get("ufx_type"), add_generation_prompt=inference)
        return self.expand(encoded, sample.get("sampling_ratio"))


def _size(source: Any) -> tuple[int, int]:
    if isinstance(source, TiledImage):
        return source.plan.size
    if isinstance(source, Image.Image):
        return source.height, source.width
    return read_image_size(source)


def _token_id(tokenizer: Tokenizer, token: str, what: str) -> int:
    tid = tokenizer.backend_tokenizer.token_to_id(token)
    if tid is None:
        raise ValueError(f"{what}: {token!r} is not in the tokenizer's vocabulary")
    return tid


def _check_feature_select(strategy: str, checkpoint: Path) -> None:
    if strategy == "full":
        return
    if strategy != "default":
        raise ValueError(f"vision_feature_select_strategy {strategy!r}: expected 'full' or 'default'")
    config = checkpoint / "config.json"
    vision = json.loads(config.read_text()).get("vision_config", {}) if config.is_file() else {}
    if vision.get("model_type") not in _CLS_ENCODERS:
        raise ValueError(
            f"vision_feature_select_strategy 'default' drops token 0, the CLS token of CLIP-style encoders; "
            f"the encoder in {checkpoint} ({vision.get('model_type', 'unknown type')}) has no CLS token, so it would "
            f"drop a real image patch. Use 'full'."
        )


def docev_preview_transform(
    model_name_or_path: str,
    image_token: str = "<image>",
    image_token_id: int | None = None,
    stop_tokens: Sequence[str] = ("<|im_end|>",),
    tile_size: int = 560,
    patch_size: int = 14,
    max_num_tiles: int = 9,
    min_num_tiles: int = 1,
    vision_feature_select_strategy: str = "full",
    sampling_ratio: Sequence[int] = (2, 3),
    apply_random_sampling_ratio: bool = True,
    max_seq_len: int = 8192,
    chat_template: str = "docev_chatml",
    add_vision_id: bool = False,
    overflow_policy: Sequence[str] = OVERFLOW_STEPS,
    ufx_type: UFXType = "instruction",
    seed: int = 0,
) -> DocEVTransform:
    """The config's ``tokenizer:`` component: tokenizer and ``preprocessor_config.json`` from
    ``model_name_or_path``, ``chat_template`` a bundled name or inline Jinja2."""
    checkpoint = Path(model_name_or_path)
    _check_feature_select(vision_feature_select_strategy, checkpoint)
    if tile_size % patch_size:
        raise ValueError(f"tile_size {tile_size} is not a multiple of patch_size {patch_size}")
    tokenizer = load_tokenizer(checkpoint, image_token)
    transform = DocEVTransform(
        tokenizer,
        resolve_chat_template(chat_template),
        image_token=image_token,
        stop_tokens=stop_tokens,
        tile_size=tile_size,
        patch_size=patch_size,
        max_num_tiles=max_num_tiles,
        min_num_tiles=min_num_tiles,
        sampling_ratio=sampling_ratio,
        apply_random_sampling_ratio=apply_random_sampling_ratio,
        max_seq_len=max_seq_len,
        add_vision_id=add_vision_id,
        overflow_policy=overflow_policy,
        ufx_type=ufx_type,
        pixels=PixelConfig.from_checkpoint(checkpoint),
        seed=seed,
    )
    if image_token_id is not None and transform.image_token_id != image_token_id:
        raise ValueError(
            f"image_token_id {image_token_id} disagrees with the tokenizer in {checkpoint}, "
            f"where {image_token!r} is {transform.image_token_id}"
        )
    return transform


def transform_from_config(cfg: Any) -> DocEVTransform:
    """The transform of a loaded :class:`~docev.config.DocEVConfig`: ``tokenizer._component_`` called with the
    section's arguments (the config loader already checked that it imports and takes them)."""
    section = cfg.tokenizer
    transform = resolve_component(section.component)(**section.arguments())
    if not isinstance(transform, DocEVTransform):
        raise TypeError(f"tokenizer._component_: {section.component} returned {type(transform).__name__}, "
                        "not a DocEVTransform")  # fmt: skip
    return transform


TokenCounter = Callable[..., dict[int, int]]


def build_token_counter(cfg: Any) -> TokenCounter:
    """``count(record, image_sizes, new_system_prompt=None) -> {ratio: tokens}`` for the validator:
    no pixels, sizes as (height, width) from image headers."""
    transform = transform_from_config(cfg)

    def count(
        record: UFXRecord, image_sizes: Sequence[tuple[int, int]], new_system_prompt: str | None = None
    ) -> dict[int, int]:
        return transform.count_record(record, image_sizes, new_system_prompt=new_system_prompt).per_ratio

    return count
