"""A corrupt UFX corpus built in code: one record per reject reason, plus good records in every image mode."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

USER_Q = "<image>\nWhat is the total?"
LINE_LIMIT = 65536  # the corpus' validate.max_line_bytes: one line is longer


def _conv(content: str = USER_Q, answer: str = "$1.00") -> list[dict]:
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


def _png_bytes(size=(64, 48), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 200 if mode in ("L", "P") else (200, 100, 50)).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge canvas, with a tiny body: decoding it would be the attack."""
    png = bytearray(_png_bytes((8, 8), "L"))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(png)


def _good_images(img: Path) -> dict[str, str]:
    """One accepted image per mode that must be normalised, not rejected."""
    files = {}
    Image.new("CMYK", (80, 60), (0, 50, 100, 0)).save(img / "cmyk.jpg", "JPEG")
    files["CMYK"] = "images/cmyk.jpg"
    Image.new("P", (80, 60), 3).save(img / "palette.png")
    files["P"] = "images/palette.png"
    Image.fromarray(np.full((60, 80), 40000, dtype=np.uint16)).save(img / "gray16.png")
    files["I;16"] = "images/gray16.png"
    Image.new("LA", (80, 60), (120, 128)).save(img / "la.png")
    files["LA"] = "images/la.png"
    Image.new("RGBA", (80, 60), (10, 20, 30, 0)).save(img / "rgba.png")
    files["RGBA"] = "images/rgba.png"
    rotated = Image.new("RGB", (90, 40), (90, 90, 90))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    rotated.save(img / "rotated.jpg", "JPEG", exif=exif)
    files["exif_rotated"] = "images/rotated.jpg"
    (img / "ok.png").write_bytes(_png_bytes())
    files["RGB"] = "images/ok.png"
    return files


def build(root: Path, outside: Path) -> dict[str, str]:
    """Write ``root/data.jsonl`` + images. Returns {record id or line tag: expected reason or 'accepted'}."""
    img = root / "images"
    img.mkdir(parents=True)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(_png_bytes())
    good = _good_images(img)
    (img / "empty.png").write_bytes(b"")
    (img / "truncated.png").write_bytes(_png_bytes((300, 300))[:120])
    (img / "notimage.png").write_bytes(b"this is not an image at all")
    (img / "tiny.png").write_bytes(_png_bytes((10, 10)))
    (img / "bomb.png").write_bytes(_bomb_png(60000, 60000))
    (img / "wide.png").write_bytes(_bomb_png(3000, 2000))  # over the corpus' max_image_pixels, under PIL's limit
    os.symlink(outside / "secret.png", img / "link.png")
    os.symlink(img / "loop-b.png", img / "loop-a.png")  # a symlink loop: a -> b -> a
    os.symlink(img / "loop-a.png", img / "loop-b.png")

    expected: dict[str, str] = {}
    lines: list[bytes] = []

    def add(rid: str, record: dict | None, reason: str, raw: bytes | None = None) -> None:
        expected[rid] = reason
        lines.append(raw if raw is not None else json.dumps(record).encode())

    for mode, rel in good.items():
        add(f"good-{mode}", {"id": f"good-{mode}", "context": _conv(), "image_files": [rel]}, "accepted")
    add("good-parts", {"id": "good-parts", "image_files": [good["RGB"]], "context": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Total?"}]},
        {"role": "assistant", "content": "$2"}]}, "accepted")  # fmt: skip
    add("line:invalid_json", None, "invalid_json", b'{"id": "broken", "context": [')
    add("line:invalid_utf8", None, "invalid_utf8", b'{"id": "latin1", "context": "caf\xe9"}')
    add("line:not_object", None, "wrong_type", b"[1, 2, 3]")
    add("line:deep_arrays", None, "too_deep", b"[" * 20_000 + b"]" * 20_000)
    deep_meta = b'{"id": "deep-meta", "context": [], "meta": ' + b'{"m": ' * 2000 + b"1" + b"}" * 2000 + b"}"
    add("line:deep_meta", None, "too_deep", deep_meta)
    huge = json.dumps({"id": "huge", "context": _conv(answer="x" * (LINE_LIMIT + 10)), "image_files": []})
    add("line:huge", None, "line_too_long", huge.encode())
    add("wrong-type", {"id": "wrong-type", "context": [{"role": "user", "content": 7}]}, "wrong_type")
    add("missing", {"id": "missing", "image_files": []}, "missing_field")
    add("role", {"id": "role", "context": [{"role": "robot", "content": "hi"}]}, "unknown_role")
    add("part", {"id": "part", "context": [{"role": "user", "content": [{"type": "video"}]}]}, "bad_part")
    add("empty", {"id": "empty", "context": []}, "empty_conversation")
    add("no-answer", {"id": "no-answer", "context": [{"role": "user", "content": "hi"}]}, "no_assistant_turn")
    add("mismatch", {"id": "mismatch", "context": _conv(), "image_files": []}, "placeholder_mismatch")
    add("nul", {"id": "nul", "context": _conv(answer="a\u0000b"), "image_files": [good["RGB"]]}, "invalid_text")
    add("img-missing", {"id": "img-missing", "context": _conv(), "image_files": ["images/nope.png"]}, "image_missing")
    add("escape-rel", {"id": "escape-rel", "context": _conv(), "image_files": ["../outside/secret.png"]},
        "path_escape")  # fmt: skip
    add("escape-abs", {"id": "escape-abs", "context": _conv(), "image_files": [str(outside / "secret.png")]},
        "path_escape")  # fmt: skip
    add("escape-link", {"id": "escape-link", "context": _conv(), "image_files": ["images/link.png"]}, "path_escape")
    add("loop", {"id": "loop", "context": _conv(), "image_files": ["images/loop-a.png"]}, "image_unreadable")
    for name in ("empty", "truncated", "notimage"):
        add(f"bad-{name}", {"id": f"bad-{name}", "context": _conv(), "image_files": [f"images/{name}.png"]},
            "image_undecodable")  # fmt: skip
    add("small", {"id": "small", "context": _conv(), "image_files": ["images/tiny.png"]}, "image_too_small")
    add("two-pages", {"id": "two-pages", "context": _conv("<image><image>\nTotal?"),
                      "image_files": [good["RGB"], "images/tiny.png"]}, "image_too_small")  # fmt: skip
    add("bomb", {"id": "bomb", "context": _conv(), "image_files": ["images/bomb.png"]}, "image_too_large")
    add("wide", {"id": "wide", "context": _conv(), "image_files": ["images/wide.png"]}, "image_too_large")
    long_answer = " ".join(f"word{i}" for i in range(3000))
    add("long", {"id": "long", "context": _conv(answer=long_answer), "image_files": [good["RGB"]]}, "too_long")
    # the second record with an id already accepted is the duplicate
    add("dup:first", {"id": "dup", "context": _conv(), "image_files": [good["RGB"]]}, "accepted")
    add("dup:second", {"id": "dup", "context": _conv(answer="$9"), "image_files": [good["RGB"]]}, "duplicate_id")
    (root / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return expected
