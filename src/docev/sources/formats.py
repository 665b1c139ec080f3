"""Other tools' dataset formats mapped into UFX records at read time (``datasets[].formatting``).

People arrive with data in the shapes their other tools read; LLaMA-Factory and ms-swift read these
directly, so we do too instead of asking for converters. Each row of a source (jsonl line, ``.json``
array element, parquet or ``save_to_disk`` row) becomes one UFX instruction record:

- ``llava``: ``{"id", "image": "p.png" | "images": [...], "conversations": [{"from": "human"|"gpt"|"system",
  "value": "<image>\\n…"}]}``;
- ``sharegpt``: ``{"conversations" | "messages": [{"from", "value"} | {"role", "content"}], "system"?,
  "images"?}`` (roles human/user, gpt/assistant, system; a top-level ``system`` becomes the first turn);
- ``messages`` (Hugging Face / TRL / ms-swift): ``{"messages": [{"role", "content": str | [{"type": "image"} |
  {"type": "text", "text"}]}], "images": [path | {"bytes", "path"}]}``;
- ``qa`` (DocVQA-style evaluation sets): ``{"questionId" | "question_id" | "id", "question", "answers": [...],
  "image": path | {"bytes", "path"} | "images": [...], "question_types"?}`` → one question, the first answer
  as the assistant turn and every answer accepted (``meta.answers``).

An image given as bytes (the ``datasets`` ``Image`` feature: ``{"bytes", "path"}``) is written once to
``embedded_images_dir`` under its sha256 and named by that absolute path, so validation, preprocessing,
reports and evaluation read it like any file (the folder is an allowed root of its source). A row
without an id is named by its position (``file:row``), stable across reruns and appended rows.

A row that breaks its format raises :class:`FormatError` naming the original field
(``conversations.1.from``); :attr:`Mapped.fields` translates the UFX fields that later checks name
(``context.1.role``, ``image_files.0``) back into the original ones (:func:`original_field`).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docev.run.publish import write_bytes

FORMATS = ("ufx", "llava", "sharegpt", "messages", "qa")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_ID_KEYS = {"qa": ("questionId", "question_id", "id")}
_IMAGE_EXT = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"GIF8": ".gif", b"RIFF": ".webp", b"II*\x00": ".tif",
              b"MM\x00*": ".tif", b"BM": ".bmp"}  # fmt: skip


class FormatError(Exception):
    """A row that does not fit its source's ``formatting``; ``field`` is the row's own (original) field."""

    def __init__(self, reason: str, detail: str, field: str | None):
        self.reason, self.detail, self.field = reason, detail, field
        super().__init__(f"{field}: {reason}: {detail}")


@dataclass
class Mapped:
    record: dict[str, Any]  # the UFX record
    fields: dict[str, str] = field(default_factory=dict)  # UFX field prefix → the original field


def original_field(fields: Mapping[str, str] | None, name: str | None) -> str | None:
    """The original field of a UFX field ``name`` (longest matching prefix; the rest kept), else ``name``."""
    if not fields or name is None:
        return name
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        head = ".".join(parts[:k])
        if head in fields:
            return ".".join([fields[head], *parts[k:]])
    return name


def json_safe(value: Any) -> Any:
    """``value`` with bytes shown by their size (a reject's original record is written as JSON)."""
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def json_rows(data: bytes) -> list[Any]:
    """The records of a ``.json`` file: a JSON array, or an object whose ``data`` is one (DocVQA's files).

    Raises:
        ValueError: not JSON, or neither shape.
    """
    value = json.loads(data)
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        return value["data"]
    if not isinstance(value, list):
        raise ValueError(f"a .json source file is an array of records or {{'data': [...]}}, got {type(value).__name__}")
    return value


def to_ufx(row: Mapping[str, Any], formatting: str, *, where: str, image_dir: str | Path | None) -> Mapped:
    """One row of a ``formatting`` source as a UFX instruction record. ``where`` (``file:row``) names a row
    without an id; ``image_dir`` receives embedded image bytes. Raises :class:`FormatError`."""
    row = {k: v for k, v in row.items() if v is not None}  # Arrow fills absent columns with None
    if formatting == "qa":
        return _qa(row, where, image_dir)
    if formatting == "messages":
        turns_key = "messages"
    elif formatting == "llava":
        turns_key = "conversations"
    elif formatting == "sharegpt":
        turns_key = "conversations" if "conversations" in row or "messages" not in row else "messages"
    else:
        raise ValueError(f"formatting {formatting!r}: expected one of {FORMATS}")
    images, image_key = _images(row, ("image", "images") if formatting == "llava" else ("images",), image_dir)
    fields = {"id": _id_key(row, formatting), **_image_fields(row, image_key)}
    turns = row.get(turns_key)
    if turns is None:
        raise FormatError("missing_field", f"a {formatting} record needs '{turns_key}'", turns_key)
    if not isinstance(turns, list):
        raise FormatError("wrong_type", f"'{turns_key}' is a list of turns, got {type(turns).__name__}", turns_key)
    context: list[dict[str, Any]] = []
    system = row.get("system") if formatting == "sharegpt" else None
    if system is not None:
        if not isinstance(system, str):
            raise FormatError("wrong_type", f"'system' is a string, got {type(system).__name__}", "system")
        fields["context.0"] = "system"
        context.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        at = f"{turns_key}.{i}"
        fields[f"context.{len(context)}"] = at
        context.append(_turn(turn, at, formatting, fields, len(context)))
    fields["context"] = turns_key
    record: dict[str, Any] = {"id": _record_id(row, formatting, where), "context": context, "image_files": images}
    _check_placeholders(record, image_key)
    return Mapped(record, fields)


def _turn(turn: Any, at: str, formatting: str, fields: dict[str, str], index: int) -> dict[str, Any]:
    if not isinstance(turn, Mapping):
        raise FormatError("wrong_type", f"a turn is an object, got {type(turn).__name__}", at)
    role_key, content_key = ("from", "value") if "from" in turn or formatting == "llava" else ("role", "content")
    if formatting == "messages":
        role_key, content_key = "role", "content"
    for key in (role_key, content_key):
        if key not in turn or turn[key] is None:
            raise FormatError("missing_field", f"a {formatting} turn needs '{key}'", f"{at}.{key}")
    role = turn[role_key]
    if role not in ROLES:
        raise FormatError("unknown_role", f"role {role!r}: expected one of {sorted(ROLES)}", f"{at}.{role_key}")
    fields[f"context.{index}.role"] = f"{at}.{role_key}"
    fields[f"context.{index}.content"] = f"{at}.{content_key}"
    content = turn[content_key]
    if isinstance(content, str):
        return {"role": ROLES[role], "content": content}
    if formatting != "messages" or not isinstance(content, list):
        raise FormatError("wrong_type", f"'{content_key}' is a string, got {type(content).__name__}",
                          f"{at}.{content_key}")  # fmt: skip
    parts = []
    for j, part in enumerate(content):
        where = f"{at}.{content_key}.{j}"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise FormatError("bad_part", "a part is {'type': 'image'} or {'type': 'text', 'text': str}", where)
    return {"role": ROLES[role], "content": parts}


def _qa(row: dict[str, Any], where: str, image_dir: str | Path | None) -> Mapped:
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        reason = "missing_field" if question is None else "wrong_type"
        raise FormatError(reason, "a qa record needs 'question', a non-empty string", "question")
    key = "answers" if "answers" in row else "answer"
    answers = row.get(key)
    answers = [answers] if isinstance(answers, str) else answers
    if answers is None:
        raise FormatError("missing_field", "a qa record needs 'answers' (accepted answers) or 'answer'", "answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise FormatError("wrong_type", "'answers' is a non-empty list of non-empty strings", key)
    images, image_key = _images(row, ("image", "images"), image_dir)
    meta: dict[str, Any] = {"answers": [answers]}
    types = row.get("question_types", row.get("question_type"))
    if isinstance(types, list) and types:
        meta["question_type"] = str(types[0])  # DocVQA lists several; the first keeps the breakdown readable
    elif isinstance(types, str):
        meta["question_type"] = types
    prompt = "<image>\n" * len(images) + question.strip()
    context = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answers[0]}]
    record = {"id": _record_id(row, "qa", where), "image_files": images, "meta": json.dumps(meta), "context": context}
    fields = {"id": _id_key(row, "qa"), **_image_fields(row, image_key), "context": "question", "context.0": "question",
              "context.0.content": "question", "context.1": key, "context.1.content": f"{key}.0"}  # fmt: skip
    return Mapped(record, fields)


