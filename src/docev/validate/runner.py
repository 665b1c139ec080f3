"""The validate step: fan out over record ranges, then merge into one manifest, rejects file and report.

Layout under ``{output_dir}/validate/``::

    parts/00000-of-00001/{accepted,rejects}.jsonl, fingerprints.json, stats.json   one per ``--shard i/n``
    sources.json      per source, per data file: size, mtime / ETag, XXH3-128 (docev.sources.fingerprints)
    manifest.jsonl    accepted records: source, file, row, offset, id, images, tokens per ratio
    rejects.jsonl     the original record + reason code + field + detail, for every reject
    report.json / report.md / report.html, thumbnails/

Every record read ends in exactly one of manifest.jsonl or rejects.jsonl; the merge checks
accepted + rejected = read per source and fails loudly if not. Duplicate ids are found at merge
time (workers and shards cannot see each other) with an on-disk index, so memory stays flat.
"""

from __future__ import annotations

import heapq
import json
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from docev.config import DocEVConfig, validate_dict
from docev.data.split import SplitAssigner, all_sources
from docev.outputs import outputs
from docev.run.paths import (
    ACCEPTED_FILE,
    FINGERPRINTS_FILE,
    MANIFEST,
    MANIFEST_FILE,
    REJECTS,
    REJECTS_FILE,
    SOURCE_FINGERPRINTS,
    STATS_FILE,
    VALIDATE,
    VALIDATE_REPORTS,
    validate_part,
)
from docev.run.publish import publish, write_text
from docev.sources import fingerprints
from docev.sources.formats import original_field
from docev.sources.readers import (
    RawRecord,
    Unit,
    allowed_stores,
    plan_units,
    read_at,
    read_unit,
    source_name,
    source_store,
)  # fmt: skip
from docev.storage import RETRIES, PathEscape, Store, TransientStorageError, ordered_map
from docev.tempdirs import owned_tempdir, swap_in
from docev.validate.report import write_reports
from docev.validate.rules import ImageFetch, Limits, Reject, check_record
from docev.validate.stats import SourceStats
from docev.vision.geometry import plan_tiles


def validate_dir(cfg: DocEVConfig) -> Path:
    """The local folder of the validate outputs (this process's copy when ``output_dir`` is an object store)."""
    return outputs(cfg).local(VALIDATE)


class ValidationFailed(RuntimeError):
    """A source was empty or its reject fraction exceeded ``validate.max_reject_fraction`` (reports written)."""


@dataclass
class UnitResult:
    index: int
    source: str
    accepted: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    stats: SourceStats


class UnitValidator:
    """Everything one process needs to validate units (tokenizer loaded once per process)."""

    def __init__(self, cfg: DocEVConfig):
        from docev.data.transform import build_token_counter

        self.cfg = cfg
        v, tok = cfg.validate_, cfg.tokenizer
        self.limits = Limits(v.min_image_size, v.max_image_pixels, tok.max_seq_len)
        self.count_tokens = build_token_counter(cfg)

    def run(self, index: int, source_index: int, unit: Unit) -> UnitResult:
        src = all_sources(self.cfg)[source_index]
        tok = self.cfg.tokenizer
        store = source_store(src)
        allowed = allowed_stores(src, self.cfg.validate_.allowed_roots)
        stats, accepted, rejects = SourceStats(), [], []
        retries_before = RETRIES.value

        def count(record, sizes):  # the source's system prompt replaces the record's, as in training
            return self.count_tokens(record, sizes, src.new_system_prompt)

        def fetch_all(raw: RawRecord) -> dict[str, tuple[str, bytes | BaseException] | PathEscape]:
            return {name: _fetch(store, allowed, name) for name in _image_names(raw)}

        records = read_unit(src, unit, self.cfg.validate_.max_line_bytes)
        for raw, fetched in ordered_map(fetch_all, records, src.storage_options.threads):
            if isinstance(fetched, BaseException):
                raise fetched
            stats.read += 1
            pos = {"source": unit.source, "file": raw.file, "row": raw.row, "offset": raw.offset, "unit": index}
            record_id = raw.data.get("id") if raw.data and isinstance(raw.data.get("id"), str) else None
            try:
                if raw.error:
                    raise Reject(*raw.error)
                ok = check_record(raw.data, _lookup(fetched), src.ufx_type, self.limits, count)
            except Reject as rej:
                stats.add_reject(rej.reason)
                rejects.append(
                    {
                        **pos,
                        "line": raw.row + 1,  # for people: lines (and table rows) count from 1
                        "id": record_id,
                        "reason": rej.reason,
                        "field": original_field(raw.fields, rej.field),  # the source's own name for it
                        "detail": rej.detail,
                        "images": _image_names(raw),  # every image of the record, not only the one at fault
                        "record": raw.original or (raw.data if raw.data is not None else raw.raw),
                    }
                )
                continue
            tiles = [
                plan_tiles(*im.size, tok.tile_size, tok.min_num_tiles, tok.max_num_tiles).num_tiles for im in ok.images
            ]
            stats.add_accept(ok.images, ok.tokens, tiles)
            images = [
                {"path": name, "size": list(im.size), "mode": im.mode, "tiles": n,
                 "fingerprint": fingerprints.of_bytes(fetched[name][1])}
                for name, im, n in zip(ok.record.image_files, ok.images, tiles, strict=True)
            ]  # fmt: skip
            accepted.append(
                {**pos, "id": ok.record.id, "images": images, "tokens": {str(r): n for r, n in ok.tokens.items()}}
            )
        stats.retries += RETRIES.value - retries_before
        return UnitResult(index, unit.source, accepted, rejects, stats)


