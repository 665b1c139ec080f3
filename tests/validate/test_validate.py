import json
from collections import Counter

import pytest
from conftest import tiny_config
from corpus import LINE_LIMIT, build

from docev.validate.rules import REASONS
from docev.validate.runner import ValidationFailed, merge, run_shard, run_validate, validate_dir


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected = build(root / "src", root / "outside")
    return root / "src", expected


def _cfg(tmp_path, ckpt, src, *overrides):
    return tiny_config(
        tmp_path / "out",
        ckpt,
        [{"source": str(src), "name": "corrupt"}],
        "validate.max_reject_fraction=1.0",
        "validate.max_image_pixels=4000000",
        f"validate.max_line_bytes={LINE_LIMIT}",
        *overrides,
    )


def _outcome(out):
    """record key -> reason (or 'accepted'); lines that are not JSON are keyed by their line number."""
    got = {}
    for e in _lines(out / "manifest.jsonl"):
        got.setdefault(e["id"], []).append("accepted")
    for e in _lines(out / "rejects.jsonl"):
        key = e["id"] if e["id"] else f"row{e['row']}"
        got.setdefault(key, []).append(e["reason"])
    return got


def test_every_record_lands_with_its_reason(tmp_path, tiny_checkpoint, corpus):
    src, expected = corpus
    cfg = _cfg(tmp_path, tiny_checkpoint, src)
    report = run_validate(cfg, workers=1)
    out = validate_dir(cfg)
    got = _outcome(out)
    # lines that are no JSON object are found by their row; each must be there with its reason
    rows = {f"row{i}": tag for i, tag in enumerate(expected) if tag.startswith("line:")}
    missing = sorted(tag for key, tag in rows.items() if key not in got)
    assert not missing, f"corpus reject rows not in rejects.jsonl: {missing}"
    for key, tag in rows.items():
        assert got[key] == [expected[tag]], tag
    assert got["dup"] == ["accepted", "duplicate_id"]
    for key, reason in expected.items():
        if key.startswith(("line:", "dup:")):
            continue
        assert got[key] == [reason], key
    assert set(got) == {*rows, "dup", *(k for k in expected if not k.startswith(("line:", "dup:")))}
    # every reject code of the validator appears, and the invariant holds
    s = report["sources"]["corrupt"]
    assert s["read"] == len(expected) == s["accepted"] + s["rejected"]
    assert s["accepted"] == sum(v == "accepted" for v in expected.values())
    assert set(s["reasons"]) == set(REASONS)
    assert s["reasons"] == Counter(v for v in expected.values() if v != "accepted")
    # images in odd modes are normalised and counted, not rejected
    assert {"CMYK", "P", "I;16", "LA", "RGBA", "exif_rotated"} <= set(s["image_modes"])


def test_rejects_keep_the_original_record_and_detail(tmp_path, tiny_checkpoint, corpus):
    src, _ = corpus
    cfg = _cfg(tmp_path, tiny_checkpoint, src)
    run_validate(cfg, workers=1)
    rejects = {(r["id"] or f"row{r['row']}"): r for r in _lines(validate_dir(cfg) / "rejects.jsonl")}
    assert rejects["role"]["field"] == "context.0.role" and rejects["role"]["record"]["context"][0]["role"] == "robot"
    assert rejects["escape-link"]["field"] == "image_files.0" and "outside" in rejects["escape-link"]["detail"]
    assert "3600000000 pixels" in rejects["bomb"]["detail"]
    assert rejects["nul"]["field"] == "context.1.content"
    invalid_json = next(r for r in rejects.values() if r["reason"] == "invalid_json")
    assert invalid_json["record"].startswith('{"id": "broken"') and invalid_json["file"] == "data.jsonl"
    dup = rejects["dup"]
    assert dup["reason"] == "duplicate_id" and dup["record"]["context"][1]["content"] == "$9"
    first_dup = next(e for e in _lines(validate_dir(cfg) / "manifest.jsonl") if e["id"] == "dup")
    assert dup["detail"] == f"id 'dup' first accepted at data.jsonl line {first_dup['row'] + 1}"


