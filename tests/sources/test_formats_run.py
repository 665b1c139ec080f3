"""Sources in other tools' formats go through the whole run: a hand-written LLaVA JSON file, a messages + images
parquet with embedded image bytes, a ShareGPT jsonl (training) and a DocVQA-style QA set saved with
``datasets.save_to_disk`` (evaluation) validate, preprocess, train a few steps (one shared tiny run) and
evaluate; one row breaking each format is rejected with its original field named."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config

from docev.cli import main
from docev.data.preprocess import run_preprocess
from docev.evaluation.questions import eval_questions
from docev.validate.runner import run_validate, validate_dir


def said(who, value):
    return {"from": who, "value": value}


def _pages(synth_sources) -> list[Path]:
    return sorted((synth_sources["instruct"] / "images").glob("*"))


def _llava(root: Path, pages: list[Path]) -> None:
    (root / "images").mkdir(parents=True)
    for p in pages[:3]:
        shutil.copy(p, root / "images" / p.name)
    a, b, c = (f"images/{p.name}" for p in pages[:3])
    rows = [
        {"id": "llava-1", "image": a, "conversations": [said("human", "<image>\nWhat kind of document is this?"),
                                                        said("gpt", "form")]},
        {"id": "llava-2", "images": [b, c], "conversations": [said("human", "<image>\n<image>\nHow many pages?"),
                                                              said("gpt", "two"), said("human", "Which is first?"),
                                                              said("gpt", "the invoice")]},
        {"id": "llava-3", "conversations": [said("human", "Say hello."), said("gpt", "hello")]},  # text only
        {"id": "llava-bad", "image": a, "conversations": [said("human", "<image>\nQ"), said("bot", "A")]},
    ]  # fmt: skip
    (root / "train.json").write_text(json.dumps(rows, indent=1))


def _messages(root: Path, pages: list[Path]) -> None:
    root.mkdir(parents=True)
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    schema = pa.schema([
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(part))]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ])  # fmt: skip

    def row(question, answer, image):
        user = [{"type": "image", "text": None}, {"type": "text", "text": question}]
        return {"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                "images": [image]}  # fmt: skip

    rows = [row(f"What is on page {i}?", f"page {i}", {"bytes": p.read_bytes(), "path": None})
            for i, p in enumerate(pages[3:6])]  # fmt: skip
    rows.append(row("Broken?", "yes", {"bytes": b"not an image at all", "path": "broken.png"}))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "train.parquet")


def _sharegpt(root: Path, pages: list[Path]) -> None:
    (root / "images").mkdir(parents=True)
    shutil.copy(pages[6], root / "images" / pages[6].name)
    good = {"system": "Answer briefly.", "images": [f"images/{pages[6].name}"],
            "conversations": [said("human", "<image>Name the document."), said("gpt", "a receipt")]}  # fmt: skip
    bad = {"images": [], "conversations": [said("human", "<image>Name it."), said("gpt", "x")]}
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in (good, {**good, "id": "sg-2"}, bad)) + "\n")


def _qa(root: Path, pages: list[Path]) -> None:
    import datasets

    features = datasets.Features({
        "questionId": datasets.Value("int64"), "question": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")), "image": datasets.Image(),
        "question_types": datasets.Sequence(datasets.Value("string")), "docId": datasets.Value("int64"),
    })  # fmt: skip
    rows = {"questionId": [101, 102, 103], "question": ["What is the total?", "Who issued it?", "Empty?"],
            "answers": [["$44.45", "44.45"], ["Acme", "ACME Corp"], []],
            "question_types": [["figure/diagram"], ["layout"], ["other"]],
            "image": [{"bytes": p.read_bytes(), "path": p.name} for p in pages[7:10]], "docId": [1, 2, 3]}  # fmt: skip
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root))


@pytest.fixture(scope="module")
def formats_run(tmp_path_factory, tiny_checkpoint, synth_sources):
    """Validated and preprocessed sources of every format, then a 2-step training run on them."""
    base = tmp_path_factory.mktemp("formats")
    pages = _pages(synth_sources)
    _llava(base / "llava", pages)
    _messages(base / "messages", pages)
    _sharegpt(base / "sharegpt", pages)
    _qa(base / "docvqa", pages)
    data = [{"source": str(base / "llava"), "formatting": "llava"},
            {"source": str(base / "messages"), "formatting": "messages"},
            {"source": str(base / "sharegpt"), "formatting": "sharegpt"}]  # fmt: skip
    qa = [{"source": str(base / "docvqa"), "formatting": "qa"}]
    cfg = tiny_config(base / "run", tiny_checkpoint, data, f"eval_datasets={json.dumps(qa)}", "max_steps_per_epoch=2",
                      "validate.max_reject_fraction=0.5", "train.nproc_per_node=1", "evaluate.max_new_tokens=4",
                      "preprocess.records_per_shard=4")  # fmt: skip
    report = run_validate(cfg, workers=1)
    run_preprocess(cfg, workers=1)
    cfg_file = base / "config.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    done = subprocess.run([sys.executable, "-m", "docev.cli", "train", "--config", str(cfg_file)], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return cfg, cfg_file, report


def test_every_format_validates_with_its_rejects_named_in_its_own_fields(formats_run):
    cfg, _, report = formats_run
    counts = {n: (s["accepted"], s["rejected"]) for n, s in report["sources"].items()}
    assert counts == {"llava": (3, 1), "messages": (3, 1), "sharegpt": (2, 1), "docvqa": (2, 1)}
    rejects = {r["source"]: r for r in map(json.loads, (validate_dir(cfg) / "rejects.jsonl").open())}
    want = {"llava": ("unknown_role", "conversations.1.from"), "messages": ("image_undecodable", "images.0"),
            "sharegpt": ("placeholder_mismatch", "images"), "docvqa": ("wrong_type", "answers")}  # fmt: skip
    assert {s: (r["reason"], r["field"]) for s, r in rejects.items()} == want
    # the reject holds the row as the source stores it (embedded bytes shown by their size)
    assert rejects["llava"]["record"]["conversations"][1] == {"from": "bot", "value": "A"}
    assert rejects["messages"]["record"]["images"][0]["bytes"] == "<19 bytes>"
    ids = {e["id"] for e in map(json.loads, (validate_dir(cfg) / "manifest.jsonl").open()) if e["source"] == "sharegpt"}
    assert ids == {"chat.jsonl:0", "sg-2"}  # a row without an id is named by its position
    md = (validate_dir(cfg) / "report.md").read_text()
    assert "field `conversations.1.from`" in md and "field `images.0`" in md


def test_every_format_trains_and_the_qa_set_evaluates(formats_run, capsys):
    cfg, cfg_file, _ = formats_run
    shards = json.loads((Path(cfg.output_dir) / "shards" / "manifest.json").read_text())
    assert shards["sources"] == {"llava": 3, "messages": 3, "sharegpt": 2}  # every accepted row became a sample
    logged = [json.loads(x) for x in (cfg.work_root / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "loss" in m] == [1, 2]
    questions = list(eval_questions(cfg))
    assert [(q.id, q.answers, q.question_type) for q in questions] == [
        ("101", ["$44.45", "44.45"], "figure/diagram"), ("102", ["Acme", "ACME Corp"], "layout")]  # fmt: skip
    assert all(Path(q.images[0]).parent == Path(cfg.eval_datasets[0].embedded_images_dir) for q in questions)
    assert main(["evaluate", "--config", str(cfg_file), "--checkpoint", "latest"]) == 0
    tuned = Path(cfg.output_dir) / "eval" / "tuned"
    metrics = json.loads((tuned / "metrics.json").read_text())
    assert metrics["n"] == 2 and set(metrics["question_types"]) == {"figure/diagram", "layout"}
    assert {"relaxed_accuracy", "anls", "exact_match"} <= set(metrics)
    assert "| docvqa | 2 |" in (tuned / "report.md").read_text()
