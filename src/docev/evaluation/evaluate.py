"""The evaluate step: greedy answers for the held-out questions, scored, written per label.

``output_dir/eval/<label>/predictions.jsonl`` holds one line per question, ``metrics.json`` the
summary (overall, per source, per question type). Questions are generated ``evaluate.batch_size`` at
a time in one padded KV cache, grouped by prompt length so rows of a batch pad little; the output
keeps the manifest's order. Runs in one process (CPU locally, one GPU on a cluster).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from docev.config import DocEVConfig
from docev.evaluation.questions import Question, eval_questions
from docev.evaluation.scores import score, summarize
from docev.evaluation.tiles import HeldOutTiles
from docev.inference import DocEVGenerator
from docev.run.checkpoints import resolve_checkpoint
from docev.run.paths import run_paths
from docev.run.publish import write_text

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_WINDOW = 8  # batches of prompts encoded and sorted by length together


class NoQuestionsError(ValueError):
    """The held-out split holds no question (nothing held out, or only pretraining records)."""


def eval_dir(cfg: DocEVConfig, label: str) -> Path:
    return run_paths(cfg).eval_dir(label)


def default_label(checkpoint: str | None) -> str:
    return "base" if checkpoint == "base" else "tuned"


def answer_questions(
    generator: DocEVGenerator,
    questions: list[Question],
    *,
    batch_size: int,
    max_new_tokens: int,
    sampling_ratio: int,
    progress: Callable[[int], None] | None = None,
    tiles: HeldOutTiles | None = None,
) -> list[str]:
    """The model's answer to each question, in order; ``batch_size`` prompts per generation; images from
    ``tiles`` (the eval shards) where they hold them.

    A batch pads every prompt to its longest, so the prompts of ``_WINDOW`` batches at a time (the questions
    ordered by image count first, which keeps a record's questions together) are encoded and sorted by length
    before they are cut into batches: the prefill then computes few padding tokens. The window bounds the
    encoded tiles held at once."""
    order = sorted(range(len(questions)), key=lambda i: len(questions[i].images))
    answers: list[str] = [""] * len(questions)
    window = batch_size * _WINDOW
    for first in range(0, len(order), window):
        encoded = {i: generator.encode(tiles.prompt(questions[i]) if tiles is not None else questions[i].prompt,
                                       sampling_ratio) for i in order[first : first + window]}  # fmt: skip
        by_length = sorted(encoded, key=lambda i: generator.prompt_length(encoded[i]))
        for start in range(0, len(by_length), batch_size):
            chunk = by_length[start : start + batch_size]
            gens = generator.generate_encoded([encoded.pop(i) for i in chunk], max_new_tokens=max_new_tokens)
            for i, g in zip(chunk, gens, strict=True):
                answers[i] = g.text.strip()
            if progress is not None:
                progress(len(chunk))
    return answers


def prediction_rows(questions: list[Question], answers: list[str], threshold: float, root: Path) -> list[dict]:
    rows = []
    for q, pred in zip(questions, answers, strict=True):
        s = score(pred, q.answers, threshold)
        row: dict[str, Any] = {"id": q.id, "source": q.source, "turn": q.turn, "question": q.question,
                               "answers": q.answers, "prediction": pred, "anls": s.anls, "exact": s.exact,
                               "relaxed": s.relaxed}  # fmt: skip
        if s.f1 is not None:
            row.update(f1=s.f1, json_parsed=s.parsed)
        row["question_type"] = q.question_type
        row["images"] = [_relative(p, root) for p in q.images]
        rows.append(row)
    return rows


def _relative(path: str, root: Path) -> str:
    """Relative to the output folder when below it (so the folder can move), else as given."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return path


def evaluate(
    cfg: DocEVConfig,
    *,
    model_dir: str | None = None,
    checkpoint: str | None = None,
    label: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score one model on the held-out split; returns the metrics written to ``metrics.json``.

    ``model_dir`` (an export or any model folder) wins over ``checkpoint`` (latest, best, step_N,
    base; default latest); an adapter run's step folder is evaluated as the base with the adapters merged.
    Raises ValueError when the split holds no question."""
    ev = cfg.evaluate
    which = checkpoint or "latest"
    folder = Path(model_dir) if model_dir else resolve_checkpoint(cfg, which)
    label = label or default_label(None if model_dir else which)
    questions = list(eval_questions(cfg))
    if ev.max_questions is not None:
        questions = questions[: ev.max_questions]
    if not questions:
        raise NoQuestionsError(
            "evaluate: the held-out split has no question; set datasets[].eval_fraction or eval_datasets "
            "(instruction sources) and rerun validate and preprocess"
        )
    ratio = ev.sampling_ratio or max(cfg.tokenizer.sampling_ratio)
    # an adapter run's step folder is read over the config's base, with its adapters merged in memory
    generator = DocEVGenerator(
        folder, device=cfg.device, dtype=_DTYPES[cfg.dtype], base=cfg.checkpointer.checkpoint_dir
    )
    tiles = HeldOutTiles(cfg)
    start = time.perf_counter()
    with torch.inference_mode():
        answers = answer_questions(generator, questions, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                                   sampling_ratio=ratio, progress=progress, tiles=tiles)  # fmt: skip
    seconds = time.perf_counter() - start
    loss = eval_loss(cfg, generator)
    root = cfg.work_root
    rows = prediction_rows(questions, answers, ev.anls_threshold, root)
    metrics = {**summarize(rows), "label": label, "model": _relative(str(folder), root), "sampling_ratio": ratio,
               "seconds": seconds, "answers_per_second": len(rows) / seconds,
               **({"eval_loss": loss} if loss is not None else {})}  # fmt: skip
    paths = run_paths(cfg)
    paths.eval_dir(label).mkdir(parents=True, exist_ok=True)
    write_text(paths.eval_file(label, "predictions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    write_text(paths.eval_file(label, "metrics.json"), json.dumps(metrics, indent=2))
    return metrics


def eval_loss(cfg: DocEVConfig, generator: DocEVGenerator) -> float | None:
    """The eval loss of this model on the held-out shards, as training computes it (one process);
    None without eval shards."""
    from docev.data.loader import build_collate
    from docev.eval_loss import EvalLoss

    collate = build_collate(cfg, generator.dtype)
    evaluator = EvalLoss.from_config(cfg, collate, rank=0, world_size=1, checkpoint_dir=cfg.work_root,
                                     resumed=False)  # fmt: skip
    if evaluator is None:
        return None
    return evaluator.run(generator.model, torch.nn.CrossEntropyLoss(), generator.device)["eval_loss"]