def test_reject_messages_name_file_line_record_field_and_every_image(tmp_path, tiny_checkpoint, corpus):
    src, expected = corpus
    cfg = _cfg(tmp_path, tiny_checkpoint, src)
    run_validate(cfg, workers=1)
    out = validate_dir(cfg)
    all_rejects = _lines(out / "rejects.jsonl")
    lines = (src / "data.jsonl").read_bytes().split(b"\n")
    whole_line = {"invalid_json", "invalid_utf8", "too_deep", "line_too_long"}
    for r in all_rejects:
        assert r["file"] == "data.jsonl" and r["line"] == r["row"] + 1  # 1-based for people, 0-based position
        if r["id"]:  # the record named is the one on that line
            assert f'"id": "{r["id"]}"'.encode() in lines[r["row"]], r
        if r["reason"] in whole_line or (r["reason"] == "wrong_type" and r["id"] is None):
            assert r["field"] is None and f"line {r['line']}" in r["detail"], r
        else:
            assert r["field"] and r["field"] != "None", r
    rejects = {r["id"]: r for r in all_rejects if r["id"]}
    # sizes as width × height in px; every image of the record listed, the field naming the one at fault
    assert rejects["wide"]["detail"] == f"{src / 'images' / 'wide.png'}: 3000×2000 px = 6000000 pixels > 4000000"
    two = rejects["two-pages"]
    assert two["field"] == "image_files.1" and two["images"] == ["images/ok.png", "images/tiny.png"]
    assert two["detail"] == f"{src / 'images' / 'tiny.png'}: 10×10 px, a side below 14 px"
    assert rejects["bad-notimage"]["detail"].endswith("notimage.png: not an image format PIL can read (unknown header)")
    assert (
        rejects["loop"]["field"] == "image_files.0"
        and "images/loop-a.png: Too many levels" in rejects["loop"]["detail"]
    )
    assert rejects["long"]["field"] == "context" and rejects["missing"]["field"] == "context"
    assert rejects["mismatch"]["field"] == "image_files"
    md = (out / "report.md").read_text()
    assert "field None" not in md and "field `None`" not in md and "the image bytes" not in md
    assert "Line numbers count from 1" in md
    bad = rejects["bad-empty"]
    assert f"corrupt data.jsonl line {bad['line']} record 'bad-empty' field `image_files.0`, images images/empty.png: "\
        in md  # fmt: skip
    assert "data.jsonl line" in md and "(the whole line)" in md
    assert "80×60 px" in md  # a thumbnail's caption: width × height


def test_manifest_finds_records_again_and_counts_tokens(tmp_path, tiny_checkpoint, corpus):
    from docev.sources.readers import read_at

    src, _ = corpus
    cfg = _cfg(tmp_path, tiny_checkpoint, src)
    run_validate(cfg, workers=1)
    for entry in _lines(validate_dir(cfg) / "manifest.jsonl"):
        raw = read_at(cfg.datasets[0], entry["file"], entry["row"], entry["offset"])
        assert raw.data["id"] == entry["id"]
        assert set(entry["tokens"]) == {"2", "3"} and entry["tokens"]["3"] <= entry["tokens"]["2"]
        if entry["id"] == "good-exif_rotated":
            assert entry["images"][0]["size"] == [90, 40]  # EXIF orientation applied to the header size


def test_reject_policy_fails_the_step_after_writing_reports(tmp_path, tiny_checkpoint, corpus):
    src, _ = corpus
    cfg = _cfg(tmp_path, tiny_checkpoint, src, "validate.max_reject_fraction=0.1")
    with pytest.raises(ValidationFailed, match="corrupt"):
        run_validate(cfg, workers=1)
    out = validate_dir(cfg)
    report = json.loads((out / "report.json").read_text())
    assert report["failed_sources"]["corrupt"] > 0.1
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "path_escape" in md and "data:image/png;base64," in page and "image_too_large" in page
    # the verdict first: a failing banner naming the source over the limit, before any table
    read = sum(s["read"] for s in report["sources"].values())
    rejected = sum(s["rejected"] for s in report["sources"].values())
    share = report["failed_sources"]["corrupt"]
    banner = (f"FAIL: {read - rejected} of {read} records accepted, {rejected} rejected ({rejected / read:.1%}); "
              f"above the limit of 10.0% (validate.max_reject_fraction): corrupt {share:.1%}.")  # fmt: skip
    assert md.splitlines()[2].startswith(f"> **{banner}")
    assert page.index(f"<div class='verdict fail'>{banner}") < page.index("<table>")
    passing = _cfg(tmp_path / "pass", tiny_checkpoint, src, "validate.max_reject_fraction=0.99")
    run_validate(passing, workers=1)
    md = (validate_dir(passing) / "report.md").read_text()
    assert md.splitlines()[2].startswith(f"> **PASS: {read - rejected} of {read} records accepted")
    assert "<div class='verdict pass'>PASS: " in (validate_dir(passing) / "report.html").read_text()
    for line in (ln for ln in md.splitlines() if ln.startswith("![")):
        assert (out / line.split("](")[1].split(")")[0]).is_file()


