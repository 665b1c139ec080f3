"""UFX records → :class:`Message` lists (torchtune's message shape).

The shape checks live in :func:`docev.ufx.parse_record` (one place, shared with the validator,
raising :class:`~docev.ufx.UFXError` with a reason code); this module only maps a valid record
onto messages: placeholder n ↔ ``image_files[n]``, non-assistant turns ``masked``, an optional
``new_system_prompt`` replacing the record's system messages (torchtune's convention). Image
parts carry the image's path (resolved against the source root) so nothing is decoded here;
:func:`message_dicts` gives the transformers-style dicts a chat template renders.

:class:`Message` has the attributes of torchtune's ``Message`` that the transform reads (``role``,
``content`` parts, ``masked``, ``text_content``), and torchtune's own messages are accepted wherever
these are: the data steps (validate, preprocess) build messages for every record, and importing
``torchtune`` pulls in torchao and ``torch._dynamo`` (seconds per task and per pool worker) for one
small class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from docev.ufx import IMAGE_PLACEHOLDER, UFXRecord, parse_record

UFXType = Literal["instruction", "pretrain"]


class Message:
    """One turn: ``role``, ``content`` as parts (``{"type": "text" | "image", "content": …}``; a string
    becomes one text part) and ``masked`` (no loss on its tokens), as torchtune's ``Message``."""

    __slots__ = ("role", "content", "masked")

    def __init__(self, role: str, content: str | list[dict[str, Any]], masked: bool = False):
        self.role = role
        self.content = [{"type": "text", "content": content}] if isinstance(content, str) else content
        self.masked = masked

    @property
    def text_content(self) -> str:
        """The text parts joined (images left out)."""
        return "".join(p["content"] for p in self.content if p["type"] == "text")

    def __repr__(self) -> str:
        return f"Message(role={self.role!r}, content={self.content!r}, masked={self.masked})"


def _split_placeholders(text: str, images: list[Any]) -> list[dict[str, Any]]:
    """Text with ``<image>`` placeholders → torchtune parts, taking images from ``images`` in order."""
    parts: list[dict[str, Any]] = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            parts.append({"type": "image", "content": images.pop(0)})
        if piece:
            parts.append({"type": "text", "content": piece})
    return parts


def ufx_to_messages(
    record: UFXRecord | Mapping[str, Any],
    *,
    ufx_type: UFXType = "instruction",
    image_root: str | Path | None = None,
    new_system_prompt: str | None = None,
) -> list[Message]:
    """One record → messages. A raw mapping is checked with :func:`~docev.ufx.parse_record` first
    (raises :class:`~docev.ufx.UFXError`). Image part content is ``image_root / image_files[n]``
    (absolute paths stay as they are). A pretraining ``text`` record becomes one unmasked assistant
    message: every token of it carries loss."""
    if not isinstance(record, UFXRecord):
        record = parse_record(record, ufx_type)
    root = Path(image_root) if image_root is not None else None
    images: list[Any] = [root / f if root is not None else Path(f) for f in record.image_files]
    if record.text is not None:
        return [Message(role="assistant", content=_split_placeholders(record.text, images), masked=False)]
    messages = []
    if new_system_prompt is not None:
        messages.append(Message(role="system", content=new_system_prompt, masked=True))
    for m in record.context or []:
        if m.role == "system" and new_system_prompt is not None:
            continue
        if isinstance(m.content, str):
            parts = _split_placeholders(m.content, images)
        else:
            parts = []
            for p in m.content:
                if p.type == "image":
                    parts.append({"type": "image", "content": images.pop(0)})
                else:
                    parts += _split_placeholders(p.text or "", images)
        messages.append(Message(role=m.role, content=parts, masked=m.role != "assistant"))
    return messages


def message_images(messages: Sequence[Message]) -> list[Any]:
    """Image contents (paths or PIL images) in order of appearance."""
    return [part["content"] for m in messages for part in m.content if part["type"] == "image"]


def message_dicts(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """transformers-style dicts for a chat template: ``{"role", "content": [{"type": "image"} |
    {"type": "text", "text": …}]}`` (images become bare ``{"type": "image"}`` parts)."""
    return [
        {
            "role": m.role,
            "content": [
                {"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["content"]} for p in m.content
            ],  # fmt: skip
        }
        for m in messages
    ]