def _image_names(raw: RawRecord) -> list[str]:
    """The image names a record asks for, read ahead of its checks (an ill-typed list has none)."""
    names = raw.data.get("image_files") if raw.data else None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _fetch(store: Store, allowed: list[Store], name: str) -> tuple[str, bytes | BaseException] | PathEscape:
    """(where, bytes or the non-transient read error) of one image; an escape is kept for its record's checks."""
    try:
        path = store.resolve(name, allowed)
    except PathEscape as exc:
        return exc
    except OSError as exc:  # a symlink loop: the record's reject, naming the image
        return name, exc
    where = store.display(path)
    try:
        return where, store.read_bytes(path)
    except TransientStorageError:
        raise
    except OSError as exc:  # missing / unreadable: the record's reject, as for a local file
        return where, exc


def _lookup(fetched: dict[str, tuple[str, bytes | BaseException] | PathEscape]) -> ImageFetch:
    def fetch(name: str) -> tuple[str, bytes | BaseException]:
        got = fetched[name]
        if isinstance(got, PathEscape):
            raise got
        return got

    return fetch


_WORKER: UnitValidator | None = None


def _init_worker(cfg_dict: dict[str, Any]) -> None:
    global _WORKER
    _WORKER = UnitValidator(validate_dict(cfg_dict))


def _run_unit(args: tuple[int, int, Unit]) -> UnitResult:
    assert _WORKER is not None
    return _WORKER.run(*args)


def all_units(cfg: DocEVConfig) -> list[tuple[int, int, Unit]]:
    """(global index, source index, unit) for every unit of every source, in a stable order."""
    limit = cfg.validate_.max_line_bytes
    units = [(si, u) for si, src in enumerate(all_sources(cfg)) for u in plan_units(src, max_line_bytes=limit)]
    return [(k, si, u) for k, (si, u) in enumerate(units)]


