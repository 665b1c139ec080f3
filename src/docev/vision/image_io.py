"""Image decoding with mode and orientation normalised, so every later step sees 8-bit RGB.

Documents arrive as scans and exports in every PIL mode: CMYK JPEGs, palette PNGs with a
transparent index, 16-bit greyscale TIFF/PNG, RGBA screenshots. A model trained on RGB must
see them the way a person does: transparency composited on white (a transparent page
background is paper, not black), 16-bit values scaled (PIL's ``convert("L")`` clips them to
white), and the EXIF orientation applied (phone scans are often stored sideways). Sizes read
from headers (:func:`read_image_size`) apply the same orientation, so token counts made from
headers agree with the decoded pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
# EXIF orientations 5..8 rotate by 90°: the displayed height is the stored width.
_TRANSPOSED = frozenset({5, 6, 7, 8})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_DIRECT_MODES = frozenset({"L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"})


class ImageLoadError(ValueError):
    """An image that cannot be decoded; names the file and the cause."""

    def __init__(self, path: str | Path, detail: str):
        self.path, self.detail = str(path), detail
        super().__init__(f"{path}: {detail}")


def _orientation(image: Image.Image) -> int:
    if image.format == "PNG" and "exif" not in image.info and not _png_has_exif_chunk(image):
        return 1  # PIL would decode the whole PNG to look for an eXIf chunk after the pixels
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except (ValueError, TypeError, SyntaxError):  # malformed EXIF blocks: treat as upright
        return 1


def _png_has_exif_chunk(image: Image.Image) -> bool:
    """Whether the PNG's bytes hold an ``eXIf`` chunk anywhere (a match inside compressed data only costs the
    decode that PIL would have done anyway); True when the bytes cannot be read again."""
    fp = getattr(image, "fp", None)
    if fp is None:
        return True
    try:
        pos = fp.tell()
        fp.seek(0)
        data = fp.read()
        fp.seek(pos)
    except (OSError, ValueError):
        return True
    return b"eXIf" in data


def is_transposed(image: Image.Image) -> bool:
    """True when the EXIF orientation rotates by 90°: the upright height is the stored width."""
    return _orientation(image) in _TRANSPOSED


def read_image_size(path: str | Path | IO[bytes], name: str | None = None) -> tuple[int, int]:
    """(height, width) as :func:`load_image` will return it, from the header only (no pixel decode); ``name``
    says where a file object's bytes came from."""
    try:
        with Image.open(path) as image:
            w, h = image.size
            return (w, h) if is_transposed(image) else (h, w)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(name if name is not None else path, f"cannot read image header ({exc})") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: alpha composited on white, 16/32-bit and float greyscale scaled to 0..255."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        return to_rgb(image)
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _DIRECT_MODES:
        return image.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples (PNG/TIFF open as I;16* or I): scale 0..65535 to 0..255, not clip.
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        # float images: 0..1 when the data stays there (scientific exports), else already 0..255.
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    raise ValueError(f"unsupported image mode {mode!r}")


def load_image(path: str | Path | IO[bytes], name: str | None = None) -> Image.Image:
    """Decode ``path`` (or a binary file object, e.g. bytes read from an object store, then ``name`` says
    where they came from) to an upright 8-bit RGB PIL image. Raises :class:`ImageLoadError` naming the file."""
    where = name if name is not None else path
    try:
        image = Image.open(path)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(where, f"cannot open image ({exc})") from exc
    try:
        image.load()  # single-frame formats close their file here
        out = image if _orientation(image) == 1 else ImageOps.exif_transpose(image)
        out = to_rgb(out)
        if out is image and getattr(image, "fp", None) is not None:
            out = image.copy()  # multi-frame files (TIFF, GIF) keep the file open: detach the first frame
        return out
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(where, f"cannot decode image ({exc})") from exc
    finally:
        if getattr(image, "fp", None) is not None:
            image.fp.close()
