"""Other tools' formats mapped into UFX rows (``datasets[].formatting``): each mapping on hand-written rows,
the rows that break each format rejected with the original field, and the field names translated back."""

import hashlib
import json
from pathlib import Path

import pytest

from docev.sources.formats import FormatError, json_rows, json_safe, original_field, to_ufx
from docev.ufx import parse_record

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16  # only the signature matters to the mapping


def said(who, value):  # a LLaVA / ShareGPT turn
    return {"from": who, "value": value}


def test_llava_single_image_and_roles():
    row = {
        "id": 7,
        "image": "imgs/p.png",
        "conversations": [said("human", "<image>\nWho issued it?"), said("gpt", "Acme")],
    }
    got = to_ufx(row, "llava", where="a.json:0", image_dir=None)
    assert got.record == {"id": "7", "image_files": ["imgs/p.png"],
                          "context": [{"role": "user", "content": "<image>\nWho issued it?"},
                                      {"role": "assistant", "content": "Acme"}]}  # fmt: skip
    parse_record(got.record)  # a valid UFX record
    assert original_field(got.fields, "context.1.role") == "conversations.1.from"
    assert original_field(got.fields, "image_files.0") == "image"
    assert original_field(got.fields, "context.0.content") == "conversations.0.value"


def test_sharegpt_system_column_and_role_content_turns():
    turns = [{"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "Same."}]
    row = {"system": "Be brief.", "images": ["a.png", "b.png"], "messages": turns}
    got = to_ufx(row, "sharegpt", where="d.jsonl:3", image_dir=None)
    assert got.record["id"] == "d.jsonl:3"  # no id: named by its position
    assert [m["role"] for m in got.record["context"]] == ["system", "user", "assistant"]
    assert got.record["image_files"] == ["a.png", "b.png"]
    # the system column shifts the turns by one; the field names follow
    assert original_field(got.fields, "context.2.content") == "messages.1.content"
    assert (
        original_field(got.fields, "context.0") == "system"
        and original_field(got.fields, "image_files.1") == "images.1"
    )


def test_messages_parts_and_embedded_bytes_written_once(tmp_path):
    user = [{"type": "image", "text": None}, {"type": "text", "text": "Total?"}]  # Arrow's None for absent text
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": "12.50"}]}]
    row = {"messages": turns, "images": [{"bytes": PNG, "path": None}]}
    got = to_ufx(row, "messages", where="t.parquet:0", image_dir=tmp_path / "emb")
    path = Path(got.record["image_files"][0])
    assert path == tmp_path / "emb" / f"{hashlib.sha256(PNG).hexdigest()}.png" and path.read_bytes() == PNG
    assert got.record["context"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "Total?"}]
    again = to_ufx(row, "messages", where="t.parquet:0", image_dir=tmp_path / "emb")
    assert again.record == got.record and len(list((tmp_path / "emb").iterdir())) == 1
    assert json_safe(row)["images"] == [{"bytes": f"<{len(PNG)} bytes>", "path": None}]
    named = to_ufx(
        {**row, "images": [{"bytes": b"GIF89a", "path": "scan.JPG"}]}, "messages", where="x", image_dir=tmp_path
    )
    assert named.record["image_files"][0].endswith(".jpg")  # the original name's extension


def test_qa_accepted_answers_and_question_type(tmp_path):
    row = {"questionId": 49153, "question": "What is the date?", "answers": ["1/2/99", "Jan 2, 1999"], "docId": 14,
           "image": {"bytes": PNG, "path": "documents/x.png"}, "question_types": ["form", "layout"]}  # fmt: skip
    got = to_ufx(row, "qa", where="q:0", image_dir=tmp_path)
    record = got.record
    assert record["id"] == "49153" and record["context"][0]["content"] == "<image>\nWhat is the date?"
    assert record["context"][1]["content"] == "1/2/99"
    assert json.loads(record["meta"]) == {"answers": [["1/2/99", "Jan 2, 1999"]], "question_type": "form"}
    from docev.evaluation.questions import record_questions

    (q,) = record_questions(record, "docvqa", str(tmp_path), None)
    assert q.answers == ["1/2/99", "Jan 2, 1999"] and q.question_type == "form" and q.question == "What is the date?"


def test_json_files_array_or_docvqa_data_object():
    assert json_rows(b'[{"a": 1}]') == [{"a": 1}]
    assert json_rows(b'{"dataset_name": "docvqa", "data": [{"a": 2}]}') == [{"a": 2}]
    with pytest.raises(ValueError, match="array of records"):
        json_rows(b'{"a": 1}')


BROKEN = [
    ("llava", {"image": "p.png", "conversations": [said("human", "<image>\nQ"), said("bot", "A")]}, "unknown_role",
     "conversations.1.from"),
    ("llava", {"conversations": [{"from": "human"}, said("gpt", "A")]}, "missing_field", "conversations.0.value"),
    ("llava", {"image": "p.png", "conversations": [said("human", "Q"), said("gpt", "A")]}, "placeholder_mismatch",
     "image"),
    ("sharegpt", {"conversations": [said("human", ["Q"]), said("gpt", "A")]}, "wrong_type", "conversations.0.value"),
    ("sharegpt", {"system": 3, "conversations": []}, "wrong_type", "system"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "bad_part", "messages.0.content.0"),
    ("messages", {"messages": [], "images": [{"bytes": None, "path": None}]}, "wrong_type", "images.0"),
    ("messages", {"messages": "hi"}, "wrong_type", "messages"),
    ("qa", {"question": "Q?", "answers": [], "image": "p.png"}, "wrong_type", "answers"),
    ("qa", {"answers": ["A"], "image": "p.png"}, "missing_field", "question"),
    ("qa", {"question": "Q?", "answers": ["A"], "image": "p.png", "questionId": 1.5}, "wrong_type", "questionId"),
]  # fmt: skip


@pytest.mark.parametrize("formatting, row, reason, field", BROKEN)
def test_a_row_that_breaks_its_format_names_the_original_field(formatting, row, reason, field):
    with pytest.raises(FormatError) as info:
        to_ufx(row, formatting, where="f:0", image_dir=None)
    assert (info.value.reason, info.value.field) == (reason, field), info.value.detail
