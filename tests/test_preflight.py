"""Preflight: each CLI step checks what it needs before any work; a miss is one line naming what is missing and
the command that makes it, with exit code 3 (deterministic: not worth a retry)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import CONFIGS

from docev.cli import main
from docev.preflight import PREFLIGHT_EXIT

NOISE = ("Skipping import of cpp extensions", "Warning: Detected no triton")  # torchao's import-time logging


def _args(out: Path, ckpt: Path, datasets: list[dict], *extra: str) -> list[str]:
    return ["--config", str(CONFIGS / "tiny.yaml"), f"output_dir={out}", f"tokenizer.model_name_or_path={ckpt}",
            "synthetic=null", f"datasets={json.dumps(datasets)}", "validate.thumbnails=0", *extra]  # fmt: skip


def _err(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith(NOISE)]


def test_run_without_a_base_checkpoint_is_one_line_naming_init_checkpoint(tmp_path, synth_sources, capsys):
    missing = tmp_path / "models" / "base"
    datasets = [{"source": str(synth_sources["instruct"]), "name": "instruct"}]
    assert main(["run", *_args(tmp_path / "out", missing, datasets)]) == PREFLIGHT_EXIT
    err = _err(capsys)
    assert err == [f"docev run: base checkpoint and tokenizer {missing}: not found; make a tiny one with "
                   f"`docev init-checkpoint --out {missing}` or point checkpointer.checkpoint_dir at a DocEV HF "
                   "checkpoint"]  # fmt: skip
    assert not (tmp_path / "out" / "pipeline").exists()  # kfp.local never started


def test_train_before_preprocess_names_docev_preprocess(tmp_path, tiny_checkpoint, synth_sources, capsys):
    datasets = [{"source": str(synth_sources["instruct"]), "name": "instruct"}]
    assert main(["train", *_args(tmp_path / "out", tiny_checkpoint, datasets)]) == PREFLIGHT_EXIT
    err = _err(capsys)
    assert len(err) <= 5 and err == [
        f"docev train: no training shards at {tmp_path / 'out' / 'shards' / 'manifest.json'}; "
        "run `docev preprocess --config …` first"
    ]


def test_a_tokenizer_without_tokenizer_json_is_named(tmp_path, tiny_checkpoint, synth_sources, capsys):
    """The data steps read the tokenizer from tokenizer.json alone (no transformers to convert other forms)."""
    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(tiny_checkpoint / "tokenizer_config.json", tok)
    datasets = [{"source": str(synth_sources["instruct"]), "name": "instruct"}]
    assert main(["validate", *_args(tmp_path / "out", tok, datasets)]) == PREFLIGHT_EXIT
    assert _err(capsys) == [f"docev validate: tokenizer {tok}: no tokenizer.json; make a tiny one with `docev "
                            f"init-checkpoint --out {tok}` or point tokenizer.model_name_or_path at a DocEV HF "
                            "checkpoint"]  # fmt: skip


def test_preprocess_before_validate_and_after_a_failed_validate(tmp_path, tiny_checkpoint, synth_sources, capsys):
    src = tmp_path / "src"
    shutil.copytree(synth_sources["instruct"], src)
    with (src / "data.jsonl").open("a") as fh:
        fh.write('{"id": "broken"\n{"id": "also broken"\n')
    args = _args(tmp_path / "out", tiny_checkpoint, [{"source": str(src), "name": "mixed"}])
    assert main(["preprocess", *args]) == PREFLIGHT_EXIT
    manifest = tmp_path / "out" / "validate" / "manifest.jsonl"
    assert _err(capsys) == [f"docev preprocess: no validated records at {manifest}; run `docev validate --config …` "
                            "first"]  # fmt: skip
    assert main(["evaluate", *args]) == PREFLIGHT_EXIT  # its held-out questions come from validate too
    assert _err(capsys) == [f"docev evaluate: no validated records at {manifest}; run `docev validate --config …` "
                            "first"]  # fmt: skip
    assert main(["validate", *args]) == 1  # 2 of 22 rejected: above tiny.yaml's 5%
    capsys.readouterr()
    assert main(["preprocess", *args]) == PREFLIGHT_EXIT
    report = tmp_path / "out" / "validate" / "report.md"
    assert _err(capsys) == [f"docev preprocess: validate failed (mixed rejected 9.1%; max_reject_fraction 5.0%): see "
                            f"{report}; fix the data or the config and rerun `docev validate`"]  # fmt: skip
    assert not (tmp_path / "out" / "shards").exists()


def test_an_empty_source_stops_validate_with_one_line_naming_it(tmp_path, tiny_checkpoint, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.jsonl").write_bytes(b"")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    datasets = [{"source": str(empty), "name": "empty"}, {"source": str(nothing), "name": "nothing"}]
    assert main(["validate", *_args(tmp_path / "out", tiny_checkpoint, datasets)]) == PREFLIGHT_EXIT
    assert _err(capsys) == [
        f"docev validate: source empty ({empty}): every data file is empty (0 bytes); nothing to train on",
        f"docev validate: source nothing: UFX source {nothing}: no *.jsonl, *.parquet or save_to_disk dataset found",
    ]
    assert not (tmp_path / "out" / "validate").exists()


def test_a_source_with_no_rows_fails_validate_naming_it(tmp_path, tiny_checkpoint):
    """Past the preflight (the file has bytes, a parquet schema), zero rows read is still a failure."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import tiny_config

    from docev.validate.runner import ValidationFailed, run_validate

    src = tmp_path / "rows0"
    src.mkdir()
    pq.write_table(pa.table({"id": pa.array([], pa.string())}), src / "data.parquet")
    cfg = tiny_config(tmp_path / "out", tiny_checkpoint, [{"source": str(src), "name": "rows0"}])
    with pytest.raises(ValidationFailed, match=rf"^no records read from source rows0 \({src}\)"):
        run_validate(cfg, workers=1)


def test_s3_without_credentials_names_the_url(tmp_path, tiny_checkpoint, monkeypatch):
    from conftest import tiny_config

    from docev.preflight import check

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg = tiny_config(tmp_path / "out", tiny_checkpoint, [{"source": "s3://ufx-bucket/docs", "name": "docs"}])
    problems = check(cfg, "validate")
    assert len(problems) == 1 and problems[0].startswith("source docs: s3://ufx-bucket/docs: no S3 credentials found")
    assert check(cfg, "preprocess")[0].startswith("s3://ufx-bucket/docs: no S3 credentials found")


def test_an_unwritable_output_dir_is_named(tmp_path, tiny_checkpoint, synth_sources):
    from conftest import tiny_config

    from docev.preflight import check

    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "run"  # under a file: no folder can be made there
    cfg = tiny_config(out, tiny_checkpoint, [{"source": str(synth_sources["instruct"]), "name": "instruct"}])
    assert check(cfg, "validate") == [f"output_dir {out}: not writable (Not a directory)"]
    assert not list(tmp_path.glob("**/.docev-preflight-*"))


def test_overrides_are_taken_anywhere_on_the_line(tmp_path, tiny_checkpoint, capsys):
    """``key=value`` after an option is an override, not 'unrecognized arguments'."""
    args = ["config", "validate", str(CONFIGS / "tiny.yaml"), "epochs=3"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 3
    shards = tmp_path / "out"
    argv = ["tokens", "--config", str(CONFIGS / "tiny.yaml"), "tokenizer.tile_size=56", "--size", "112x112",
            "tokenizer.max_num_tiles=4", f"output_dir={shards}"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["grid"] == [2, 2]  # tile 56 applied, after --size
