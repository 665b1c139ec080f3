"""Bounded parsing: no single record can crash validate or exhaust its memory. A 50 MB line, JSON nested
100,000 deep and a ``meta`` nested 2,000 deep are rejects with their reason; the jsonl reader is fuzzed with
hypothesis, and the inputs that once crashed it are kept below as explicit examples (the corpus)."""

from __future__ import annotations

import io
import json
import shutil

from conftest import CONFIGS
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from docev.config import DatasetSource
from docev.sources.readers import MAX_JSON_DEPTH, RawRecord, bounded_lines, plan_units, read_unit
from docev.validate.rules import Limits, Reject, check_record


def test_bounded_lines_never_hold_a_line_past_the_limit():
    data = b"short\n" + b"x" * 5000 + b"\n" + b"y" * 100 + b"\n" + b"z" * 5000  # the last line has no newline
    got = list(bounded_lines(io.BytesIO(data), 1024))
    assert got == [(b"short\n", 6), (None, 5001), (b"y" * 100 + b"\n", 101), (None, 5000)]
    assert list(bounded_lines(io.BytesIO(b"a" * 1024 + b"\n"), 1024)) == [(b"a" * 1024 + b"\n", 1025)]


def test_nesting_is_measured_without_recursion_and_bounded():
    from docev.sources.readers import Unit, json_depth_over, parse_line

    assert not json_depth_over({"a": [1, {"b": []}]}, 4) and json_depth_over({"a": [1, {"b": []}]}, 3)
    deep = json.loads("[" * 900 + "]" * 900)  # decodes, but checking it recursively would overflow the stack
    assert json_depth_over(deep, MAX_JSON_DEPTH)
    line = b'{"id": "x", "context": [], "meta": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    unit = Unit("fuzz", "data.jsonl", 0, 10)
    raw = parse_line(SOURCE, unit, 6, 0, line)
    assert raw.error == ("too_deep", f"line 7: JSON nested deeper than {MAX_JSON_DEPTH} levels") and raw.data is None
    ok = parse_line(SOURCE, unit, 0, 0, b'{"id": "x", "meta": [[]]}')
    assert ok.error is None and ok.data["meta"] == [[]]


def test_a_huge_line_and_deep_nesting_are_rejects_and_validate_exits_0(tmp_path, tiny_checkpoint, synth_sources):
    from docev.cli import main

    src = tmp_path / "src"
    shutil.copytree(synth_sources["instruct"], src)
    good = (src / "data.jsonl").read_bytes()
    huge = json.dumps({"id": "huge", "context": [{"role": "user", "content": "a" * (50 << 20)}]}).encode()
    deep = b"[" * 100_000 + b"]" * 100_000
    meta = b'{"id": "deep-meta", "meta": ' + b'{"m": ' * 2000 + b"1" + b"}" * 2000 + b"}"
    (src / "data.jsonl").write_bytes(good + huge + b"\n" + deep + b"\n" + meta + b"\n")
    out = tmp_path / "out"
    datasets = json.dumps([{"source": str(src), "name": "big"}])
    code = main(["validate", "--config", str(CONFIGS / "tiny.yaml"), f"output_dir={out}", "synthetic=null",
                 f"tokenizer.model_name_or_path={tiny_checkpoint}", f"datasets={datasets}",
                 "validate.max_reject_fraction=0.2", "validate.thumbnails=0"])  # fmt: skip
    assert code == 0
    rejects = [json.loads(line) for line in (out / "validate" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["row"], r["file"]) for r in rejects] == [
        ("line_too_long", 20, "data.jsonl"),
        ("too_deep", 21, "data.jsonl"),
        ("too_deep", 22, "data.jsonl"),
    ]
    assert f"line 21 is {len(huge) + 1} bytes, over validate.max_line_bytes={16 << 20}" in rejects[0]["detail"]
    assert len(rejects[0]["record"]) < 2000 and rejects[0]["record"].startswith('{"id": "huge"')  # a preview
    assert rejects[1]["detail"] == f"line 22: JSON nested deeper than {MAX_JSON_DEPTH} levels"
    assert rejects[2]["detail"].startswith("line 23:") and rejects[2]["record"].startswith('{"id": "deep-meta"')
    report = json.loads((out / "validate" / "report.json").read_text())["sources"]["big"]
    assert (report["read"], report["accepted"], report["rejected"]) == (23, 20, 3)