def _image_fields(row: Mapping[str, Any], key: str) -> dict[str, str]:
    """``image_files`` under its original key; a single ``image`` is that key itself, not ``image.0``."""
    single = key == "image" and not isinstance(row.get(key), list)
    return {"image_files": key, **({"image_files.0": key} if single else {})}


def _id_key(row: Mapping[str, Any], formatting: str) -> str:
    return next((k for k in _ID_KEYS.get(formatting, ("id",)) if k in row), "id")


def _record_id(row: Mapping[str, Any], formatting: str, where: str) -> str:
    key = _id_key(row, formatting)
    value = row.get(key)
    if value is None:
        return where
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise FormatError("wrong_type", f"'{key}' is a string or an integer, got {type(value).__name__}", key)
    return str(value)


def _images(row: Mapping[str, Any], keys: tuple[str, ...], image_dir: str | Path | None) -> tuple[list[str], str]:
    """(image names, the original key): a single ``image`` or a list ``images``; bytes written to ``image_dir``."""
    key = next((k for k in keys if k in row), keys[-1])
    value = row.get(key)
    if value is None:
        return [], key
    many = isinstance(value, list)
    items = value if many else [value]
    if key == "images" and not many:
        raise FormatError("wrong_type", f"'images' is a list, got {type(value).__name__}", key)
    return [_image(item, f"{key}.{i}" if many else key, image_dir) for i, item in enumerate(items)], key


