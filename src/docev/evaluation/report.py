"""The evaluation report: metric table base vs tuned (Markdown, for the model card and the console), the
same scores by source and by question type with their question counts (an aggregate can hide that one
question type carries it), and a self-contained HTML page (thumbnails inlined, one KFP artifact) with the
questions whose score changed most first: the largest improvements, then the largest regressions."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from docev.config import DocEVConfig
from docev.run.paths import RunPaths, run_paths
from docev.run.publish import write_text
from docev.vision.image_io import load_image

LABELS = ("base", "tuned")
COLUMNS = (("n", "questions"), ("anls", "ANLS"), ("exact_match", "exact match"),
           ("relaxed_accuracy", "relaxed accuracy (5%)"), ("f1", "field F1"),
           ("json_parse_rate", "JSON parsed"), ("eval_loss", "eval loss"))  # fmt: skip
THUMB = 160


def _load(paths: RunPaths, label: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    metrics = paths.eval_file(label, "metrics.json")
    preds = paths.eval_file(label, "predictions.jsonl")
    m = json.loads(metrics.read_text()) if metrics.is_file() else None
    rows = [json.loads(x) for x in preds.read_text().splitlines()] if preds.is_file() else []
    return m, rows


def metric_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: one per metric any label has, one column per label (and the change when two)."""
    labels = [k for k in LABELS if k in results] + sorted(set(results) - set(LABELS))
    head = "| metric | " + " | ".join(labels) + (" | change |" if len(labels) == 2 else " |")
    lines = [head, "|---" * (len(labels) + 1 + (len(labels) == 2)) + "|"]
    for key, name in COLUMNS:
        values = [results[k].get(key) for k in labels]
        if all(v is None for v in values):
            continue
        cells = [_fmt(v) for v in values]
        if len(values) == 2 and key != "n" and None not in values:
            cells.append(f"{values[1] - values[0]:+.3f}")
        elif len(values) == 2:
            cells.append("")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


GROUPS = (("sources", "source"), ("question_types", "question type"))
GROUP_METRICS = (("anls", "ANLS"), ("exact_match", "EM"), ("f1", "field F1"))


