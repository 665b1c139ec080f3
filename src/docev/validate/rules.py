"""Validation rules: one record in, accepted (with what training needs to know) or a reject with a reason.

Reason codes are stable (they are written to ``rejects.jsonl`` and counted in reports): the record
shape codes come from :mod:`docev.ufx`; the codes below are about bytes, files and lengths.
Images are checked the way training will read them: header first (size limits are enforced before
any pixel is decoded, so decompression bombs cost nothing), then a full decode through the same
normalisation the transform applies.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from docev import ufx
from docev.storage import PathEscape
from docev.vision.image_io import is_transposed, load_image

FILE_REASONS = {
    "invalid_json": "the line is not valid JSON",
    "invalid_utf8": "the line is not valid UTF-8",
    "invalid_text": "a string contains NUL or an unpaired surrogate",
    "line_too_long": "the line is longer than validate.max_line_bytes (skipped, not read whole)",
    "too_deep": "the JSON nests deeper than a record can (32 levels)",
    "duplicate_id": "the id was already accepted earlier in this source",
    "image_missing": "an image file does not exist",
    "image_unreadable": "an image path cannot be read: a symlink loop, permission denied, a name too long",
    "path_escape": "an image path leaves the source root / allowed roots",
    "image_undecodable": "an image file is empty, truncated, corrupt or not an image",
    "image_too_small": "an image side is below validate.min_image_size",
    "image_too_large": "an image has more pixels than validate.max_image_pixels (not decoded)",
    "too_long": "longer than max_seq_len even at the most aggressive sampling ratio",
}
REASONS = {**{code: "record shape (docev.ufx)" for code in ufx.REASONS}, **FILE_REASONS}


class Reject(Exception):
    """Why a record is rejected; ``field`` is the dotted path it is about (None: the whole line, unparsed)."""

    def __init__(self, reason: str, detail: str, field: str | None = None):
        assert reason in REASONS, reason
        self.reason, self.detail, self.field = reason, detail, field
        super().__init__(f"{reason}: {detail}")


@dataclass
class ImageInfo:
    path: str
    size: tuple[int, int]  # (height, width) as training sees it (EXIF orientation applied)
    mode: str  # the file's own mode before normalisation (RGB, L, P, CMYK, I;16, LA, RGBA, ...)
    rotated: bool
    nbytes: int


@dataclass
class Accepted:
    record: ufx.UFXRecord
    images: list[ImageInfo] = field(default_factory=list)
    tokens: dict[int, int] = field(default_factory=dict)  # sampling ratio -> sequence length


@dataclass
class Limits:
    min_image_size: int
    max_image_pixels: int
    max_seq_len: int


def check_text(value: Any, path: str = "") -> None:
    """NUL bytes and unpaired surrogates in any string of the record are rejected with their field."""
    if isinstance(value, str):
        if "\x00" in value:
            raise Reject("invalid_text", "contains a NUL character", path or None)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Reject("invalid_text", f"not valid UTF-8 at character {exc.start}", path or None) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_text(v, f"{path}.{i}" if path else str(i))


# name in image_files → (where it was read, its bytes or why they could not be read); raises PathEscape
ImageFetch = Callable[[str], tuple[str, "bytes | BaseException"]]


def inspect_image(where: str, data: bytes | BaseException, limits: Limits, field_name: str) -> ImageInfo:
    """Check one image's bytes (``data`` is the read error when there are none): header first, then a decode."""
    if isinstance(data, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        raise Reject("image_missing", f"{where} does not exist", field_name)
    if isinstance(data, BaseException):  # a permanent read error (transient ones were retried or failed the task)
        raise Reject("image_unreadable", f"{where}: {data.strerror or data}" if isinstance(data, OSError)
                     else f"{where}: {data}", field_name)  # fmt: skip
    if len(data) == 0:
        raise Reject("image_undecodable", f"{where} is 0 bytes", field_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # parses the header only
                w, h = im.size
                mode = im.mode
                if w * h > limits.max_image_pixels:  # before anything past the header is read (EXIF may be)
                    raise Reject("image_too_large", f"{where}: {w}×{h} px = {w * h} pixels > "
                                 f"{limits.max_image_pixels}", field_name)  # fmt: skip
                rotated = is_transposed(im)  # the same reading of EXIF as the decoder's
    except Image.DecompressionBombError as exc:
        raise Reject("image_too_large", f"{where}: {_detail(exc)}", field_name) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise Reject("image_undecodable", f"{where}: {_detail(exc)}", field_name) from None
    if rotated:
        w, h = h, w
    if min(w, h) < limits.min_image_size:
        raise Reject("image_too_small", f"{where}: {w}×{h} px, a side below {limits.min_image_size} px", field_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            decoded = load_image(io.BytesIO(data), name=where)  # the same decode + normalisation as training
    except Image.DecompressionBombError as exc:
        raise Reject("image_too_large", f"{where}: {_detail(exc)}", field_name) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise Reject("image_undecodable", f"{where}: {_detail(exc)}", field_name) from None
    if (decoded.height, decoded.width) != (h, w):
        raise Reject("image_undecodable", f"{where}: decoded {decoded.width}×{decoded.height} px, the header says "
                     f"{w}×{h} px", field_name)  # fmt: skip
    return ImageInfo(where, (h, w), mode, rotated, len(data))


def _detail(exc: BaseException) -> str:
    """The decoder's message in words, without the in-memory buffer's repr (stable across runs and workers)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL can read (unknown header)"
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))


def _column(ufx_type: str) -> str:
    return "text" if ufx_type == "pretrain" else "context"


TokenCounter = Callable[[ufx.UFXRecord, list[tuple[int, int]]], dict[int, int]]


def check_record(
    data: dict[str, Any], fetch: ImageFetch, ufx_type: str, limits: Limits, count_tokens: TokenCounter
) -> Accepted:
    """All rules for one parsed record, cheapest first. Raises :class:`Reject`."""
    check_text(data)
    try:
        record = ufx.parse_record(data, ufx_type)  # type: ignore[arg-type]
    except ufx.UFXError as exc:  # a record-level shape error names the field it is about
        field_name = exc.field or ("image_files" if exc.reason == "placeholder_mismatch" else _column(ufx_type))
        raise Reject(exc.reason, exc.detail, field_name) from None
    images = []
    for i, name in enumerate(record.image_files):
        try:
            where, blob = fetch(name)
        except PathEscape as exc:
            raise Reject("path_escape", str(exc), f"image_files.{i}") from None
        images.append(inspect_image(where, blob, limits, f"image_files.{i}"))
    tokens = count_tokens(record, [im.size for im in images])
    shortest = min(tokens.values())
    if shortest > limits.max_seq_len:
        ratio = min(tokens, key=tokens.__getitem__)
        raise Reject("too_long", f"{shortest} tokens at sampling ratio {ratio} > max_seq_len {limits.max_seq_len}",
                     _column(ufx_type))  # fmt: skip
    return Accepted(record, images, tokens)
