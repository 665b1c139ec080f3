"""Chat template rendering: parity with transformers' apply_chat_template, loss masks, the sandbox."""

import json

import pytest
from transformers import AutoTokenizer, PretrainedConfig

from docev.data.messages import ufx_to_messages
from docev.data.transform import docev_preview_transform
from docev.text.chat_template import ChatTemplate, ChatTemplateError, resolve_chat_template, token_loss_mask

CONVERSATIONS = [
    [{"role": "user", "content": "<image>\nWhat is the total?"}, {"role": "assistant", "content": "$1,234.00"}],
    [{"role": "system", "content": "You read documents."},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who issued it?"}]},
     {"role": "assistant", "content": "Acme Corp"}, {"role": "user", "content": "And the date?"},
     {"role": "assistant", "content": " 2026-01-02 "}],
    [{"role": "user", "content": "<image><image>\ncompare"}, {"role": "assistant", "content": ""}],
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(str(tiny_checkpoint), local_files_only=True, config=PretrainedConfig())


def _ours(tokenizer, messages, **kwargs):
    rendered = resolve_chat_template("docev_chatml").render(messages, **kwargs)
    enc = tokenizer.backend_tokenizer.encode(rendered.text, add_special_tokens=False)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return enc.ids, token_loss_mask(enc.offsets, enc.ids, rendered.spans, [stop])


def _records(synth_sources):
    """Every synthetic instruction record (string and parts content, multi-image, multi-turn, system), plus
    the conversations above as records on synthetic pages (among them an empty reply)."""
    root = synth_sources["instruct"]
    records = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines()]
    pages = sorted(f"images/{p.name}" for p in (root / "images").iterdir())
    for k, convo in enumerate(CONVERSATIONS):
        text = json.dumps(convo)
        n = text.count("<image>") + text.count('"type": "image"')
        records.append({"id": f"convo-{k}", "context": convo, "image_files": pages[:n]})
    return records, root


def _shape(record) -> set[str]:
    context = record["context"]
    shape = {"string" if all(isinstance(m["content"], str) for m in context) else "parts"}
    if len(record["image_files"]) > 1:
        shape.add("multi-image")
    if sum(m["role"] == "assistant" for m in context) > 1:
        shape.add("multi-turn")
    if any(m["role"] == "system" for m in context):
        shape.add("system")
    if any(m["role"] == "assistant" and not m["content"] for m in context):
        shape.add("empty reply")
    return shape


