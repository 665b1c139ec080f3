"""Model card facts: the loss at the exported step from metrics.jsonl, and what is said when facts are missing."""

import json
from pathlib import Path

from docev.export.card import SmokeSample, smoke_section, training_facts
from docev.inference.generate import Generation

from .conftest import make_config


def test_training_facts(tmp_path, tiny_checkpoint, synth_sources):
    cfg = make_config(tmp_path, tiny_checkpoint, synth_sources)
    metrics = tmp_path / "logs" / "metrics.jsonl"
    assert training_facts(cfg, None, untrained=True).note == "untrained base checkpoint"
    assert training_facts(cfg, 4, untrained=False).note == "logs/metrics.jsonl does not exist"  # relative to the run
    metrics.parent.mkdir()
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 2.0}, {"step": 2, "loss": 2.4}]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 4, "loss": nan-garbage\n\n')
    facts = training_facts(cfg, 2, untrained=False)  # a resumed run logged step 2 again: the later line wins
    assert (facts.step, facts.loss, facts.loss_step) == (2, 2.4, 2)
    assert facts.note == "logs/metrics.jsonl; 1 malformed line(s) skipped"
    assert training_facts(cfg, 9, untrained=False).loss == 2.0
    assert training_facts(cfg, 0, untrained=False).note.startswith("no entry with step ≤ 0 in ")
    assert training_facts(cfg, None, untrained=False).note == "the checkpoint folder is not named step_N"


def test_smoke_section():
    sample = SmokeSample("instruct", "doc-1", "data.jsonl", 1, Path("/data/images/p 1.png"))
    stopped = Generation("", [4], 150, True, 2)
    lines = "\n".join(smoke_section(sample, stopped, "What's this?", 16, "cpu", ""))
    assert "(no text: the model answered the stop token)" in lines and "ended by the stop token; ids [4]" in lines
    assert "docev generate --model . --image '/data/images/p 1.png' --prompt 'What'\"'\"'s this?'" in lines
    inside = "\n".join(smoke_section(sample, stopped, "x", 16, "cpu", "", Path("/data")))  # below the run folder
    assert "after the image `images/p 1.png`" in inside and "; `RUN` is the run's output folder):" in inside
    assert "docev generate --model . --image \"$RUN\"/'images/p 1.png' --prompt x" in inside
    missing = smoke_section(None, None, "x", 16, "cpu", "no manifest")
    assert missing == ["Smoke generation: not available (no manifest)."]
    assert "this run scored no held-out pages" in lines
    scored = "\n".join(smoke_section(sample, stopped, "x", 16, "cpu", "", scored=True))
    assert "the held-out scores above are on pages it did not see" in scored and "scored no" not in scored
