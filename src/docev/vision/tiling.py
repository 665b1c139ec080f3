"""Anyres pixels: an image becomes a base tile plus a padded canvas cut into tiles (LLaVA-NeXT).

The arithmetic (which canvas, which resized size) lives in :mod:`docev.vision.geometry`; this
module only moves pixels, and keeps them uint8 until :func:`normalize`: uint8 is 4× smaller
than float32 in shards, in the loader's queues and on the host-to-device copy, and
normalisation is one fused multiply-add that belongs in the collate or on the device. torch is imported
where a tensor is made, not with the module: the data steps tile (and store) images without it.
The reference is transformers' ``LlavaNextImageProcessorPil``: the canvas is the image resized
with the same PIL filter and padded with zeros, split evenly (the odd pixel goes after); the
base tile is the whole image resized to tile × tile (aspect not kept).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from docev.vision.geometry import TilePlan, plan_tiles

if TYPE_CHECKING:
    import torch

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PixelConfig:
    """Normalisation and resampling of a checkpoint (``preprocessor_config.json``)."""

    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD
    resample: Image.Resampling = Image.Resampling.BICUBIC

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> PixelConfig:
        """Read ``preprocessor_config.json`` in ``path``; SigLIP 0.5/0.5 and bicubic when absent."""
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            return cls()
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
        mean, std = tuple(data.get("image_mean", SIGLIP_MEAN)), tuple(data.get("image_std", SIGLIP_STD))
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ValueError(f"{file}: image_mean/image_std need 3 values each, std > 0 (got {mean}, {std})")
        try:
            resample = Image.Resampling(int(data.get("resample", Image.Resampling.BICUBIC)))
        except ValueError as exc:
            raise ValueError(f"{file}: resample {data.get('resample')!r} is not a PIL filter id (0..5)") from exc
        return cls(mean=mean, std=std, resample=resample)  # type: ignore[arg-type]


@dataclass
class TiledImage:
    """One image ready for the vision tower, still uint8: ``base`` (the whole image at tile × tile) and
    ``resized`` (the image aspect-resized for the plan's canvas). The canvas is ``resized`` centred on
    zeros, so storing ``resized`` + ``plan`` is enough; :attr:`canvas` builds it when wanted."""

    plan: TilePlan
    base: Image.Image
    resized: Image.Image

    @property
    def offset(self) -> tuple[int, int]:
        """(top, left) of ``resized`` in the canvas: centred, the odd pixel of padding after."""
        (ch, cw), (rh, rw) = self.plan.canvas, self.plan.resized
        return (ch - rh) // 2, (cw - rw) // 2

    @property
    def canvas(self) -> Image.Image:
        """The padded canvas (transformers pads with zeros, i.e. black)."""
        if self.plan.resized == self.plan.canvas:
            return self.resized
        ch, cw = self.plan.canvas
        canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
        top, left = self.offset
        canvas.paste(self.resized, (left, top))
        return canvas

    def pixels(self, tile_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [1 + rows·cols, 3, T, T]: the base tile, then the grid tiles row-major (written into
        ``out`` when given, e.g. the image's slot of a batch buffer).

        Written plane by plane (PIL splits bands in C) into one buffer: a channel-last → channel-first
        transpose of uint8 through torch/numpy strided copies costs more than the resize itself."""
        (rows, cols), (ch, cw), (rh, rw) = self.plan.grid, self.plan.canvas, self.plan.resized
        if (ch, cw) != (rows * tile_size, cols * tile_size) or self.base.size != (tile_size, tile_size):
            raise ValueError(f"plan {self.plan} was made for another tile size than {tile_size}")
        top, left = self.offset
        canvas = np.zeros((3, ch, cw), dtype=np.uint8)
        for c, band in enumerate(self.resized.split()):
            canvas[c, top : top + rh, left : left + rw] = np.asarray(band)
        if out is None:
            import torch

            out = torch.empty((1 + rows * cols, 3, tile_size, tile_size), dtype=torch.uint8)
        buf = out.numpy()
        buf[0] = _planes(self.base)
        grid = canvas.reshape(3, rows, tile_size, cols, tile_size).transpose(1, 3, 0, 2, 4)
        buf[1:].reshape(rows, cols, 3, tile_size, tile_size)[...] = grid
        return out


def tile_image(
    image: Image.Image,
    *,
    tile_size: int,
    min_num_tiles: int = 1,
    max_num_tiles: int = 9,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> TiledImage:
    """image → (base uint8, resized/canvas uint8, plan): the one step the preprocessor stores."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image (see docev.vision.image_io.load_image), got mode {image.mode!r}")
    w, h = image.size
    plan = plan_tiles(h, w, tile_size, min_num_tiles, max_num_tiles)
    rh, rw = plan.resized
    resized = image if (rh, rw) == (h, w) else image.resize((rw, rh), resample)
    base = image if (h, w) == (tile_size, tile_size) else image.resize((tile_size, tile_size), resample)
    return TiledImage(plan=plan, base=base, resized=resized)


def _planes(image: Image.Image) -> np.ndarray:
    return np.stack([np.asarray(band) for band in image.split()])


def to_chw(image: Image.Image) -> torch.Tensor:
    """uint8 [3, H, W] copy of an RGB image's pixels."""
    import torch

    return torch.from_numpy(_planes(image))


def cut_tiles(canvas: torch.Tensor, tile_size: int) -> torch.Tensor:
    """[3, rows·T, cols·T] → [rows·cols, 3, T, T], row-major (any dtype; one copy)."""
    c, h, w = canvas.shape
    if h % tile_size or w % tile_size:
        raise ValueError(f"canvas {h}x{w} is not a multiple of the tile size {tile_size}")
    rows, cols = h // tile_size, w // tile_size
    tiles = canvas.reshape(c, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, c, tile_size, tile_size)


@functools.cache
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The constants on ``device``, made once: ``torch.tensor(..., device=cuda)`` per call is a blocking copy
    from pageable host memory every micro-batch."""
    import torch

    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(3, 1, 1) for v in (mean, std))


def normalize(
    pixels: torch.Tensor,
    mean: tuple[float, ...] = SIGLIP_MEAN,
    std: tuple[float, ...] = SIGLIP_STD,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """uint8 [..., 3, H, W] → ``(x / 255 - mean) / std`` in ``dtype`` (float32 when None; computed in float32)."""
    import torch

    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {pixels.dtype}")
    mean_t, std_t = _mean_std(tuple(mean), tuple(std), pixels.device)
    x = pixels.to(torch.float32)  # the same arithmetic as before, in place: one float buffer, not four
    return x.div_(255.0).sub_(mean_t).div_(std_t).to(dtype or torch.float32)
