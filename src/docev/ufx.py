"""The UFX record model (DESIGN §5).

A record holds a conversation (``context``) or, for pretraining sources, a ``text`` stream;
``<image>`` placeholders (or ``{"type": "image"}`` parts) map in order to ``image_files``.
This module states the shape only; file checks live in the validator.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

IMAGE_PLACEHOLDER = "<image>"


class Part(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image", "text"]
    text: str | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> Part:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]

    def image_count(self) -> int:
        if isinstance(self.content, str):
            return self.content.count(IMAGE_PLACEHOLDER)
        return sum(1 if p.type == "image" else (p.text or "").count(IMAGE_PLACEHOLDER) for p in self.content)


class UFXRecord(BaseModel):
    """One record. ``context`` for instruction sources, ``text`` for pretraining sources."""

    model_config = ConfigDict(extra="forbid")
    id: str
    name: str | None = None
    context: list[Message] | None = None
    text: str | None = None
    image_files: list[str] = []
    meta: str | None = None

    @model_validator(mode="after")
    def _placeholders_match_images(self) -> UFXRecord:
        if (self.context is None) == (self.text is None):
            raise ValueError("a record has exactly one of 'context' (instruction) or 'text' (pretraining)")
        n = self.placeholder_count()
        if n != len(self.image_files):
            raise ValueError(f"{n} image placeholders but {len(self.image_files)} image_files")
        return self

    def placeholder_count(self) -> int:
        if self.text is not None:
            return self.text.count(IMAGE_PLACEHOLDER)
        return sum(m.image_count() for m in self.context or [])
