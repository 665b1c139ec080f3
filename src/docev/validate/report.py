"""Human reports of a validation run: Markdown and a self-contained HTML page (thumbnails inlined,
so the KFP UI can show it as one artifact), plus ``report.json`` for machines."""

from __future__ import annotations

import base64
import html
import io
import json
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from docev.config import DocEVConfig
from docev.outputs import outputs
from docev.run.paths import REJECTS_FILE, THUMBNAILS, VALIDATE, VALIDATE_REPORTS
from docev.run.publish import write_bytes, write_text
from docev.sources.manifest import iter_manifest
from docev.sources.readers import load_source_image, source_name
from docev.validate.rules import REASONS
from docev.vision.tiling import tile_image

THUMB_SIDE = 320


def grid_thumbnail(image: Image.Image, tile_size: int, min_tiles: int, max_tiles: int) -> Image.Image:
    """The page as the model sees it (the transform's canvas: resized, padded) with its tile grid drawn."""
    tiled = tile_image(
        image,
        tile_size=tile_size,
        min_num_tiles=min_tiles,
        max_num_tiles=max_tiles,
        resample=Image.Resampling.BILINEAR,
    )
    canvas, (rows, cols) = tiled.canvas.copy(), tiled.plan.grid
    (ch, cw) = tiled.plan.canvas
    draw = ImageDraw.Draw(canvas)
    for r in range(1, rows):
        draw.line([(0, r * tile_size), (cw, r * tile_size)], fill=(220, 30, 30), width=max(1, cw // 200))
    for c in range(1, cols):
        draw.line([(c * tile_size, 0), (c * tile_size, ch)], fill=(220, 30, 30), width=max(1, cw // 200))
    canvas.thumbnail((THUMB_SIDE, THUMB_SIDE))
    return canvas


def _thumbnails(cfg: DocEVConfig, out: Path, manifest: Path) -> list[tuple[str, str, str, bytes]]:
    """(record id, file name under thumbnails/, caption, png bytes) for the first accepted pages."""
    tok, sources = cfg.tokenizer, {source_name(s): s for s in cfg.datasets}
    allowed = cfg.validate_.allowed_roots
    thumbs = []
    for entry in islice((e for e in iter_manifest(cfg, manifest) if e["images"]), cfg.validate_.thumbnails):
        im = entry["images"][0]
        image = load_source_image(sources[entry["source"]], im["path"], allowed)
        thumb = grid_thumbnail(image, tok.tile_size, tok.min_num_tiles, tok.max_num_tiles)
        buf = io.BytesIO()
        thumb.save(buf, "PNG")
        name = f"{entry['source']}-{entry['row']}.png"
        (out / "thumbnails").mkdir(exist_ok=True)
        write_bytes(out / "thumbnails" / name, buf.getvalue())  # whole or not at all, as the reports
        (h, w), pages = im["size"], len(entry["images"])
        caption = (f"{w}×{h} px {im['mode']}, {im['tiles']} tiles, tokens {entry['tokens']}"
                   + (f" (page 1 of {pages})" if pages > 1 else ""))  # fmt: skip
        thumbs.append((entry["id"], name, caption, buf.getvalue()))
    return thumbs


def _where(reject: dict[str, Any]) -> str:
    """Source, file, 1-based line, record id, field and every image of a reject, as a person reads them."""
    text = f"{reject['source']} {reject['file']} line {reject['row'] + 1}"
    text += f" record {reject['id']!r}" if reject.get("id") else ""
    text += f" field `{reject['field']}`" if reject.get("field") else " (the whole line)"
    images = reject.get("images") or []
    return text + (f", images {', '.join(images)}" if images else "")


def _short(record: Any, limit: int = 300) -> str:
    text = json.dumps(record, ensure_ascii=False) if not isinstance(record, str) else record
    return text if len(text) <= limit else text[:limit] + " …"


def verdict(report: dict[str, Any]) -> tuple[bool, str]:
    """(passed, the sentence the reports open with): whether the step passes, on how many records, and for a
    failure which sources broke ``max_reject_fraction`` and by how much."""
    sources = report["sources"].values()
    read, rejected = sum(s["read"] for s in sources), sum(s["rejected"] for s in sources)
    share = rejected / read if read else 0.0
    limit = report["max_reject_fraction"]
    counts = f"{read - rejected} of {read} records accepted, {rejected} rejected ({share:.1%})"
    failing = report.get("failed_sources") or {}
    if failing:
        worst = ", ".join(f"{n} {f:.1%}" for n, f in sorted(failing.items(), key=lambda x: -x[1]))
        return False, (f"FAIL: {counts}; above the limit of {limit:.1%} (validate.max_reject_fraction): {worst}. "
                       "The step fails; the reasons and an example of each are below.")  # fmt: skip
    return True, f"PASS: {counts}; every source within the limit of {limit:.1%} (validate.max_reject_fraction)."


def write_reports(
    cfg: DocEVConfig, report: dict[str, Any], examples: dict[str, dict[str, Any]], manifest: Path
) -> None:
    """report.json, report.md, report.html and thumbnails/ (of the accepted entries in ``manifest``), published."""
    outs = outputs(cfg)
    out = outs.local(VALIDATE)
    write_text(outs.local(VALIDATE_REPORTS["json"]), json.dumps(report, indent=2))
    thumbs = _thumbnails(cfg, out, manifest)
    split = {name: report["split"][name] for name in report["sources"]}
    passed, sentence = verdict(report)
    md = ["# Validation report", "", f"> **{sentence}**", ""]
    md += ["| source | read | accepted | rejected | reject share | train | held out |"]
    md.append("|---|---|---|---|---|---|---|")
    for name, s in report["sources"].items():
        md.append(
            f"| {name} | {s['read']} | {s['accepted']} | {s['rejected']} | {s['reject_fraction']:.2%} "
            f"| {split[name]['train']} | {split[name]['eval']} |"
        )
    md += ["", f"Step fails above a reject share of {report['max_reject_fraction']:.2%}.", "", "## Reject reasons", ""]
    md += ["| source | reason | count | meaning |", "|---|---|---|---|"]
    for name, s in report["sources"].items():
        md += [f"| {name} | `{r}` | {n} | {REASONS[r]} |" for r, n in s["reasons"].items()]
    md += ["", "## Image modes (normalised to RGB for training)", ""]
    for name, s in report["sources"].items():
        md.append(f"- {name}: " + ", ".join(f"{m} {n}" for m, n in s["image_modes"].items()))
    md += ["", "## Storage (transient faults retried and survived: throttling, 5xx, dropped connections)", ""]
    md += [f"- {name}: retries {s['retries']}" for name, s in report["sources"].items()]
    md += ["", "## Sequence lengths (sampling ratio: bucket → records)", ""]
    for name, s in report["sources"].items():
        md.append(f"- {name}: " + ", ".join(f"{k} {n}" for k, n in s["tokens"].items()))
    md += ["", "## Example of each reject reason", ""]
    md += [f"Line numbers count from 1 (the `row` field of `{REJECTS_FILE}` and the manifest counts from 0).", ""]
    for reason, ex in sorted(examples.items()):
        md += [
            f"### `{reason}`",
            "",
            f"{_where(ex)}: {ex['detail']}",
            "",
            "```",
            _short(ex["record"]),
            "```",
            "",
        ]
    md += ["## Accepted pages with their tile grid", ""]
    md += [f"![{rid}](thumbnails/{name}) {rid}: {cap}" for rid, name, cap, _ in thumbs]
    write_text(outs.local(VALIDATE_REPORTS["md"]), "\n".join(md) + "\n")

    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{s['read']}</td><td>{s['accepted']}</td><td>{s['rejected']}</td>"
        f"<td>{s['reject_fraction']:.2%}</td><td>{html.escape(', '.join(f'{r}: {c}' for r, c in s['reasons'].items()))}"
        f"</td><td>{split[n]['train']}</td><td>{split[n]['eval']}</td></tr>"
        for n, s in report["sources"].items()
    )
    exs = "".join(
        f"<h3>{html.escape(r)}</h3><p>{html.escape(_where(ex))}: {html.escape(ex['detail'])}</p>"
        f"<pre>{html.escape(_short(ex['record']))}</pre>"
        for r, ex in sorted(examples.items())
    )
    figs = "".join(
        f"<figure><img src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        f"<figcaption>{html.escape(rid)}: {html.escape(cap)}</figcaption></figure>"
        for rid, _, cap, png in thumbs
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>DocEV validation report</title>"
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px}figure{display:inline-block}"
        ".verdict{padding:10px;font-size:1.2em;font-weight:bold;border-radius:4px}.pass{background:#d9f2d9}"
        ".fail{background:#f8d0d0}</style><h1>Validation report</h1>"
        f"<div class='verdict {'pass' if passed else 'fail'}'>{html.escape(sentence)}</div>"
        "<p>Line numbers count from 1.</p><table><tr><th>source</th><th>read</th><th>accepted</th>"
        f"<th>rejected</th><th>reject share</th><th>reasons</th><th>train</th><th>held out</th></tr>{rows}</table>"
        f"<h2>Accepted pages with their tile grid</h2>{figs}<h2>Example of each reject reason</h2>{exs}"
    )
    write_text(outs.local(VALIDATE_REPORTS["html"]), page)
    if outs.local(THUMBNAILS).is_dir():
        outs.publish_tree(THUMBNAILS)
    for key in VALIDATE_REPORTS.values():
        outs.publish(key)
