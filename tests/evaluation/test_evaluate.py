"""docev evaluate: held-out questions → predictions.jsonl + metrics.json, through the CLI."""

import json
from pathlib import Path

import pytest
from conftest import tiny_config, write_adapter_step

from docev.cli import main
from docev.config import load_config
from docev.evaluation import evaluate as evaluate_module
from docev.evaluation.evaluate import evaluate
from docev.evaluation.questions import eval_questions, record_questions
from docev.run.checkpoints import write_best
from docev.validate.runner import run_validate


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_record_questions_multi_turn_with_meta(tmp_path):
    record = {
        "id": "r1",
        "image_files": ["p.png"],
        "context": [
            {"role": "user", "content": "<image>\nWho issued it?"},
            {"role": "assistant", "content": "Acme"},
            {"role": "user", "content": "Total?"},
            {"role": "assistant", "content": "12.50"},
        ],
        "meta": json.dumps({"answers": [["ACME Corp"], ["12.5", "12.50"]], "question_types": ["issuer", "total"]}),
    }
    q0, q1 = record_questions(record, "src", str(tmp_path), None)
    assert (q0.turn, q0.question, q0.question_type) == (0, "Who issued it?", "issuer")
    assert q0.answers == ["Acme", "ACME Corp"]
    assert (q1.turn, q1.question, q1.answers, q1.question_type) == (1, "Total?", ["12.50", "12.5"], "total")
    assert [m.role for m in q1.prompt] == ["user", "assistant", "user"] and q1.images == [str(tmp_path / "p.png")]
    assert q1.prompt[1].text_content == "Acme"  # the gold history, not the model's earlier answer


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint, synth_sources):
    data = [
        {"source": str(synth_sources["instruct"]), "name": "instruct", "eval_fraction": 0.4},
        {"source": str(synth_sources["pretrain"]), "name": "pretrain", "ufx_type": "pretrain",
         "context_col": "text", "eval_fraction": 0.5},
    ]  # fmt: skip
    out = tmp_path_factory.mktemp("evalrun")
    cfg = tiny_config(out, tiny_checkpoint, data, "evaluate.max_new_tokens=6", "evaluate.batch_size=3")
    run_validate(cfg, workers=1)
    return cfg


def test_evaluate_writes_predictions_and_metrics(run):
    questions = list(eval_questions(run))
    assert questions and {q.source for q in questions} == {"instruct"}  # pretraining records ask nothing
    metrics = evaluate(run, checkpoint="base")
    out = Path(run.output_dir) / "eval" / "base"
    rows = _lines(out / "predictions.jsonl")
    assert len(rows) == len(questions) == metrics["n"]
    assert set(rows[0]) >= {"id", "source", "turn", "question", "answers", "prediction", "anls", "exact"}
    assert [(r["id"], r["turn"]) for r in rows] == [(q.id, q.turn) for q in questions]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["label"] == "base" and saved["model"] and set(saved["sources"]) == {"instruct"}
    assert saved["anls"] == pytest.approx(sum(r["anls"] for r in rows) / len(rows))
    assert all(Path(p).is_file() for r in rows for p in r["images"])  # the sources live outside output_dir here
    one = evaluate(run.model_copy(update={"evaluate": run.evaluate.model_copy(update={"batch_size": 1})}),
                   checkpoint="base", label="b1")  # fmt: skip
    alone = [r["prediction"] for r in _lines(Path(run.output_dir) / "eval" / "b1" / "predictions.jsonl")]
    assert alone == [r["prediction"] for r in rows] and one["anls"] == metrics["anls"]


