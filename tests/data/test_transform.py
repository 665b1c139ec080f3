"""The model transform: token ids, loss masks, placeholder expansion, counts, overflow policy."""

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE
from transformers import AutoTokenizer, PretrainedConfig

from docev.data.messages import ufx_to_messages
from docev.data.transform import (
    DocEVTransform,
    EncodedSample,
    SampleTooLongError,
    build_token_counter,
    docev_preview_transform,
    expand_placeholders,
)
from docev.text.chat_template import ChatTemplate
from docev.ufx import parse_record
from docev.vision.geometry import num_image_tokens
from tests.conftest import tiny_config

T = 112  # the tiny checkpoint's tile


@pytest.fixture(scope="module")
def transform(tiny_checkpoint):
    return docev_preview_transform(str(tiny_checkpoint), tile_size=T, max_seq_len=1024)


def _records(root, kind="instruct"):
    src = root[kind]
    return [json.loads(line) for line in (src / "data.jsonl").read_text().splitlines()], src


def _variant(transform, **kwargs) -> DocEVTransform:
    """Same tokenizer and template, other limits/policy."""
    return DocEVTransform(transform.tokenizer, transform.chat_template, tile_size=T, **kwargs)


def _image_runs(tokens, image_id):
    runs, k = [], 0
    while k < len(tokens):
        if tokens[k] == image_id:
            start = k
            while k < len(tokens) and tokens[k] == image_id:
                k += 1
            runs.append(k - start)
        else:
            k += 1
    return runs


def test_instruction_samples_end_to_end(transform, synth_sources):
    records, root = _records(synth_sources)
    tok, stop, img = transform.tokenizer, transform.stop_token_ids[0], transform.image_token_id
    for rec in records:
        msgs = ufx_to_messages(rec, image_root=root)
        enc = transform.encode(msgs)
        assert enc.tokens.count(img) == len(rec["image_files"]) and len(enc.loss_mask) == len(enc.tokens)
        lite = transform.encode(msgs, load_pixels=False)  # header sizes, no decode
        assert (lite.tokens, lite.loss_mask, lite.image_sizes, lite.images) == (
            enc.tokens, enc.loss_mask, enc.image_sizes, None)  # fmt: skip
        count = transform.count_tokens(msgs, enc.image_sizes)
        for r in (2, 3):
            out = transform.expand(enc, r)
            assert out["sampling_ratio"] == r and not out["truncated"]
            assert len(out["tokens"]) == len(out["labels"]) == count.per_ratio[r]
            # each image is one block of exactly num_image_tokens positions, in order, with no loss
            expected = [num_image_tokens(h, w, r, tile_size=T, patch_size=14) for h, w in enc.image_sizes]
            assert _image_runs(out["tokens"], img) == expected
            assert all(lab == IGNORE for t, lab in zip(out["tokens"], out["labels"], strict=True) if t == img)
            # loss = every assistant reply followed by its <|im_end|>
            learned = [t for t in out["labels"] if t != IGNORE]
            replies = [m["content"] for m in rec["context"] if m["role"] == "assistant"]
            assert tok.decode(learned) == "".join(f"{a}<|im_end|>" for a in replies)
            assert learned.count(stop) == len(replies)
            assert out["image_grids"] == [t.plan.grid for t in enc.images]
            for px, tiled in zip(out["pixel_values"], enc.images, strict=True):
                assert px.dtype == torch.uint8 and px.shape == (tiled.plan.num_tiles, 3, T, T)
        assert count.max == count.per_ratio[2] > count.min == count.per_ratio[3]