def _image(item: Any, where: str, image_dir: str | Path | None) -> str:
    if isinstance(item, str) and item:
        return item
    if isinstance(item, Mapping):
        data, path = item.get("bytes"), item.get("path")
        if isinstance(data, str):  # JSON cannot hold bytes: base64, as `datasets` writes them to JSON
            try:
                data = base64.b64decode(data, validate=True)
            except ValueError:
                raise FormatError("wrong_type", "'bytes' is not base64", f"{where}.bytes") from None
        if isinstance(data, bytes | bytearray) and data:
            if image_dir is None:
                raise FormatError("wrong_type", "embedded image bytes need embedded_images_dir", f"{where}.bytes")
            return write_embedded(bytes(data), Path(image_dir), path if isinstance(path, str) else None)
        if isinstance(path, str) and path:
            return path
    raise FormatError("wrong_type", "an image is a path or {'bytes', 'path'} with one of them set", where)


def write_embedded(data: bytes, folder: Path, name: str | None) -> str:
    """``folder/<sha256><ext>`` holding ``data`` (written once, atomically: concurrent readers of the same
    row write the same file); the extension from the original name, else from the bytes' signature."""
    ext = Path(name).suffix.lower() if name and Path(name).suffix else ""
    if not ext:
        ext = next((e for sig, e in _IMAGE_EXT.items() if data.startswith(sig)), ".bin")
    target = folder / f"{hashlib.sha256(data).hexdigest()}{ext}"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes(target, data, unique=True)  # other workers may publish the same image at once
    return str(target)


def _check_placeholders(record: dict[str, Any], image_key: str) -> None:
    """The image count against the ``<image>`` placeholders and image parts, named by the original key."""
    n = 0
    for m in record["context"]:
        content = m["content"]
        if isinstance(content, str):
            n += content.count("<image>")
        else:
            n += sum(1 if p["type"] == "image" else p["text"].count("<image>") for p in content)
    if n != len(record["image_files"]):
        raise FormatError("placeholder_mismatch", f"{n} image placeholders but {len(record['image_files'])} images",
                          image_key)  # fmt: skip