def run_shard(cfg: DocEVConfig, shard: int = 0, num_shards: int = 1, workers: int | None = None) -> Path:
    """Validate units ``k`` with ``k % num_shards == shard``; write one part folder atomically (its
    ``stats.json``, published last, marks it complete)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"--shard {shard}/{num_shards}: expected 0 <= i < n")
    workers = workers or cfg.validate_.workers
    mine = [u for u in all_units(cfg) if u[0] % num_shards == shard]
    outs, part = outputs(cfg), validate_part(shard, num_shards)
    outs.remove(f"{part}/{STATS_FILE}")  # a rerun: the old part stops counting as complete until this one is
    final = outs.local(part)
    # a fresh folder per run (racing runs cannot collide); one left by a killed run is swept once proved stale;
    # a failed shard (e.g. a storage fault that outlasted its retries) leaves nothing half-written
    with owned_tempdir(final.parent, f".{final.name}.") as tmp:
        _write_part(cfg, mine, workers, tmp, f"validate {shard}/{num_shards}")
        swap_in(tmp, final)
    for name in (ACCEPTED_FILE, REJECTS_FILE, FINGERPRINTS_FILE, STATS_FILE):
        outs.publish(f"{part}/{name}")
    return final


def _write_part(cfg: DocEVConfig, mine: list[tuple[int, int, Unit]], workers: int, tmp: Path, desc: str) -> None:
    """fingerprints.json, accepted.jsonl, rejects.jsonl and stats.json of these units in the folder ``tmp``."""
    # what each data file is before a record of it is read: any later change shows up at preprocess
    sources = all_sources(cfg)
    files: dict[str, dict[str, Any]] = {}
    for si, unit in sorted({(si, u.file): (si, u) for _, si, u in mine}.values(), key=lambda x: (x[0], x[1].file)):
        store = source_store(sources[si])
        files.setdefault(unit.source, {})[unit.file] = fingerprints.of_file(store, store.join(unit.file))
    (tmp / FINGERPRINTS_FILE).write_text(fingerprints.dumps(files))
    stats: dict[str, SourceStats] = {source_name(s): SourceStats() for s in sources}
    with (tmp / ACCEPTED_FILE).open("w") as acc, (tmp / REJECTS_FILE).open("w") as rej:
        bar = tqdm(total=sum(u.count for _, _, u in mine), unit="rec", desc=desc, disable=None, mininterval=1.0)
        for result in _results(cfg, mine, workers):
            acc.writelines(json.dumps(a) + "\n" for a in result.accepted)
            rej.writelines(json.dumps(r) + "\n" for r in result.rejects)
            stats[result.source].merge(result.stats)
            bar.update(result.stats.read)
        bar.close()
    (tmp / STATS_FILE).write_text(json.dumps({k: v.to_dict() for k, v in stats.items()}, indent=1))


def _results(cfg: DocEVConfig, units: list[tuple[int, int, Unit]], workers: int) -> Iterator[UnitResult]:
    if workers <= 1:
        validator = UnitValidator(cfg)
        yield from (validator.run(*u) for u in units)
        return
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(cfg.to_dict(),)) as pool:
        yield from pool.map(_run_unit, units, chunksize=1)


def _read_sorted(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """Merge per-part jsonl files (each sorted by unit, row) into one global order, streaming."""
    streams = [(json.loads(line) for line in p.open()) for p in paths]
    yield from heapq.merge(*streams, key=lambda r: (r["unit"], r["row"]))


def merge(cfg: DocEVConfig, num_shards: int = 1) -> dict[str, Any]:
    """Combine the parts into manifest.jsonl, rejects.jsonl and the reports; enforce the reject policy."""
    outs = outputs(cfg)
    out = validate_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    parts = [validate_part(i, num_shards) for i in range(num_shards)]
    missing = [outs.where(p) for p in parts if not outs.exists(f"{p}/{STATS_FILE}")]
    if missing:
        raise FileNotFoundError(f"validate merge: shard outputs missing: {', '.join(missing)}")
    stats = {source_name(s): SourceStats() for s in all_sources(cfg)}
    recorded: dict[str, dict[str, Any]] = {}
    for p in parts:
        for name, data in json.loads(outs.read_text(f"{p}/{STATS_FILE}")).items():
            stats[name].merge(SourceStats.from_dict(data))
        for name, files in json.loads(outs.read_text(f"{p}/{FINGERPRINTS_FILE}")).items():
            for rel, fp in files.items():
                seen = recorded.setdefault(name, {}).setdefault(rel, fp)
                if what := fingerprints.difference(seen, fp):  # two shards read one file: it changed meanwhile
                    raise fingerprints.SourceChanged(f"{name}: {rel}", f"changed while validate ran: {what}")
    sources = {source_name(s): s for s in all_sources(cfg)}
    splits = SplitAssigner(cfg)
    limit = cfg.validate_.max_line_bytes
    examples: dict[str, dict[str, Any]] = {}
    written = {name: [0, 0] for name in stats}  # accepted, rejected lines actually written
    # unique per run, the manifest staged inside it until the reports beside it are written: two merges racing
    # on one output_dir both finish (a shared staging name made one of them fail)
    with owned_tempdir(out, ".merge-") as tmp:
        db = sqlite3.connect(tmp / "ids.sqlite")
        db.execute("CREATE TABLE ids (source TEXT, id TEXT, file TEXT, row INTEGER, PRIMARY KEY (source, id))")
        with (tmp / MANIFEST_FILE).open("w") as man, (tmp / "dups.jsonl").open("w") as dups:
            for entry in _read_sorted([outs.fetch(f"{p}/{ACCEPTED_FILE}") for p in parts]):
                try:
                    db.execute(
                        "INSERT INTO ids VALUES (?, ?, ?, ?)",
                        (entry["source"], entry["id"], entry["file"], entry["row"]),
                    )
                except sqlite3.IntegrityError:
                    first = db.execute(
                        "SELECT file, row FROM ids WHERE source=? AND id=?", (entry["source"], entry["id"])
                    ).fetchone()
                    raw = read_at(sources[entry["source"]], entry["file"], entry["row"], entry["offset"], limit)
                    dups.write(
                        json.dumps(
                            {k: entry[k] for k in ("source", "file", "row", "offset", "unit")}
                            | {
                                "line": entry["row"] + 1,
                                "id": entry["id"],
                                "reason": "duplicate_id",
                                "field": "id",
                                "detail": f"id {entry['id']!r} first accepted at {first[0]} line {first[1] + 1}",
                                "images": [im["path"] for im in entry["images"]],
                                "record": raw.data,
                            }
                        )
                        + "\n"
                    )
                    s = stats[entry["source"]]
                    s.accepted -= 1
                    s.add_reject("duplicate_id")
                    continue
                entry["split"] = splits.assign(entry["source"], entry["id"])
                man.write(json.dumps(entry) + "\n")
                written[entry["source"]][0] += 1
        db.close()
        with (tmp / REJECTS_FILE).open("w") as rej:
            for entry in _read_sorted([outs.fetch(f"{p}/{REJECTS_FILE}") for p in parts] + [tmp / "dups.jsonl"]):
                rej.write(json.dumps(entry) + "\n")
                written[entry["source"]][1] += 1
                examples.setdefault(entry["reason"], entry)
        for name, s in stats.items():
            if (s.accepted + s.rejected != s.read) or written[name] != [s.accepted, s.rejected]:
                raise RuntimeError(
                    f"validate: record accounting broken for source {name}: read {s.read}, accepted "
                    f"{s.accepted} ({written[name][0]} written), rejected {s.rejected} ({written[name][1]} written)"
                )
        publish(tmp / REJECTS_FILE, outs.local(REJECTS))
        outs.publish(REJECTS)
        write_text(outs.local(SOURCE_FINGERPRINTS), fingerprints.dumps(recorded))
        outs.publish(SOURCE_FINGERPRINTS)
        report = {
            "sources": {name: s.to_dict() for name, s in stats.items()},
            "split": splits.summary(),
            "max_reject_fraction": cfg.validate_.max_reject_fraction,
            "config_hash": cfg.section_hash("datasets", "eval_datasets", "validate", "tokenizer", "seed"),
            "line_numbers": "line numbers (the line field, messages) count from 1; the row field from 0",
        }
        failing = {
            n: s["reject_fraction"]
            for n, s in report["sources"].items()
            if s["reject_fraction"] > cfg.validate_.max_reject_fraction
        }
        report["failed_sources"] = failing
        empty = [n for n, s in report["sources"].items() if s["read"] == 0]
        write_reports(cfg, report, examples, tmp / MANIFEST_FILE)
        publish(tmp / MANIFEST_FILE, outs.local(MANIFEST))
    outs.publish(MANIFEST)  # last: a reader that finds the manifest finds the rejects and reports beside it
    if empty:  # nothing read is never a success: training would start from no data
        where = ", ".join(f"{n} ({sources[n].source})" for n in empty)
        raise ValidationFailed(f"no records read from source {where}; point the source at UFX data and rerun")
    if failing:
        detail = ", ".join(f"{n}: {f:.1%}" for n, f in failing.items())
        raise ValidationFailed(
            f"reject fraction above validate.max_reject_fraction={cfg.validate_.max_reject_fraction:.1%} "
            f"({detail}); see {outs.where(REJECTS)} and {outs.where(VALIDATE_REPORTS['md'])}"
        )
    return report


def run_validate(cfg: DocEVConfig, workers: int | None = None) -> dict[str, Any]:
    """Whole step on one machine: one shard with a process pool, then the merge."""
    run_shard(cfg, 0, 1, workers)
    return merge(cfg, 1)
