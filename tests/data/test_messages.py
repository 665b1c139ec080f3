"""UFX records → torchtune messages."""

from pathlib import Path

import pytest
from PIL import Image

from docev.data.messages import message_dicts, message_images, ufx_to_messages
from docev.ufx import UFXError, parse_record


def _parts(message):
    return [(p["type"], p["content"]) for p in message.content]


def test_string_content_maps_placeholders_in_order(tmp_path):
    rec = {"id": "a", "image_files": ["i/0.png", "/abs/1.png"],
           "context": [{"role": "user", "content": "<image>\nfirst <image> second"},
                       {"role": "assistant", "content": "ok"}]}  # fmt: skip
    msgs = ufx_to_messages(rec, image_root=tmp_path)
    assert [(m.role, m.masked) for m in msgs] == [("user", True), ("assistant", False)]
    assert _parts(msgs[0]) == [("image", tmp_path / "i/0.png"), ("text", "\nfirst "), ("image", Path("/abs/1.png")),
                               ("text", " second")]  # fmt: skip
    assert message_images(msgs) == [tmp_path / "i/0.png", Path("/abs/1.png")]


def test_part_content_with_placeholder_inside_text():
    rec = parse_record({"id": "b", "image_files": ["0.png", "1.png"],
                        "context": [{"role": "user", "content": [{"type": "text", "text": "see <image>"},
                                                                 {"type": "image"}]},
                                    {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]})  # fmt: skip
    msgs = ufx_to_messages(rec)
    assert _parts(msgs[0]) == [("text", "see "), ("image", Path("0.png")), ("image", Path("1.png"))]
    assert message_dicts(msgs) == [
        {"role": "user", "content": [{"type": "text", "text": "see "}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
    ]


def test_system_messages_and_new_system_prompt():
    rec = {"id": "c", "context": [{"role": "system", "content": "old"}, {"role": "user", "content": "q"},
                                  {"role": "assistant", "content": "a"}]}  # fmt: skip
    kept = ufx_to_messages(rec)
    assert [(m.role, m.text_content, m.masked) for m in kept][0] == ("system", "old", True)
    replaced = ufx_to_messages(rec, new_system_prompt="new")
    assert [(m.role, m.text_content) for m in replaced] == [("system", "new"), ("user", "q"), ("assistant", "a")]


def test_pretraining_text_is_one_unmasked_message():
    msgs = ufx_to_messages({"id": "p", "text": "<image>\nline one", "image_files": ["x.png"]}, ufx_type="pretrain")
    assert len(msgs) == 1 and msgs[0].masked is False
    assert _parts(msgs[0]) == [("image", Path("x.png")), ("text", "\nline one")]


@pytest.mark.parametrize(
    "record, ufx_type, reason, field",
    [
        ({"id": "x", "context": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}]},
         "instruction", "placeholder_mismatch", None),
        ({"id": "x", "context": [{"role": "robot", "content": "a"}]}, "instruction", "unknown_role", "context.0.role"),
        ({"id": "x", "context": [{"role": "user", "content": "q"}]}, "instruction", "no_assistant_turn", "context"),
        ({"id": "x", "context": []}, "instruction", "empty_conversation", "context"),
        ({"id": "x", "context": [{"role": "user", "content": "q"}]}, "pretrain", "missing_field", "text"),
    ],
)  # fmt: skip
def test_bad_records_raise_typed_errors(record, ufx_type, reason, field):
    with pytest.raises(UFXError) as exc:
        ufx_to_messages(record, ufx_type=ufx_type)
    assert exc.value.reason == reason and exc.value.record_id == "x"
    if field is not None:
        assert exc.value.field == field


def test_pil_images_pass_through_torchtune_messages():
    """A message built by hand with PIL images (torchtune's convention) is read the same way."""
    from torchtune.data import Message

    img = Image.new("RGB", (5, 5))
    msgs = [Message("user", [{"type": "image", "content": img}, {"type": "text", "content": "q"}], masked=True)]
    assert message_images(msgs) == [img]
    assert message_dicts(msgs)[0]["content"][0] == {"type": "image"}
