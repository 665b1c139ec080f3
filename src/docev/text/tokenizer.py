"""The checkpoint's tokenizer through the ``tokenizers`` library alone: what transformers' ``AutoTokenizer`` loads
from the same files (``tokenizer.json``, the special tokens of ``tokenizer_config.json`` /
``special_tokens_map.json``), without importing transformers, which imports torch: seconds at the start of every
data task (validate, preprocess, tokens), none of which needs either. ``tests/text/test_tokenizer.py`` checks ids,
special tokens and decoding against ``AutoTokenizer`` on the same folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
EXTRA_SPECIAL = ("extra_special_tokens", "additional_special_tokens")  # transformers 5 / 4 spelling


class Tokenizer:
    """The part of transformers' fast tokenizer this project uses: the Rust ``backend_tokenizer`` (encoding,
    offsets), the named special tokens and their ids, the vocabulary size and decoding."""

    def __init__(self, backend: Backend, special: dict[str, str | None]):
        self.backend_tokenizer = backend
        self.bos_token, self.eos_token = special.get("bos_token"), special.get("eos_token")
        self.pad_token = special.get("pad_token")

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    def __len__(self) -> int:
        """Ids in use, added tokens included (transformers' ``len(tokenizer)``)."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _content(token: Any) -> str | None:
    """A special token as the config writes it: a string or an ``AddedToken`` dict."""
    return token.get("content") if isinstance(token, dict) else token


def _added(token: Any) -> AddedToken:
    if isinstance(token, dict):
        keys = ("single_word", "lstrip", "rstrip", "normalized", "special")
        return AddedToken(token["content"], **{k: token[k] for k in keys if k in token})
    return AddedToken(token, special=True)


def load_tokenizer(model_name_or_path: str | Path, image_token: str = "<image>") -> Tokenizer:
    """The tokenizer in ``model_name_or_path`` (local files only); special tokens the configs name but
    ``tokenizer.json`` lacks are added as transformers adds them, and ``image_token`` after them when the
    vocabulary lacks it (the model's embedding must then grow to cover the new id)."""
    path = Path(model_name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model_name_or_path {path}: not a folder (tokenizer files are read locally)")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path / 'tokenizer.json'}: missing (the tokenizer is read from tokenizer.json)")
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        file = path / name
        if file.is_file():
            try:
                config |= json.loads(file.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{file}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    backend = Backend.from_file(str(path / "tokenizer.json"))
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    decoder = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
    named = [config.get(name) for name in SPECIAL_NAMES]
    extra = [t for key in EXTRA_SPECIAL for t in config.get(key) or []]
    missing: dict[str, AddedToken] = {}
    for token in [t for _, t in decoder] + [t for t in named if t] + extra:
        # a special token only in the model's vocabulary would be split like text: it is added, as transformers does
        if _content(token) not in added and _content(token) not in missing:
            missing[_content(token)] = _added(token)
    backend.add_tokens(list(missing.values()))
    if backend.token_to_id(image_token) is None:
        backend.add_special_tokens([image_token])
    return Tokenizer(backend, {name: _content(config.get(name)) for name in SPECIAL_NAMES})
