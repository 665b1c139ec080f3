import pytest
from pydantic import ValidationError

from docev.ufx import UFXRecord


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
