"""The held-out split as questions: every assistant turn of every held-out instruction record.

A question's prompt is the conversation up to that turn, earlier assistant turns included as the
record states them (the gold history), so turn k is scored on its own. The gold answer is the
assistant text; a record's ``meta`` (a JSON object, or a string encoding one) may add, per assistant
turn, ``answers`` (lists of further accepted answers, DocVQA-style) and ``question_types`` (the
breakdown the metrics report), or one ``question_type`` for every turn. Pretraining records have no
question: they count in the eval loss only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docev.config import DocEVConfig
from docev.data.messages import Message, ufx_to_messages
from docev.data.split import all_sources
from docev.sources.manifest import iter_manifest
from docev.sources.readers import read_at, source_name


@dataclass
class Question:
    id: str
    source: str
    turn: int  # index of the assistant turn within the record (0 = first answer)
    question: str
    answers: list[str]
    prompt: list[Message] = field(repr=False)  # the conversation up to (not including) the answer
    images: list[str] = field(default_factory=list)  # image paths of the prompt, in order
    question_type: str | None = None


def _meta(raw: Any) -> dict[str, Any]:
    """A record's ``meta``: a JSON object as it is, or a string holding one (else nothing)."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _per_turn(meta: dict[str, Any], key: str, turn: int) -> Any:
    values = meta.get(key)
    return values[turn] if isinstance(values, list) and turn < len(values) else None


def record_questions(record: dict[str, Any], source: str, image_root: str, system_prompt: str | None) -> list[Question]:
    """The questions of one (validated) instruction record."""
    messages = ufx_to_messages(record, ufx_type="instruction", image_root=image_root, new_system_prompt=system_prompt)
    meta = _meta(record.get("meta"))
    out, turn = [], 0
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        prompt = messages[:i]
        users = [p for p in prompt if p.role == "user"]
        extra = _per_turn(meta, "answers", turn)
        golds = [m.text_content] + [str(a) for a in extra or [] if str(a) != m.text_content]
        qtype = _per_turn(meta, "question_types", turn) or meta.get("question_type")
        images = [str(p["content"]) for msg in prompt for p in msg.content if p["type"] == "image"]
        out.append(Question(str(record["id"]), source, turn, users[-1].text_content.strip() if users else "", golds,
                            prompt, images, str(qtype) if qtype is not None else None))  # fmt: skip
        turn += 1
    return out


def eval_questions(cfg: DocEVConfig) -> Iterator[Question]:
    """Questions of the held-out records, in the validated manifest's order."""
    sources = {source_name(s): s for s in all_sources(cfg)}
    for entry in iter_manifest(cfg):
        src = sources[entry["source"]]
        if entry.get("split") != "eval" or src.ufx_type != "instruction":
            continue
        raw = read_at(src, entry["file"], entry["row"], entry["offset"])
        if raw.data is None:  # the record was accepted from these bytes: a changed file is an error
            raise ValueError(f"{Path(src.source) / entry['file']} row {entry['row']}: unreadable now ({raw.error})")
        yield from record_questions(raw.data, entry["source"], src.source, src.new_system_prompt)