def test_workers_and_shards_give_the_same_result(tmp_path, tiny_checkpoint, corpus, monkeypatch):
    import docev.sources.readers as readers

    monkeypatch.setattr(readers, "CHUNK_ROWS", 5)  # several units, so workers and shards really split
    src, _ = corpus
    one = _cfg(tmp_path / "one", tiny_checkpoint, src)
    run_validate(one, workers=1)
    two = _cfg(tmp_path / "two", tiny_checkpoint, src)
    run_validate(two, workers=2)
    sharded = _cfg(tmp_path / "sharded", tiny_checkpoint, src)
    for i in range(3):
        run_shard(sharded, i, 3, workers=1)
    merge(sharded, 3)
    for other in (two, sharded):
        for name in ("manifest.jsonl", "rejects.jsonl"):
            assert (validate_dir(one) / name).read_text() == (validate_dir(other) / name).read_text(), name


def test_merge_refuses_missing_shards(tmp_path, tiny_checkpoint, corpus):
    src, _ = corpus
    cfg = _cfg(tmp_path, tiny_checkpoint, src)
    run_shard(cfg, 0, 2, workers=1)
    with pytest.raises(FileNotFoundError, match="00001-of-00002"):
        merge(cfg, 2)


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_arrow_sources_with_remapped_columns(tmp_path, tiny_checkpoint, fmt):
    import datasets

    from docev.synth import synth_data

    src = synth_data(tmp_path / "syn", 6, seed=5, fmt=fmt, workers=1)["instruct"]
    # rename the columns as another team's export would, and point the source at them
    if fmt == "parquet":
        ds = datasets.Dataset.from_parquet(str(src / "data.parquet"))
        (src / "data.parquet").unlink()
        ds.rename_columns({"context": "messages", "image_files": "pages"}).to_parquet(str(src / "data.parquet"))
    else:
        ds = datasets.load_from_disk(str(src / "hf")).rename_columns({"context": "messages", "image_files": "pages"})
        ds.save_to_disk(str(src / "hf2"))
        import shutil

        shutil.rmtree(src / "hf")
    cfg = tiny_config(
        tmp_path / "out",
        tiny_checkpoint,
        [{"source": str(src), "name": fmt, "context_col": "messages", "image_files_col": "pages"}],
    )
    report = run_validate(cfg, workers=1)
    assert report["sources"][fmt]["accepted"] == 6 and report["sources"][fmt]["rejected"] == 0


def test_synthetic_sources_pass(tmp_path, tiny_checkpoint, synth_sources):
    cfg = tiny_config(
        tmp_path / "out",
        tiny_checkpoint,
        [
            {"source": str(synth_sources["instruct"]), "name": "instruct"},
            {
                "source": str(synth_sources["pretrain"]),
                "name": "pretrain",
                "ufx_type": "pretrain",
                "context_col": "text",
            },
        ],
    )
    report = run_validate(cfg, workers=1)
    assert {n: (s["accepted"], s["rejected"]) for n, s in report["sources"].items()} == {
        "instruct": (20, 0),
        "pretrain": (5, 0),
    }


def test_new_system_prompt_is_counted(tmp_path, tiny_checkpoint, synth_sources):
    def tokens(tag, **extra):
        cfg = tiny_config(tmp_path / tag, tiny_checkpoint, [{"source": str(synth_sources["instruct"]), **extra}])
        run_validate(cfg, workers=1)
        return {e["id"]: e["tokens"]["2"] for e in _lines(validate_dir(cfg) / "manifest.jsonl")}

    plain = tokens("plain")
    prompted = tokens("prompted", new_system_prompt="Answer with the exact text printed on the page.")
    assert all(prompted[i] > plain[i] for i in plain)