def _levenshtein(a: str, b: str) -> int:
    """Edit distance by the textbook dynamic programme (independent of the metrics module's rapidfuzz)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _anls(pred: str, golds: list[str]) -> float:
    """DocVQA ANLS of one question, written from its definition (Biten et al. 2019), τ = 0.5."""
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    best = 0.0
    for gold in golds:
        p, g = norm(pred), norm(gold)
        nl = _levenshtein(p, g) / max(len(p), len(g), 1)
        best = max(best, 1 - nl if nl < 0.5 else 0.0)
    return best


def _key(prompt) -> tuple:
    return tuple((m.role, m.text_content, tuple(str(c["content"]) for c in m.content if c["type"] == "image"))
                 for m in prompt)  # fmt: skip


class _Answers:
    """A stub generator: for the i-th held-out question, the gold answer (i % 3 == 0), the gold answer with its
    last character changed (i % 3 == 1: an ANLS between 0 and 1 unless the answer is short) or a wrong one."""

    dtype, device, model = None, "cpu", None

    def __init__(self, cfg):
        self.by_prompt = {_key(q.prompt): (i, q) for i, q in enumerate(eval_questions(cfg))}

    def encode(self, prompt, sampling_ratio):
        return prompt

    def prompt_length(self, prompt):
        return len(_key(prompt))

    def generate_encoded(self, prompts, **_):
        out = []
        for p in prompts:
            i, q = self.by_prompt[_key(p)]
            gold = q.answers[0]
            text = [gold, gold[:-1] + ("#" if gold[-1:] != "#" else "@"), "no idea at all"][i % 3]
            out.append(type("Generated", (), {"text": text}))
        return out


class _Lengths:
    """A stub generator whose prompt i is i tokens long plus a scrambled offset; records each batch's lengths."""

    def __init__(self, n):
        self.length = {i: (i * 37) % n for i in range(n)}
        self.batches = []

    def encode(self, prompt, sampling_ratio):
        return prompt

    def prompt_length(self, prompt):
        return self.length[prompt]

    def generate_encoded(self, prompts, **_):
        self.batches.append([self.length[p] for p in prompts])
        return [type("Generated", (), {"text": f" answer {p} "}) for p in prompts]


def test_batches_hold_prompts_of_similar_length():
    """Each window of batches is cut from its prompts sorted by length (little padding per batch); the answers
    come back in the questions' order."""
    from types import SimpleNamespace

    from docev.evaluation.evaluate import _WINDOW, answer_questions

    n, size = 40, 4
    questions = [SimpleNamespace(prompt=i, images=["page"] * (i % 3)) for i in range(n)]
    stub = _Lengths(n)
    answers = answer_questions(stub, questions, batch_size=size, max_new_tokens=4, sampling_ratio=2)
    assert answers == [f"answer {i}" for i in range(n)]
    windows = [sum(stub.batches[k : k + _WINDOW], []) for k in range(0, len(stub.batches), _WINDOW)]
    assert [len(w) for w in windows] == [size * _WINDOW, n - size * _WINDOW]
    assert all(w == sorted(w) for w in windows)


def test_scores_are_each_rows_own_with_some_answers_right(run, monkeypatch):
    """With a generator that answers some questions right, each saved row's scores are recomputed from its own
    prediction and answers (an independent ANLS), and metrics.json holds their means: a base model's answers all
    score 0, so with them alone a scorer that ignored the prediction would pass."""
    monkeypatch.setattr(evaluate_module, "DocEVGenerator", lambda folder, **_: _Answers(run))
    monkeypatch.setattr(evaluate_module, "eval_loss", lambda cfg, generator: None)
    metrics = evaluate(run, checkpoint="base", label="stub")
    rows = _lines(Path(run.output_dir) / "eval" / "stub" / "predictions.jsonl")
    assert len(rows) >= 6
    for r in rows:
        assert r["anls"] == pytest.approx(_anls(r["prediction"], r["answers"]), abs=1e-12), r
        assert r["exact"] == any(" ".join(r["prediction"].lower().split()) == " ".join(a.lower().split())
                                 for a in r["answers"])  # fmt: skip
    right = sum(r["exact"] for r in rows)
    assert 0 < right < len(rows) and any(0 < r["anls"] < 1 for r in rows)  # right, partly right and wrong
    saved = json.loads((Path(run.output_dir) / "eval" / "stub" / "metrics.json").read_text())
    assert saved["anls"] == pytest.approx(sum(r["anls"] for r in rows) / len(rows)) == metrics["anls"]
    assert saved["exact_match"] == pytest.approx(right / len(rows))


