"""Synthetic UFX documents: rendered pages + conversations grounded in their text.

No dataset can be downloaded here, so tests and the demo use pages drawn with Pillow
(invoices, receipts, tables, forms, multi-column pages) in the shapes real documents come
in (portrait A4, landscape, long narrow receipts, small crops; PNG and JPEG). Each record's
questions are answered from the text actually drawn on its image. Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

Format = Literal["jsonl", "parquet", "hf"]

COMPANIES = ["Acme Corp", "Globex Ltd", "Initech", "Umbrella GmbH", "Hooli Inc", "Stark Supplies",
             "Wayne Freight", "Tyrell Systems", "Soylent Foods", "Cyberdyne SA"]  # fmt: skip
ITEMS = ["Paper A4", "Toner", "Stapler", "Desk lamp", "USB cable", "Monitor", "Keyboard", "Chair",
         "Coffee beans", "Notebook", "Pens (box)", "Shipping", "Consulting hour", "Licence"]  # fmt: skip
CITIES = ["Berlin", "Lyon", "Austin", "Osaka", "Turin", "Leeds", "Porto", "Gdansk", "Quebec", "Perth"]
NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov",
         "Donald Knuth", "Frances Allen", "John Backus", "Radia Perlman", "Ken Thompson"]  # fmt: skip
WORDS = ("the document shows a summary of quarterly results with revenue growth across regions while "
         "costs remained stable and the board approved the plan for next year including new hires in "
         "research and operations as well as an updated policy on travel and remote work").split()  # fmt: skip

# (width, height) page shapes: portrait A4 at 72 dpi, landscape, long narrow receipt, small crop.
SHAPES = {"a4": (595, 842), "landscape": (842, 595), "receipt": (300, 1100), "crop": (220, 96)}


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@dataclass
class Page:
    """A rendered document and the facts drawn on it (used to ground the questions)."""

    kind: str
    image: Image.Image
    facts: dict[str, str]
    lines: list[str] = field(default_factory=list)


# Each kind is printed on its own paper colour, so the closed-set "kind" question is answerable from the page
# alone; the tiny demo model learns it within the demo's steps (text answers need more than a demo's budget).
PAPER = {"invoice": (170, 200, 255), "receipt": (255, 240, 150), "table": (170, 255, 170),
         "form": (255, 170, 200), "columns": (235, 235, 235), "crop": (255, 190, 120)}  # fmt: skip


class _Canvas:
    def __init__(self, w: int, h: int, rng: random.Random, kind: str):
        shift = rng.randint(235, 255) - 245, rng.randint(230, 255) - 242  # a little per-page variation
        paper = tuple(min(255, max(0, c + shift[k == 2])) for k, c in enumerate(PAPER[kind]))
        self.image = Image.new("RGB", (w, h), paper)
        self.draw = ImageDraw.Draw(self.image)
        self.lines: list[str] = []
        self.w, self.h = w, h

    def text(self, xy: tuple[int, int], text: str, size: int = 14, fill=(20, 20, 20)) -> None:
        self.draw.text(xy, text, font=_font(size), fill=fill)
        self.lines.append(text)

    def rule(self, y: int, x0: int = 20, x1: int | None = None) -> None:
        self.draw.line([(x0, y), (x1 or self.w - 20, y)], fill=(90, 90, 90), width=1)


def _money(rng: random.Random, lo: float = 1, hi: float = 900) -> float:
    return round(rng.uniform(lo, hi), 2)


def _fmt(v: float) -> str:
    return f"${v:,.2f}"


def render_invoice(rng: random.Random, shape: str = "a4") -> Page:
    c = _Canvas(*SHAPES[shape], rng, "invoice")
    company, city = rng.choice(COMPANIES), rng.choice(CITIES)
    number = f"INV-{rng.randint(1000, 99999)}"
    date = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    c.text((30, 25), company, 26)
    c.text((30, 60), f"{city} office", 14)
    c.text((c.w - 230, 25), f"Invoice {number}", 16)
    c.text((c.w - 230, 48), f"Date: {date}", 14)
    c.rule(90)
    y, total = 105, 0.0
    for _ in range(rng.randint(3, 8)):
        item, qty, price = rng.choice(ITEMS), rng.randint(1, 9), _money(rng, 2, 300)
        total += qty * price
        c.text((30, y), item, 14)
        c.text((c.w // 2, y), f"{qty} x {_fmt(price)}", 14)
        c.text((c.w - 140, y), _fmt(qty * price), 14)
        y += 24
    c.rule(y + 4)
    c.text((c.w - 230, y + 14), f"Total: {_fmt(total)}", 18)
    return Page("invoice", c.image, {"company": company, "number": number, "date": date,
                                     "total": _fmt(total)}, c.lines)  # fmt: skip


def render_receipt(rng: random.Random, shape: str = "receipt") -> Page:
    c = _Canvas(*SHAPES[shape], rng, "receipt")
    shop = rng.choice(COMPANIES)
    c.text((20, 15), shop, 18)
    y, total, items = 50, 0.0, []
    for _ in range(rng.randint(4, 14)):
        item, price = rng.choice(ITEMS), _money(rng, 1, 60)
        items.append(item)
        total += price
        c.text((20, y), item, 13)
        c.text((c.w - 90, y), _fmt(price), 13)
        y += 22
        if y > c.h - 60:
            break
    c.rule(y + 2)
    c.text((20, y + 10), f"TOTAL {_fmt(total)}", 16)
    return Page("receipt", c.image, {"shop": shop, "total": _fmt(total), "first_item": items[0]}, c.lines)


def render_table(rng: random.Random, shape: str = "landscape") -> Page:
    c = _Canvas(*SHAPES[shape], rng, "table")
    cols = ["Region", "Q1", "Q2", "Q3", "Q4"]
    regions = rng.sample(CITIES, k=rng.randint(3, 7))
    c.text((30, 20), f"Sales by region {rng.randint(2019, 2026)}", 20)
    cw, y = (c.w - 60) // len(cols), 60
    for j, name in enumerate(cols):
        c.text((30 + j * cw, y), name, 15)
    c.rule(y + 22)
    cells: dict[tuple[str, str], str] = {}
    for region in regions:
        y += 30
        c.text((30, y), region, 14)
        for j, q in enumerate(cols[1:], start=1):
            v = str(rng.randint(10, 999))
            cells[(region, q)] = v
            c.text((30 + j * cw, y), v, 14)
    region, q = rng.choice(regions), rng.choice(cols[1:])
    return Page("table", c.image, {"row": region, "col": q, "cell": cells[(region, q)]}, c.lines)


def render_form(rng: random.Random, shape: str = "a4") -> Page:
    c = _Canvas(*SHAPES[shape], rng, "form")
    name, city = rng.choice(NAMES), rng.choice(CITIES)
    fields = {"Name": name, "City": city, "Member ID": str(rng.randint(100000, 999999)),
              "Phone": f"+1 555 {rng.randint(1000, 9999)}"}  # fmt: skip
    c.text((30, 25), "Registration form", 24)
    y = 80
    for label, value in fields.items():
        c.text((30, y), f"{label}:", 15)
        c.draw.rectangle([(160, y - 4), (c.w - 40, y + 22)], outline=(60, 60, 60))
        c.text((168, y), value, 15, fill=(10, 10, 120))
        y += 44
    return Page("form", c.image, {"name": name, "city": city, "member_id": fields["Member ID"]}, c.lines)


def render_columns(rng: random.Random, shape: str = "a4") -> Page:
    c = _Canvas(*SHAPES[shape], rng, "columns")
    title = f"{rng.choice(COMPANIES)} newsletter"
    c.text((30, 20), title, 22)
    colw = (c.w - 80) // 2
    first_line = ""
    for col in range(2):
        y = 70
        while y < c.h - 40:
            line = " ".join(rng.choice(WORDS) for _ in range(max(2, colw // 60)))
            first_line = first_line or line
            c.text((30 + col * (colw + 20), y), line, 12)
            y += 18
    return Page("columns", c.image, {"title": title, "first_line": first_line}, c.lines)


def render_crop(rng: random.Random) -> Page:
    c = _Canvas(*SHAPES["crop"], rng, "crop")
    amount = _fmt(_money(rng))
    c.text((10, 30), f"Amount due: {amount}", 16)
    return Page("crop", c.image, {"amount": amount}, c.lines)


RENDERERS = [render_invoice, render_receipt, render_table, render_form, render_columns, render_crop]


def question_answer(page: Page, rng: random.Random) -> tuple[str, str, str]:
    """A question whose answer is text drawn on the page: (question, answer, question type)."""
    f = page.facts
    options = {
        "invoice": [("What is the invoice total?", f.get("total"), "total"),
                    ("Who issued this invoice?", f.get("company"), "issuer"),
                    ("What is the invoice number?", f.get("number"), "number")],
        "receipt": [("What is the total on this receipt?", f.get("total"), "total"),
                    ("Which shop printed this receipt?", f.get("shop"), "issuer")],
        "table": [(f"What is the {f.get('col')} value for {f.get('row')}?", f.get("cell"), "cell")],
        "form": [("What name is written on the form?", f.get("name"), "name"),
                 ("Which city is entered?", f.get("city"), "city")],
        "columns": [("What is the title of this page?", f.get("title"), "title")],
        "crop": [("How much is due?", f.get("amount"), "total")],
    }[page.kind]  # fmt: skip
    q, a, kind = rng.choice(options)
    return q, str(a), kind


# A closed-set question: the page's layout (size, tile grid, ink) tells the kind apart, six possible
# answers. Asked in this share of the single-question records, drawn from its own random stream so
# the pages stay those of the seed.
KIND_QUESTION = "What kind of document is this?"
KIND_SHARE = 0.75


def kind_question(page: Page) -> tuple[str, str, str]:
    return KIND_QUESTION, page.kind, "kind"


def _page(rng: random.Random) -> Page:
    render = rng.choice(RENDERERS)
    if render is render_crop:
        return render(rng)
    shape = rng.choice(["a4", "landscape", "receipt"] if render is not render_receipt else ["receipt"])
    return render(rng, shape)


def _save(page: Page, root: Path, rel: str) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if rel.endswith(".jpg"):
        page.image.save(path, "JPEG", quality=90)
    else:
        page.image.save(path, "PNG", compress_level=1)
    return rel


def make_instruction_record(index: int, seed: int, root: Path) -> dict:
    """One instruction record; the index picks the conversation shape so every shape is covered."""
    rng = random.Random(f"{seed}:instruct:{index}")
    style = index % 5  # 0 string, 1 parts, 2 multi-image, 3 multi-turn, 4 system message
    n_images = 2 if style == 2 else 1
    pages = [_page(rng) for _ in range(n_images)]
    ext = ".jpg" if rng.random() < 0.4 else ".png"
    files = [_save(p, root, f"images/{index:06d}_{k}{ext}") for k, p in enumerate(pages)]
    q, a, qtype = question_answer(pages[0], rng)
    if style != 2 and random.Random(f"{seed}:kind:{index}").random() < KIND_SHARE:
        q, a, qtype = kind_question(pages[0])
    qtypes = [qtype]
    context: list[dict]
    if style == 1:
        context = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                   {"role": "assistant", "content": a}]  # fmt: skip
    elif style == 2:
        q2, a2, _ = question_answer(pages[1], rng)
        qtypes = ["two-page"]
        context = [{"role": "user", "content": f"<image>\n<image>\nFirst page: {q} Second page: {q2}"},
                   {"role": "assistant", "content": f"{a}; {a2}"}]  # fmt: skip
    elif style == 3:
        q2, a2, qtype2 = question_answer(pages[0], rng)
        qtypes.append(qtype2)
        context = [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a},
                   {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]  # fmt: skip
    else:
        context = [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}]
        if style == 4:
            context.insert(0, {"role": "system", "content": "You read documents and answer briefly."})
    meta = json.dumps({"kinds": [p.kind for p in pages], "size": list(pages[0].image.size), "question_types": qtypes})
    return {"id": f"doc-{index:06d}", "name": pages[0].kind, "context": context, "image_files": files,
            "meta": meta}  # fmt: skip


def make_pretrain_record(index: int, seed: int, root: Path) -> dict:
    """A pretraining-style record: a ``text`` stream transcribing the page after its image."""
    rng = random.Random(f"{seed}:pretrain:{index}")
    page = _page(rng)
    rel = _save(page, root, f"images/{index:06d}.png")
    text = "<image>\n" + "\n".join(page.lines)
    return {"id": f"pt-{index:06d}", "name": page.kind, "text": text, "image_files": [rel],
            "meta": json.dumps({"kind": page.kind})}  # fmt: skip


def _as_parts(record: dict) -> dict:
    """Arrow columns hold one type: parquet/HF sources store every content as a list of parts."""
    out = dict(record)
    msgs = []
    for m in record.get("context") or []:
        content = m["content"]
        if isinstance(content, str):
            pieces = content.split("<image>")
            parts: list[dict] = []
            for k, piece in enumerate(pieces):
                if k:
                    parts.append({"type": "image", "text": None})
                if piece:
                    parts.append({"type": "text", "text": piece})
        else:
            parts = [{"type": p["type"], "text": p.get("text")} for p in content]
        msgs.append({"role": m["role"], "content": parts})
    if "context" in record:
        out["context"] = msgs
    return out


def _records(kind: str, n: int, seed: int, root: Path, workers: int) -> Iterator[dict]:
    make = make_instruction_record if kind == "instruct" else make_pretrain_record
    args = [(i, seed, root) for i in range(n)]
    if workers <= 1:
        yield from (make(*a) for a in args)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(make, *zip(*args, strict=True), chunksize=16)


def write_source(records: list[dict], root: Path, fmt: Format) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path = root / "data.jsonl"
        with path.open("w") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
        return path
    import datasets

    ds = datasets.Dataset.from_list([_as_parts(r) for r in records])
    if fmt == "parquet":
        path = root / "data.parquet"
        ds.to_parquet(str(path))
        return path
    path = root / "hf"
    ds.save_to_disk(str(path))
    return path


def synth_data(out: Path, n: int, seed: int = 0, fmt: Format = "jsonl", workers: int = 2) -> dict[str, Path]:
    """Write an instruction source (``out/instruct``) of ``n`` records and a pretraining source
    (``out/pretrain``) of ``max(1, n // 4)`` records. Returns the source folders."""
    out = Path(out)
    sources = {}
    for kind, count in (("instruct", n), ("pretrain", max(1, n // 4))):
        root = out / kind
        records = list(_records(kind, count, seed, root, workers))
        write_source(records, root, fmt)
        sources[kind] = root
    return sources


def corpus(n_pages: int = 300, seed: int = 0) -> Iterator[str]:
    """Document-like text for training the tiny tokenizer (no images written)."""
    for i in range(n_pages):
        rng = random.Random(f"{seed}:corpus:{i}")
        page = _page(rng)
        q, a, _ = question_answer(page, rng)
        yield "\n".join(page.lines) + f"\n{q}\n{a}\nYou read documents and answer briefly.\nPicture 1:"