def test_pretraining_samples_carry_loss_everywhere(transform, synth_sources):
    records, root = _records(synth_sources, "pretrain")
    tok = transform.tokenizer
    for rec in records:
        msgs = ufx_to_messages(rec, ufx_type="pretrain", image_root=root)
        enc = transform.encode(msgs, ufx_type="pretrain")
        assert enc.tokens[0] == tok.bos_token_id and enc.tokens[-1] == tok.eos_token_id and all(enc.loss_mask)
        out = transform.expand(enc, 2)
        img = transform.image_token_id
        assert [lab for t, lab in zip(out["tokens"], out["labels"], strict=True) if t != img] == [
            t for t in out["tokens"] if t != img]  # fmt: skip
        assert tok.decode([t for t in out["labels"] if t != IGNORE], skip_special_tokens=True) == rec["text"].replace(
            "<image>", "")  # fmt: skip


def test_expand_placeholders():
    tokens, labels = expand_placeholders([5, 9, 6, 9], [False, True, True, True], 9, [2, 3])
    assert tokens == [5, 9, 9, 6, 9, 9, 9]
    assert labels == [IGNORE, IGNORE, IGNORE, 6, IGNORE, IGNORE, IGNORE]
    with pytest.raises(ValueError, match="2 image placeholders but 1"):
        expand_placeholders([9, 9], [True, True], 9, [4])


def _long_sample(transform, answer_words=40, tail_words=0):
    """user: <image> + question (+ tail text after the reply); one 112x112 image."""
    msgs = ufx_to_messages({"id": "s", "image_files": ["x.png"], "context": [
        {"role": "user", "content": "<image>\nWhat is the total?"},
        {"role": "assistant", "content": " ".join(["total"] * answer_words)},
        *([{"role": "user", "content": " ".join(["more"] * tail_words)}] if tail_words else []),
    ]})  # fmt: skip
    tokens, mask = transform.tokenize_messages(msgs)
    return EncodedSample(tokens, mask, [(300, 500)])


def test_overflow_larger_ratio(transform):
    enc = _long_sample(transform)
    c = transform._count(len(enc.tokens), enc.image_sizes).per_ratio
    tight = _variant(transform, max_seq_len=c[3], overflow_policy=["larger_ratio", "drop"])
    out = tight.expand(enc, 2)
    assert out["sampling_ratio"] == 3 and len(out["tokens"]) == c[3] and not out["truncated"]
    # a batch shares one ratio: the batch moves to the ratio its longest sample needs
    text_only = EncodedSample(
        *transform.tokenize_messages(
            ufx_to_messages(
                {"id": "t", "context": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
            )
        ),
        [],
    )
    assert tight.batch_ratio([text_only], 2) == 2 and tight.batch_ratio([text_only, enc], 2) == 3
    assert tight.expand(enc, 2, allow_larger_ratio=False) is None and tight.drops == {"too_long": 1}


def test_overflow_truncates_only_text_after_the_last_image(transform):
    enc = _long_sample(transform)
    c = transform._count(len(enc.tokens), enc.image_sizes).per_ratio
    full = transform.expand(enc, 2)
    t = _variant(transform, max_seq_len=c[2] - 5, overflow_policy=["truncate_text", "drop"])
    out = t.expand(enc, 2)
    assert out["sampling_ratio"] == 2 and out["truncated"] and len(out["tokens"]) == c[2] - 5
    assert out["tokens"] == full["tokens"][: c[2] - 5] and out["labels"] == full["labels"][: c[2] - 5]
    # the cut would land inside the image block at ratio 2: not allowed, so without larger_ratio it is dropped
    img_end = max(i for i, tok in enumerate(full["tokens"]) if tok == transform.image_token_id) + 1
    inside = _variant(transform, max_seq_len=img_end - 1, overflow_policy=["truncate_text", "drop"])
    assert inside.expand(enc, 2) is None and inside.drops == {"too_long": 1}
    # with larger_ratio first, ratio 3 makes the image small enough and the text is cut instead
    limit = min(img_end - 1, c[3] - 1)
    both = _variant(transform, max_seq_len=limit, overflow_policy=["larger_ratio", "truncate_text", "drop"])
    out3 = both.expand(enc, 2)
    assert out3["sampling_ratio"] == 3 and out3["truncated"] and len(out3["tokens"]) == limit
    assert _image_runs(out3["tokens"], transform.image_token_id) == [transform.image_tokens(300, 500, 3)]


def test_overflow_drop_reasons_and_errors(transform):
    enc = _long_sample(transform, answer_words=3, tail_words=200)
    c = transform._count(len(enc.tokens), enc.image_sizes).per_ratio
    # the cut keeps the image and the prompt but not the reply: nothing left to learn → dropped, counted
    n_before_reply = next(i for i, m in enumerate(enc.loss_mask) if m)
    keep = n_before_reply + transform.image_tokens(300, 500, 3) - 1
    t = _variant(transform, max_seq_len=keep, overflow_policy=["larger_ratio", "truncate_text", "drop"])
    assert t.fit(enc, 2).drop_reason == "no_loss_after_truncation"
    assert t.expand(enc, 2) is None and t.drops == {"no_loss_after_truncation": 1}
    # one more token keeps the first reply token: truncation is accepted at the larger ratio
    t2 = _variant(transform, max_seq_len=keep + 1, overflow_policy=["larger_ratio", "truncate_text", "drop"])
    d = t2.fit(enc, 2)
    assert (d.ratio, d.length, d.truncated, d.drop_reason) == (3, keep + 1, True, None)
    # nothing fits and the policy cannot drop: an error, never a made-up sample
    strict = _variant(transform, max_seq_len=c[3] - 1, overflow_policy=["larger_ratio"])
    with pytest.raises(SampleTooLongError, match="has no 'drop' step"):
        strict.expand(enc, 2)
    with pytest.raises(ValueError, match="unknown step"):
        _variant(transform, overflow_policy=["shrink"])


def test_text_only_sample_truncates(transform):
    msgs = ufx_to_messages({"id": "t", "context": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "word " * 300}]})  # fmt: skip
    enc = transform.encode(msgs)
    out = _variant(transform, max_seq_len=64).expand(enc, 2)
    assert out["truncated"] and len(out["tokens"]) == 64 and any(lab != IGNORE for lab in out["labels"])


