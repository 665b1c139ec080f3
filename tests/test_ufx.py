import pytest
from pydantic import ValidationError

from docev.ufx import UFXError, UFXRecord, parse_record


def test_string_and_part_placeholders_count():
    rec = UFXRecord.model_validate({
        "id": "a", "image_files": ["1.png", "2.png", "3.png"],
        "context": [{"role": "user", "content": "<image><image> compare"},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                    {"role": "assistant", "content": "same"}],
    })  # fmt: skip
    assert rec.placeholder_count() == 3


@pytest.mark.parametrize(
    "record, needle",
    [
        ({"id": "a", "context": [{"role": "user", "content": "<image>"}], "image_files": []}, "1 image placeholders"),
        ({"id": "a", "context": [{"role": "robot", "content": "x"}]}, "role"),
        ({"id": "a", "text": "x", "context": []}, "exactly one"),
        ({"id": "a", "context": [{"role": "user", "content": [{"type": "text"}]}]}, "needs 'text'"),
        ({"context": []}, "id"),
    ],
)
def test_shape_errors(record, needle):
    with pytest.raises(ValidationError) as exc:
        UFXRecord.model_validate(record)
    assert needle in str(exc.value)


def test_ufx_error_carries_reason_field_and_record():
    from docev.ufx import REASONS, UFXError

    err = UFXError("unknown_role", "'robot' is not system/user/assistant", field="context.0.role", record_id="r1")
    assert (err.reason, err.field, err.record_id) == ("unknown_role", "context.0.role", "r1")
    assert "record 'r1' context.0.role: unknown_role" in str(err)
    assert isinstance(err, ValueError) and "placeholder_mismatch" in REASONS
    with pytest.raises(ValueError, match="unknown UFX reason code"):
        UFXError("made_up", "x")


@pytest.mark.parametrize(
    "record, ufx_type, reason, field",
    [
        ({"id": "a", "context": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}]},
         "instruction", "placeholder_mismatch", None),
        ({"id": "a", "context": [{"role": "robot", "content": "x"}]}, "instruction", "unknown_role", "context.0.role"),
        ({"id": "a", "context": []}, "instruction", "empty_conversation", "context"),
        ({"id": "a", "context": [{"role": "user", "content": "hi"}]}, "instruction", "no_assistant_turn", "context"),
        ({"id": "a"}, "instruction", "missing_field", "context"),
        ({"id": "a", "context": [{"role": "user", "content": "hi"}]}, "pretrain", "missing_field", "text"),
        ({"context": [{"role": "assistant", "content": "hi"}]}, "instruction", "missing_field", "id"),
        ({"id": 3, "context": [{"role": "assistant", "content": "hi"}]}, "instruction", "wrong_type", "id"),
        ({"id": "a", "context": [{"role": "user", "content": [{"type": "video"}]}]}, "instruction", "bad_part",
         "context.0.content.0.type"),
        ({"id": "a", "context": [{"role": "user", "content": 5}]}, "instruction", "wrong_type", "context.0.content"),
        ({"id": "a", "text": "  "}, "pretrain", "empty_conversation", "text"),
    ],
)  # fmt: skip
def test_parse_record_reason_codes(record, ufx_type, reason, field):
    with pytest.raises(UFXError) as exc:
        parse_record(record, ufx_type)
    assert (exc.value.reason, exc.value.field) == (reason, field)


def test_parse_record_accepts_both_content_forms():
    rec = parse_record({"id": "a", "image_files": ["x.png"], "context": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "ok"}]})  # fmt: skip
    assert rec.placeholder_count() == 1


def test_meta_is_a_json_object_or_a_string_holding_one(tmp_path):
    """The README shows ``meta`` as an object; older files encode it as a string: both carry answers and types."""
    import json

    from docev.evaluation.questions import record_questions

    base = {"id": "m", "image_files": [], "context": [{"role": "user", "content": "Q?"},
                                                      {"role": "assistant", "content": "12.50"}]}  # fmt: skip
    meta = {"answers": [["12.5"]], "question_types": ["total"]}
    for form in (meta, json.dumps(meta)):
        parse_record({**base, "meta": form})
        (q,) = record_questions({**base, "meta": form}, "s", str(tmp_path), None)
        assert (q.answers, q.question_type) == (["12.50", "12.5"], "total")
    with pytest.raises(UFXError) as info:
        parse_record({**base, "meta": ["not", "an", "object"]})
    assert (info.value.reason, info.value.field) == ("wrong_type", "meta")