# --- fuzzing the reader and the rules: anything read is a record or a reject, never an exception ---

SOURCE = DatasetSource(source="/nonexistent", name="fuzz")
FUZZ_LINE_LIMIT = 1 << 16
LIMITS = Limits(min_image_size=14, max_image_pixels=1 << 24, max_seq_len=4096)

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
_json = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                     max_size=4), max_leaves=30)  # fmt: skip
_roles = st.sampled_from(["user", "assistant", "system", "robot", 7, None])
_content = st.text(max_size=30) | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["image", "text", "video", 3])}, optional={"text": _json}),
    max_size=3,
)
_message = st.fixed_dictionaries({}, optional={"role": _roles, "content": _content | _json})
# records shaped like UFX, with any part of them replaced by arbitrary JSON
_record = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=6) | _json,
        "context": st.lists(_message, max_size=4) | _json,
        "text": st.text(max_size=20) | _json,
        "image_files": st.lists(st.text(max_size=8), max_size=3) | _json,
        "meta": _json,
    },
)
_line = st.one_of(
    _record.map(lambda r: json.dumps(r).encode()),
    _json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ")),
)


def _fetch(name: str) -> tuple[str, bytes | BaseException]:
    return name, FileNotFoundError(name)  # every image missing: the record is rejected for it, not crashed


def _count(record, sizes) -> dict[int, int]:
    return {2: len(record.model_dump_json())}


def _read_all(lines: list[bytes], tmp_path) -> list[RawRecord]:
    (tmp_path / "data.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    src = SOURCE.model_copy(update={"source": str(tmp_path)})
    units = plan_units(src, chunk_rows=3, max_line_bytes=FUZZ_LINE_LIMIT)
    return [raw for unit in units for raw in read_unit(src, unit, max_line_bytes=FUZZ_LINE_LIMIT)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_line, min_size=1, max_size=6))
# the corpus: inputs that crashed the reader or the rules before they were bounded (issue 25)
@example([b"[" * 5000 + b"]" * 5000])
@example([b'{"id": "m", "meta": ' + b'{"a": ' * 1500 + b"1" + b"}" * 1500 + b"}"])
@example([b'{"id": "m", "context": [], "meta": ' + b"[" * 900 + b"]" * 900 + b"}"])  # decodes; deep for the rules
@example([b'{"id": "x", "context": [{"role": "user", "content": [{"type": "text", "text": ' + b"[" * 40 + b"]" * 40
          + b"}]}]}"])  # fmt: skip
@example([b"\xff\xfe", b"", b"null", b'"\\ud800"', b"1e999"])
@example([b"x" * (FUZZ_LINE_LIMIT + 1), b'{"id": "after-a-long-line", "context": []}'])
@example([b'{"id": "nul\\u0000", "context": [{"role": "assistant", "content": "\\udc00"}]}'])
def test_fuzz_every_line_is_a_record_or_a_reject(tmp_path, lines):
    records = _read_all(lines, tmp_path)
    assert [r.row for r in records] == list(range(len(lines)))  # one record per line, none lost
    for raw in records:
        if raw.error is not None:
            assert raw.data is None and raw.error[0] in ("invalid_json", "invalid_utf8", "too_deep",
                                                         "wrong_type", "line_too_long")  # fmt: skip
            continue
        try:
            check_record(raw.data, _fetch, "instruction", LIMITS, _count)
        except Reject as rej:
            assert rej.field != "None" and rej.detail
