"""The UFX record model (DESIGN §5).

A record holds a conversation (``context``) or, for pretraining sources, a ``text`` stream;
``<image>`` placeholders (or ``{"type": "image"}`` parts) map in order to ``image_files``.
This module states the shape only; file checks live in the validator.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

IMAGE_PLACEHOLDER = "<image>"


class Part(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image", "text"]
    text: str | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> Part:
        if self.type == "text" and self.text is None:
            raise PydanticCustomError("bad_part", "a text part needs 'text'")
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
    meta: str | dict[str, Any] | None = None  # a JSON object, or (older files, parquet strings) one JSON-encoded

    @model_validator(mode="after")
    def _placeholders_match_images(self) -> UFXRecord:
        if (self.context is None) == (self.text is None):
            raise PydanticCustomError(
                "wrong_type", "a record has exactly one of 'context' (instruction) or 'text' (pretraining)"
            )
        n = self.placeholder_count()
        if n != len(self.image_files):
            raise PydanticCustomError(
                "placeholder_mismatch",
                "{n} image placeholders but {m} image_files",
                {"n": n, "m": len(self.image_files)},
            )
        return self

    def placeholder_count(self) -> int:
        if self.text is not None:
            return self.text.count(IMAGE_PLACEHOLDER)
        return sum(m.image_count() for m in self.context or [])


REASONS = (
    "missing_field",  # a required column/key is absent (id, context/text, role, content)
    "wrong_type",  # a value has the wrong JSON type (content not str/list, image_files not a list, ...)
    "unknown_role",  # a message role outside system/user/assistant
    "bad_part",  # a content part that is not {"type": "image"} / {"type": "text", "text": str}
    "empty_conversation",  # context is an empty list, or pretraining text is empty
    "no_assistant_turn",  # an instruction conversation with nothing to learn from
    "placeholder_mismatch",  # number of <image> placeholders != len(image_files)
)


class UFXError(ValueError):
    """A record that cannot become a training sample.

    ``reason`` is one of :data:`REASONS` (stable codes: the validator writes them to ``rejects.jsonl``),
    ``field`` the dotted path inside the record (e.g. ``context.2.role``), ``detail`` a human sentence.
    """

    def __init__(self, reason: str, detail: str, *, field: str | None = None, record_id: str | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown UFX reason code {reason!r}; expected one of {REASONS}")
        self.reason, self.detail, self.field, self.record_id = reason, detail, field, record_id
        where = " ".join(x for x in (f"record {record_id!r}" if record_id else "", field or "") if x)
        super().__init__(f"{where}: {reason}: {detail}" if where else f"{reason}: {detail}")


def parse_record(data: dict, ufx_type: Literal["instruction", "pretrain"] = "instruction") -> UFXRecord:
    """Check a raw record's shape for a source of ``ufx_type``; raise :class:`UFXError` with the first problem."""
    rid = data.get("id") if isinstance(data.get("id"), str) else None
    column = "text" if ufx_type == "pretrain" else "context"
    if data.get(column) is None:
        raise UFXError("missing_field", f"a {ufx_type} record needs '{column}'", field=column, record_id=rid)
    try:
        record = UFXRecord.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # content is str | list[Part]: report the list branch when the value was a list
        err = next((e for e in errors if _is_list_branch(e) and e["type"] != "list_type"), errors[0])
        in_part = _is_list_branch(err)
        loc = ".".join(str(p) for p in err["loc"] if not (p == "str" or str(p).startswith("list[")))
        reason = "bad_part" if in_part and err["type"] != "model_type" else _reason(err, loc)
        raise UFXError(reason, err["msg"], field=loc or None, record_id=rid) from None
    if ufx_type == "pretrain":
        if not record.text.strip():
            raise UFXError("empty_conversation", "pretraining text is empty", field="text", record_id=rid)
    elif not record.context:
        raise UFXError("empty_conversation", "context has no messages", field="context", record_id=rid)
    elif not any(m.role == "assistant" for m in record.context):
        raise UFXError("no_assistant_turn", "no assistant message to learn from", field="context", record_id=rid)
    return record


def _is_list_branch(err: dict) -> bool:
    return any(str(p).startswith("list[") for p in err["loc"])


def _reason(err: dict, loc: str) -> str:
    kind = err["type"]
    if kind in REASONS:
        return kind
    if kind == "missing":
        return "missing_field"
    if kind == "literal_error" and loc.endswith("role"):
        return "unknown_role"
    return "wrong_type"