def test_cli_evaluate(run, tiny_checkpoint, capsys, tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(run.to_dict()))
    assert main(["evaluate", "--config", str(cfg_file), "--model", str(tiny_checkpoint), "--label", "cli"]) == 0
    assert "cli: " in capsys.readouterr().out
    out = Path(run.output_dir) / "eval" / "cli"
    metrics = json.loads((out / "metrics.json").read_text())
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## By source" in md and "## By question type" in md and "<h2>By question type</h2>" in page
    assert metrics["question_types"] and metrics["sources"]
    for qtype, m in metrics["question_types"].items():  # every type with its count, as metrics.json has it
        assert f"| {qtype} | {m['n']} |" in md and f"<td>{qtype}</td><td>{m['n']}</td>" in page
    assert main(["evaluate", "--config", str(cfg_file), "--checkpoint", "best"]) == 1
    assert "no checkpoint under" in capsys.readouterr().err


def test_cli_evaluate_latest_and_best_of_an_adapter_run(run, capsys, tmp_path):
    """An adapter run's step folders (trained tensors only) evaluate through the CLI, as the base with their
    adapters merged in memory: two steps with other adapters answer differently."""
    lora = ["model._component_=docev.models.docev.lora_docev_tiny", "model.decoder_trainable=false",
            "model.lora_rank=4", "model.lora_alpha=8", f"checkpointer.output_dir={tmp_path / 'ckpts'}"]  # fmt: skip
    cfg_file = tmp_path / "lora.json"
    cfg_file.write_text(json.dumps(run.to_dict()))
    cfg = load_config(cfg_file, lora)
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    write_adapter_step(cfg, step=4, seed=1)
    write_adapter_step(cfg, step=8, seed=2)
    write_best(cfg.checkpointer.output_dir, tmp_path / "ckpts" / "step_4", eval_loss=1.0)
    out = Path(run.output_dir) / "eval"
    assert main(["evaluate", "--config", str(cfg_file), "--checkpoint", "latest", "--label", "lora-latest"]) == 0
    assert main(["evaluate", "--config", str(cfg_file), "--checkpoint", "best", "--label", "lora-best"]) == 0
    assert "lora-best: " in capsys.readouterr().out
    latest = json.loads((out / "lora-latest" / "metrics.json").read_text())
    best = json.loads((out / "lora-best" / "metrics.json").read_text())
    assert latest["model"].endswith("step_8") and best["model"].endswith("step_4")
    assert latest["n"] == best["n"] > 0
    answers = [[r["prediction"] for r in _lines(out / k / "predictions.jsonl")] for k in ("lora-latest", "lora-best")]
    assert answers[0] != answers[1]


def test_prompts_take_the_held_out_tiles_from_the_eval_shards(tmp_path, tiny_checkpoint, synth_sources, monkeypatch):
    """With eval shards, a question's images come from them: the same tokens and pixels as tiling the pages, and
    evaluate decodes no page."""
    import torch

    from docev.data import transform as transform_module
    from docev.data.preprocess import run_preprocess
    from docev.data.transform import transform_from_config
    from docev.evaluation.tiles import HeldOutTiles
    from docev.vision.tiling import TiledImage

    data = [{"source": str(synth_sources["instruct"]), "name": "instruct", "eval_fraction": 0.4}]
    cfg = tiny_config(tmp_path, tiny_checkpoint, data, "evaluate.max_new_tokens=4", "evaluate.batch_size=4")
    run_validate(cfg, workers=1)
    assert not len(HeldOutTiles(cfg))  # nothing preprocessed yet: the pages are tiled
    run_preprocess(cfg, workers=1)
    tiles, transform = HeldOutTiles(cfg), transform_from_config(cfg)
    questions = list(eval_questions(cfg))
    assert len(tiles) and questions
    t = cfg.tokenizer.tile_size
    for q in questions:
        prompt = tiles.prompt(q)
        stored = [p["content"] for m in prompt for p in m.content if p["type"] == "image"]
        assert len(stored) == len(q.images) and all(isinstance(s, TiledImage) for s in stored)
        ours, pages = transform.encode(prompt), transform.encode(q.prompt)
        assert ours.tokens == pages.tokens
        for a, b in zip(ours.images, pages.images, strict=True):
            assert torch.equal(a.pixels(t), b.pixels(t))

    def no_page_decode(*args, **kwargs):
        raise AssertionError("a page was decoded and tiled again")

    monkeypatch.setattr(transform_module, "load_image", no_page_decode)
    assert evaluate(cfg, checkpoint="base")["n"] == len(questions)