@pytest.mark.parametrize("add_vision_id", [False, True])
def test_transform_matches_apply_chat_template(tiny_checkpoint, tokenizer, synth_sources, add_vision_id):
    """The transform's real path (UFX record → messages → encode) gives transformers' ids for every record,
    and its loss mask = transformers' assistant mask + the <|im_end|> closing each assistant turn."""
    transform = docev_preview_transform(str(tiny_checkpoint), tile_size=112, add_vision_id=add_vision_id)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    records, root = _records(synth_sources)
    shapes = set().union(*map(_shape, records))
    assert shapes == {"string", "parts", "multi-image", "multi-turn", "system", "empty reply"}
    for rec in records:
        sample = transform.encode(ufx_to_messages(rec, image_root=root), load_pixels=False)
        hf = tokenizer.apply_chat_template(
            rec["context"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
            add_vision_id=add_vision_id,
        )  # fmt: skip
        assert sample.tokens == hf["input_ids"], rec["id"]
        assert (f"Picture {len(rec['image_files'])}: <image>" in tokenizer.decode(sample.tokens)) == add_vision_id
        # ChatML closes every message with one <|im_end|>: the k-th closes message k
        closing = [i for i, t in enumerate(hf["input_ids"]) if t == stop]
        assert len(closing) == len(rec["context"]), rec["id"]
        expected = [bool(b) for b in hf["assistant_masks"]]
        for i, message in zip(closing, rec["context"], strict=True):
            expected[i] = message["role"] == "assistant"
        assert sample.loss_mask == expected, rec["id"]


def test_stop_token_carries_loss_and_nothing_else_outside_replies(tokenizer):
    ids, mask = _ours(tokenizer, CONVERSATIONS[1])
    text_of = tokenizer.decode
    assert text_of([t for t, m in zip(ids, mask, strict=True) if m]) == "Acme Corp<|im_end|> 2026-01-02 <|im_end|>"
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    closing = [i for i, t in enumerate(ids) if t == stop]
    assert [mask[i] for i in closing] == [False, False, True, False, True]  # system, user, asst, user, asst


def test_empty_reply_still_learns_to_stop(tokenizer):
    ids, mask = _ours(tokenizer, CONVERSATIONS[2])
    assert [t for t, m in zip(ids, mask, strict=True) if m] == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_flags(tokenizer):
    text = resolve_chat_template("docev_chatml").render(CONVERSATIONS[2], add_vision_id=True).text
    assert "Picture 1: <image>Picture 2: <image>\ncompare" in text
    prompt = resolve_chat_template("docev_chatml").render(CONVERSATIONS[0][:1], add_generation_prompt=True)
    assert prompt.text.endswith("<|im_end|>\n<|im_start|>assistant\n") and prompt.spans == ()


def test_token_loss_mask_overlap_and_stop_search():
    # text "ab|cd|E|f" tokens with offsets; span covers [1, 3) → tokens 0 ("ab") and 1 ("cd") overlap it
    offsets, ids = [(0, 2), (2, 4), (4, 5), (5, 6)], [10, 11, 99, 12]
    assert token_loss_mask(offsets, ids, [(1, 3)], [99]) == [True, True, True, False]
    assert token_loss_mask(offsets, ids, [(1, 3)], [12]) == [True, True, False, True]
    # the stop search ends where the next span starts
    assert token_loss_mask(offsets, ids, [(0, 1), (4, 5)], [12]) == [True, False, True, True]


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ (messages|attr('__class__')).__mro__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% set x = messages.append(1) %}",  # the immutable sandbox refuses mutation
        "{{ messages.pop() }}",
    ],
)
def test_sandbox_refuses_python_internals(source):
    with pytest.raises(ChatTemplateError, match="refused by the sandbox: access to attribute .* is unsafe"):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("source", ["{{ messages|attr('__class__') }}", "{{ '{0.__class__}'.format(messages) }}"])
def test_sandbox_leaks_nothing_through_filters(source):
    """Unsafe lookups that are only printed become empty (Jinja's sandbox Undefined), never the object."""
    assert ChatTemplate(source).render([{"role": "user", "content": "x"}]).text == ""


def test_template_errors_name_the_template():
    with pytest.raises(ChatTemplateError, match=r"<inline>: line 1"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="no assistant"):
        ChatTemplate("{{ raise_exception('no assistant') }}").render([])
    with pytest.raises(ChatTemplateError, match="nested or unbalanced"):
        ChatTemplate("{% generation %}a{% generation %}b{% endgeneration %}{% endgeneration %}").render([])
    with pytest.raises(ChatTemplateError, match="neither a bundled template"):
        resolve_chat_template("no_such_template")


def test_generation_marker_in_content_is_refused():
    evil = "\x00\x02docev-generation\x02\x00"
    with pytest.raises(ChatTemplateError, match="generation marker"):
        resolve_chat_template("docev_chatml").render([{"role": "user", "content": evil}])


def test_inline_template_and_tojson():
    tpl = resolve_chat_template(
        "{% for m in messages %}{{ m | tojson }}{% generation %}!{% endgeneration %}{% endfor %}"
    )
    out = tpl.render([{"role": "user", "content": "é<b>"}])
    assert json.loads(out.text[:-1]) == {"role": "user", "content": "é<b>"}
    assert out.spans == ((len(out.text) - 1, len(out.text)),)