def breakdown_table(results: dict[str, dict[str, Any]], group: str) -> list[str]:
    """Markdown rows of one breakdown (``sources`` or ``question_types`` of ``metrics.json``): a row per name
    with its question count and each metric per label (and the change when two); [] when no label has one."""
    labels = [k for k in LABELS if k in results] + sorted(set(results) - set(LABELS))
    parts = {k: results[k].get(group) or {} for k in labels}
    names = sorted({n for p in parts.values() for n in p})
    if not names:
        return []
    metrics = [
        (key, name) for key, name in GROUP_METRICS if any(key in p.get(n, {}) for p in parts.values() for n in names)
    ]
    two = len(labels) == 2
    head, cols = [dict(GROUPS)[group], "questions"], 2
    for _, name in metrics:
        head += [f"{name} {k}" for k in labels] if len(labels) > 1 else [name]
        head += [f"{name} change"] if two else []
        cols += len(labels) + two
    lines = ["| " + " | ".join(head) + " |", "|---" * cols + "|"]
    for n in names:
        counts = {parts[k][n]["n"] for k in labels if n in parts[k]}
        cells = [n, " / ".join(str(c) for c in sorted(counts))]
        for key, _ in metrics:
            values = [parts[k].get(n, {}).get(key) for k in labels]
            cells += [_fmt(v) for v in values]
            if two:
                cells.append(f"{values[1] - values[0]:+.3f}" if None not in values else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def breakdown_sections(results: dict[str, dict[str, Any]], level: str = "##") -> list[str]:
    """ "By source" and "By question type" Markdown sections (the model card and ``report.md``)."""
    out = []
    for group, title in (("sources", "By source"), ("question_types", "By question type")):
        table = breakdown_table(results, group)
        if table:
            out += ["", f"{level} {title}", "", *table]
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return str(v) if isinstance(v, int) else f"{v:.3f}"


def _html_table(lines: list[str]) -> str:
    """A Markdown table (header, rule, rows) as an HTML table."""

    def cells(line: str, tag: str) -> str:
        return "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in line.strip("|").split("|"))

    return (
        f"<table><tr>{cells(lines[0], 'th')}</tr>"
        + "".join(f"<tr>{cells(x, 'td')}</tr>" for x in lines[2:])
        + "</table>"
    )


def _thumb(path: Path) -> str:
    try:
        image = load_image(path)
    except (OSError, ValueError):
        return ""
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG")
    return f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _changes(base: list[dict[str, Any]], tuned: list[dict[str, Any]], n: int) -> list[tuple[dict, dict | None]]:
    """(tuned row, base row) pairs: largest ANLS gains first, then the largest losses (n in all)."""
    by_key = {(r["id"], r["turn"]): r for r in base}
    pairs = [(t, by_key.get((t["id"], t["turn"]))) for t in tuned]
    if not base:
        return pairs[:n]
    delta = [(t["anls"] - (b["anls"] if b else 0.0), t, b) for t, b in pairs]
    gains = sorted((d for d in delta if d[0] > 0), key=lambda d: -d[0])
    losses = sorted((d for d in delta if d[0] < 0), key=lambda d: d[0])
    picked = gains[: n - min(len(losses), n // 2)]
    picked += losses[: n - len(picked)]
    return [(t, b) for _, t, b in picked]


def write_report(cfg: DocEVConfig, label: str = "tuned", examples: int | None = None) -> Path:
    """``output_dir/eval/<label>/report.html`` (+ ``report.md``): this label against ``base`` when both exist."""
    paths = run_paths(cfg)
    results, rows = {}, {}
    for name in {label, "base"}:
        m, r = _load(paths, name)
        if m is not None:
            results[name], rows[name] = m, r
    n = cfg.evaluate.report_examples if examples is None else examples
    base_rows = rows.get("base", []) if label != "base" else []
    pairs = _changes(base_rows, rows.get(label, []), n)
    table = metric_table(results)
    paths.eval_dir(label).mkdir(parents=True, exist_ok=True)
    write_text(
        paths.eval_file(label, "report.md"),
        "\n".join([f"# Evaluation: {label}", "", *table, *breakdown_sections(results)]) + "\n",
    )
    groups = "".join(
        f"<h2>{title}</h2>{_html_table(rows)}"
        for group, title in (("sources", "By source"), ("question_types", "By question type"))
        if (rows := breakdown_table(results, group))
    )
    cards = []
    out_root = paths.work
    for t, b in pairs:
        imgs = "".join(_thumb(p if Path(p).is_absolute() else out_root / p) for p in t["images"][:2])
        base_cell = "" if b is None else f"<p><b>base</b> ({b['anls']:.2f}): {html.escape(b['prediction'])}</p>"
        cards.append(
            f"<div class='q'>{imgs}<p><b>{html.escape(t['source'])}</b> {html.escape(t['id'])} turn {t['turn']}</p>"
            f"<p><b>question</b>: {html.escape(t['question'])}</p>"
            f"<p><b>gold</b>: {html.escape(' | '.join(t['answers']))}</p>{base_cell}"
            f"<p><b>{html.escape(label)}</b> ({t['anls']:.2f}): {html.escape(t['prediction'])}</p></div>"
        )
    order = "largest improvements first, then regressions" if base_rows else "first questions"
    page = (
        "<!doctype html><meta charset='utf-8'><title>DocEV evaluation</title><style>body{font-family:sans-serif}"
        "td,th{border:1px solid #ccc;padding:4px}.q{display:inline-block;vertical-align:top;width:360px;"
        "margin:6px;padding:6px;border:1px solid #ddd}</style>"
        f"<h1>Evaluation: {html.escape(label)}</h1>{_html_table(table)}{groups}"
        f"<h2>Questions ({order})</h2>{''.join(cards)}"
    )
    return write_text(paths.eval_file(label, "report.html"), page)