def test_choose_ratio(transform):
    fixed = _variant(transform, sampling_ratio=[3, 2], apply_random_sampling_ratio=False)
    assert {fixed.choose_ratio() for _ in range(10)} == {3}
    a, b = (_variant(transform, seed=7) for _ in range(2))
    draws = [a.choose_ratio() for _ in range(50)]
    assert draws == [b.choose_ratio() for _ in range(50)] and set(draws) == {2, 3}


def test_call_and_inference_prompt(transform, synth_sources):
    records, root = _records(synth_sources)
    msgs = ufx_to_messages(records[0], image_root=root)
    out = transform({"messages": msgs, "sampling_ratio": 3})
    assert out["sampling_ratio"] == 3 and set(out) >= {"tokens", "labels", "pixel_values", "image_sizes"}
    prompt = transform({"messages": msgs[:1], "sampling_ratio": 2}, inference=True)
    assert transform.tokenizer.decode(prompt["tokens"]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert all(lab == IGNORE for lab in prompt["labels"])


def test_pil_images_in_messages(transform):
    from torchtune.data import Message

    img = Image.new("RGB", (220, 96), (255, 255, 255))
    msgs = [Message("user", [{"type": "image", "content": img}, {"type": "text", "content": "q"}], masked=True),
            Message("assistant", "a")]  # fmt: skip
    enc = transform.encode(msgs)
    assert enc.image_sizes == [(96, 220)] and enc.images[0].plan.size == (96, 220)
    assert transform.encode(msgs, load_pixels=False).image_sizes == [(96, 220)]


def test_template_that_drops_images_is_an_error(transform):
    t = DocEVTransform(transform.tokenizer, ChatTemplate("{% for m in messages %}{{ m.role }}{% endfor %}"))
    msgs = ufx_to_messages({"id": "i", "image_files": ["a.png"], "context": [
        {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}]})  # fmt: skip
    with pytest.raises(ValueError, match="0 <image> tokens for 1 images"):
        t.tokenize_messages(msgs)


def test_factory_checks(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="has no CLS token"):
        docev_preview_transform(str(tiny_checkpoint), vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="stop_tokens: '<\\|nope\\|>' is not in"):
        docev_preview_transform(str(tiny_checkpoint), stop_tokens=["<|nope|>"])
    with pytest.raises(ValueError, match="image_token_id 64000 disagrees .* is 1024"):
        docev_preview_transform(str(tiny_checkpoint), image_token_id=64000)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        docev_preview_transform(str(tmp_path / "nothing"))
    added = docev_preview_transform(str(tiny_checkpoint), image_token="<img>")
    assert added.image_token_id == 1025  # appended after the 1025 existing ids (0..1024)
    # a CLIP-style encoder has a CLS token, so 'default' is allowed there
    clip = tmp_path / "clip"
    clip.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, clip / name)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["vision_config"]["model_type"] = "clip_vision_model"
    (clip / "config.json").write_text(json.dumps(config))
    assert docev_preview_transform(str(clip), vision_feature_select_strategy="default").image_token_id == 1024


