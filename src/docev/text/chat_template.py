"""Chat templates rendered in a Jinja2 sandbox, with ``{% generation %}`` spans for the loss mask.

A template may come from a config file, so it is untrusted code: it runs in an
``ImmutableSandboxedEnvironment`` (no attribute access to Python internals, no mutation of the
messages). The environment matches the one transformers uses for ``apply_chat_template``
(``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, a JSON ``tojson``), so
a template renders to the same text here and in ``AutoTokenizer.apply_chat_template``.

``{% generation %}…{% endgeneration %}`` marks what the assistant says. The span ends before
the turn's stop token, so :func:`token_loss_mask` also gives loss to the first stop token after
each span: a model that never gets loss on ``<|im_end|>`` never learns to stop.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_DIR = Path(__file__).parent.parent / "templates"  # the chat templates shipped with the package


def bundled_template(name: str = "docev_chatml") -> str:
    return (TEMPLATE_DIR / f"{name}.jinja").read_text()


# Markers around generation output; unprintable so no real text collides (checked on input anyway).
_BEGIN, _END = "\x00\x02docev-generation\x02\x00", "\x00\x03docev-generation\x03\x00"


class ChatTemplateError(ValueError):
    """A template that cannot compile or render; names the template."""


class _GenerationExtension(Extension):
    """``{% generation %}`` … ``{% endgeneration %}``: wraps the block's output in markers."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_wrap"), [], [], body).set_lineno(lineno)

    def _wrap(self, caller) -> str:
        return f"{_BEGIN}{caller()}{_END}"


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationExtension, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


@dataclass(frozen=True)
class Rendered:
    """Rendered text and the character spans ``[start, end)`` of its ``{% generation %}`` blocks."""

    text: str
    spans: tuple[tuple[int, int], ...]


class ChatTemplate:
    """A compiled chat template. ``render`` takes transformers-style message dicts."""

    def __init__(self, source: str, name: str = "<inline>"):
        self.source, self.name = source, name
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template {name}: line {exc.lineno}: {exc.message}") from exc

    def __reduce__(self):
        # compiled Jinja code does not pickle; DataLoader / process-pool workers recompile from source
        return ChatTemplate, (self.source, self.name)

    def render(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Rendered:
        """Render ``messages``; extra keyword arguments (``add_generation_prompt``, ``add_vision_id``,
        ``bos_token`` …) are template variables."""
        for text in _strings(messages):
            if "\x00" in text and (_BEGIN in text or _END in text):
                raise ChatTemplateError("message text contains the generation marker; refusing to render")
        try:
            raw = self._template.render(messages=messages, **kwargs)
        except jinja2.exceptions.SecurityError as exc:
            raise ChatTemplateError(f"chat template {self.name}: refused by the sandbox: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template {self.name}: {exc}") from exc
        return _split_markers(raw, self.name)


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def _split_markers(raw: str, name: str) -> Rendered:
    """Remove the markers; their positions in the remaining text become the spans."""
    text, spans, pos, start, length = [], [], 0, None, 0
    while True:
        nxt = raw.find(_END if start is not None else _BEGIN, pos)
        other = raw.find(_BEGIN if start is not None else _END, pos)
        if other != -1 and (nxt == -1 or other < nxt):
            raise ChatTemplateError(f"chat template {name}: nested or unbalanced {{% generation %}} blocks")
        if nxt == -1:
            break
        text.append(raw[pos:nxt])
        length += nxt - pos
        if start is None:
            start = length
        else:
            spans.append((start, length))
            start = None
        pos = nxt + len(_BEGIN)  # both markers have the same length
    text.append(raw[pos:])
    return Rendered("".join(text), tuple(spans))


def resolve_chat_template(spec: str) -> ChatTemplate:
    """A bundled template name (``docev_chatml``, a file in ``docev/templates``) or inline Jinja2 source."""
    if "{" not in spec and (TEMPLATE_DIR / f"{spec}.jinja").is_file():
        return ChatTemplate(bundled_template(spec), name=spec)
    if "{" not in spec:
        bundled = sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))
        raise ChatTemplateError(f"chat_template {spec!r} is neither a bundled template ({bundled}) nor Jinja2 source")
    return ChatTemplate(spec)


def token_loss_mask(
    offsets: Sequence[tuple[int, int]],
    token_ids: Sequence[int],
    spans: Sequence[tuple[int, int]],
    stop_token_ids: Iterable[int],
) -> list[bool]:
    """True for tokens overlapping a generation span, and for the first stop token after each span
    (before the next span starts) — the turn's closing ``<|im_end|>``."""
    stops = set(stop_token_ids)
    mask = [False] * len(token_ids)
    k, n = 0, len(token_ids)
    for i, (start, end) in enumerate(spans):
        while k < n and offsets[k][1] <= start:  # tokens before the span
            k += 1
        while k < n and offsets[k][0] < end:  # tokens overlapping it
            mask[k] = True
            k += 1
        limit = spans[i + 1][0] if i + 1 < len(spans) else None
        for j in range(k, n):
            if limit is not None and offsets[j][0] >= limit:
                break
            if token_ids[j] in stops:
                mask[j] = True
                break
    return mask
