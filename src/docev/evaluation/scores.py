"""Document metrics: ANLS (DocVQA, InfoVQA), relaxed accuracy (ChartQA), exact match, and field F1 for JSON
(key-information) answers; every question gets all of them, so each task reads the one it is judged by.

ANLS follows the DocVQA definition (Biten et al., ICCV 2019): prediction and each gold answer are
lowercased, trimmed and their whitespace collapsed; a question scores ``max over golds of 1 - NL``
where NL is the Levenshtein distance divided by the longer string's length, or 0 when ``NL >= τ``
(τ = 0.5); ANLS is the mean over questions. The edit distance is rapidfuzz's.

Relaxed accuracy follows ChartQA (Masry et al., ACL Findings 2022) as its reference code (pix2struct's
``relaxed_correctness``) computes it: when both answers read as numbers (a trailing ``%`` divides by 100)
and the gold is not 0, a prediction within 5 % of the gold (relative) is right; otherwise the lowercased
strings must be equal. A question is right when it is right against any gold.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rapidfuzz.distance import Levenshtein

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05


def normalize(text: str) -> str:
    """Lowercase, trim, collapse runs of whitespace into one space."""
    return re.sub(r"\s+", " ", text.strip().lower())


def anls(prediction: str, golds: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """The question's ANLS score in [0, 1]."""
    pred, best = normalize(prediction), 0.0
    for gold in golds:
        nl = Levenshtein.normalized_distance(pred, normalize(gold))
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def exact_match(prediction: str, golds: Sequence[str]) -> bool:
    pred = normalize(prediction)
    return any(pred == normalize(g) for g in golds)


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, golds: Sequence[str], tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's relaxed accuracy for one question: numbers within ``tolerance`` (relative), else string equality."""
    pred = prediction.strip()
    for gold in (g.strip() for g in golds):
        p, g = _to_float(pred), _to_float(gold)
        if p is not None and g:  # a gold of 0 has no relative error: compared as text, as the reference does
            if abs(p - g) / abs(g) <= tolerance:
                return True
        elif pred.lower() == gold.lower():
            return True
    return False


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The answer as a JSON object, or None when it is not one."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def _fields(obj: Any, prefix: str = "") -> set[tuple[str, str]]:
    """(dotted key, normalised value) pairs; nested objects and lists flatten into their paths."""
    if isinstance(obj, dict):
        return {p for k, v in obj.items() for p in _fields(v, f"{prefix}{k}.")}
    if isinstance(obj, list):
        return {p for i, v in enumerate(obj) for p in _fields(v, f"{prefix}{i}.")}
    value = obj if isinstance(obj, str) else json.dumps(obj)
    return {(prefix[:-1], normalize(value))}


def field_f1(prediction: str, golds: Sequence[str]) -> tuple[float, bool] | None:
    """(F1 over (key, value) pairs, whether the prediction parsed as a JSON object), the best over the
    JSON-object golds; None when no gold answer is a JSON object (the question is not extraction)."""
    gold_objs = [g for g in (parse_json_object(x) for x in golds) if g is not None]
    if not gold_objs:
        return None
    pred_obj = parse_json_object(prediction)
    if pred_obj is None:
        return 0.0, False
    pred, best = _fields(pred_obj), 0.0
    for gold_obj in gold_objs:
        gold = _fields(gold_obj)
        hit = len(pred & gold)
        if hit:
            p, r = hit / len(pred), hit / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best, True


@dataclass(frozen=True)
class Score:
    anls: float
    exact: bool
    relaxed: bool
    f1: float | None = None  # JSON answers only
    parsed: bool | None = None  # JSON answers only: the prediction was a JSON object


def score(prediction: str, golds: Sequence[str], threshold: float = ANLS_THRESHOLD) -> Score:
    if not golds:
        raise ValueError("a question needs at least one gold answer")
    f1 = field_f1(prediction, golds)
    return Score(anls(prediction, golds, threshold), exact_match(prediction, golds), relaxed_match(prediction, golds),
                 *(f1 or (None, None)))  # fmt: skip


def aggregate(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Means over prediction rows (``anls``, ``exact``, ``relaxed``, optional ``f1``/``json_parsed``): n, anls,
    exact_match, relaxed_accuracy, and for JSON answers f1, json_questions and json_parse_rate."""
    rows = list(rows)
    out: dict[str, Any] = {"n": len(rows)}
    if not rows:
        return out
    out["anls"] = sum(r["anls"] for r in rows) / len(rows)
    out["exact_match"] = sum(bool(r["exact"]) for r in rows) / len(rows)
    relaxed = [r for r in rows if "relaxed" in r]  # rows written before relaxed accuracy existed lack it
    if relaxed:
        out["relaxed_accuracy"] = sum(bool(r["relaxed"]) for r in relaxed) / len(relaxed)
    json_rows = [r for r in rows if "f1" in r]
    if json_rows:
        out["f1"] = sum(r["f1"] for r in json_rows) / len(json_rows)
        out["json_questions"] = len(json_rows)
        out["json_parse_rate"] = sum(bool(r["json_parsed"]) for r in json_rows) / len(json_rows)
    return out


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall metrics, then per ``source`` and per ``question_type`` (rows without a type are left out)."""
    summary = aggregate(rows)
    for key, group in (("sources", "source"), ("question_types", "question_type")):
        names = sorted({r[group] for r in rows if r.get(group) is not None})
        summary[key] = {n: aggregate(r for r in rows if r.get(group) == n) for n in names}
    return summary
