"""The tokenizer read with the ``tokenizers`` library alone gives what transformers' ``AutoTokenizer`` gives on the
same folder: ids, offsets, special tokens, vocabulary size and decoding (the independent reference)."""

import json
import shutil

import pytest
from transformers import AutoTokenizer, PretrainedConfig

from docev.data.messages import message_dicts, ufx_to_messages
from docev.text.chat_template import resolve_chat_template
from docev.text.tokenizer import load_tokenizer

TEXTS = ["", "plain words", "  leading and   runs of spaces\n\n\ttabs", "Ünïcödé — “quotes”, 日本語, emoji 🧾✅",
         "<s>literal</s> <pad><|im_start|>user\n<image>\nx<|im_end|>", "<image><image>", "<|im_end|<|im_start|>",
         "digits 1,234.56 and 2026-12-06", "a" * 500]  # fmt: skip


def _auto(folder):
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, config=PretrainedConfig())


def _assert_same(ours, theirs, texts):
    for text in texts:
        a = ours.backend_tokenizer.encode(text, add_special_tokens=False)
        b = theirs.backend_tokenizer.encode(text, add_special_tokens=False)
        assert a.ids == b.ids == theirs.encode(text, add_special_tokens=False), text
        assert a.offsets == b.offsets, text
        for skip in (False, True):
            assert ours.decode(a.ids, skip_special_tokens=skip) == theirs.decode(a.ids, skip_special_tokens=skip)
    for name in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert len(ours) == len(theirs)


def test_same_ids_as_transformers_on_records_and_special_tokens(tiny_checkpoint, synth_sources):
    template = resolve_chat_template("docev_chatml")
    records = [json.loads(line) for line in (synth_sources["instruct"] / "data.jsonl").read_text().splitlines()]
    rendered = [template.render(message_dicts(ufx_to_messages(r)), add_generation_prompt=g).text
                for r in records[:12] for g in (False, True)]  # fmt: skip
    _assert_same(load_tokenizer(tiny_checkpoint), _auto(tiny_checkpoint), TEXTS + rendered)


def test_tokens_the_files_lack_are_added_as_transformers_adds_them(tmp_path, tiny_checkpoint):
    """``<|im_end|>`` only in the BPE vocabulary (no added token), named in the config as the eos token; ``<image>``
    nowhere: both tokenizers add them, with the same ids."""
    folder = tmp_path / "tok"
    shutil.copytree(tiny_checkpoint, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in ("<|im_end|>", "<image>")]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = ["<|im_start|>"]
    config["eos_token"] = "<|im_end|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = load_tokenizer(folder), _auto(folder)
    theirs.add_tokens(["<image>"], special_tokens=True)  # what loading for the transform did with transformers
    assert ours.backend_tokenizer.token_to_id("<image>") == theirs.convert_tokens_to_ids("<image>") == len(ours) - 1
    assert ours.eos_token == "<|im_end|>"
    _assert_same(ours, theirs, TEXTS)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json: invalid JSON"):
        load_tokenizer(tmp_path)