def test_preview_geometry_counts(tiny_checkpoint):
    t = docev_preview_transform(str(tiny_checkpoint))  # tile 560 / patch 14
    assert t.image_tokens(560, 560, 2) == 400 + 20 * 21 and t.image_tokens(560, 560, 3) == 169 + 13 * 14
    assert t.image_tokens(3508, 2480, 2) == num_image_tokens(3508, 2480, 2, tile_size=560, patch_size=14)


def test_config_component_and_token_counter(tmp_path, tiny_checkpoint, synth_sources):
    from torchtune import config as tt_config

    cfg = tiny_config(tmp_path, tiny_checkpoint, [{"source": str(synth_sources["instruct"])}])
    transform = tt_config.instantiate(OmegaConf.create(cfg.to_dict()["tokenizer"]))
    assert isinstance(transform, DocEVTransform) and transform.max_seq_len == cfg.tokenizer.max_seq_len
    records, _ = _records(synth_sources)
    count = build_token_counter(cfg)
    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint), local_files_only=True, config=PretrainedConfig())
    rec = parse_record(records[4])  # style 4 has a system message
    sizes = [(842, 595)] * len(rec.image_files)
    extra = {r: sum(num_image_tokens(h, w, r, tile_size=T, patch_size=14) - 1 for h, w in sizes) for r in (2, 3)}
    # independent count: transformers' apply_chat_template on the same conversation + geometry
    convo = [{"role": m.role, "content": m.content} for m in rec.context]
    assert count(rec, sizes) == {
        r: len(tok.apply_chat_template(convo, tokenize=True)["input_ids"]) + extra[r] for r in (2, 3)
    }
    new = [{"role": "system", "content": "Always answer in English."}, *convo[1:]]
    assert count(rec, sizes, new_system_prompt="Always answer in English.") == {
        r: len(tok.apply_chat_template(new, tokenize=True)["input_ids"]) + extra[r] for r in (2, 3)}  # fmt: skip
    pt = parse_record(_records(synth_sources, "pretrain")[0][0], "pretrain")
    n_text = len(tok.encode(pt.text, add_special_tokens=False)) + 2  # bos + text + eos
    assert count(pt, [(100, 100)])[2] == n_text + num_image_tokens(100, 100, 2, tile_size=T, patch_size=14) - 1


def test_pickles_for_worker_processes(transform, synth_sources):
    """DataLoader workers (spawn) and process pools receive the transform pickled."""
    import pickle

    records, root = _records(synth_sources)
    msgs = ufx_to_messages(records[1], image_root=root)
    clone = pickle.loads(pickle.dumps(transform))
    a, b = transform.expand(transform.encode(msgs), 2), clone.expand(clone.encode(msgs), 2)
    assert a["tokens"] == b["tokens"] and a["labels"] == b["labels"]
    assert all(torch.equal(x, y) for x, y in zip(a["pixel_values"], b["pixel_values"], strict=True))
