"""The preprocess step: validated records → tiled, tokenized Arrow shards + ``manifest.json``.

Shard k holds accepted records ``[k·R, (k+1)·R)`` of ``validate/manifest.jsonl`` (R =
``preprocess.records_per_shard``), so the split is deterministic and ``--shard i/n`` (shards with
k % n == i) fans out over KFP tasks without coordination. A shard is written under a temporary name,
verified and renamed, then its sidecar ``shard-KKKKK.json`` (sha256, rows, config hash, tokenizer
fingerprint) is written: a shard counts as done only when both exist and agree, so a rerun after
``kill -9`` redoes exactly the unfinished shards, and shards built with another config or tokenizer
are refused instead of mixed. The merge writes ``manifest.json`` (shards, totals, length
histograms, bytes) and ``dropped.jsonl`` (samples the overflow policy dropped, with the reason).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from itertools import groupby
from pathlib import Path
from typing import Any

from tqdm import tqdm

from docev.config import DocEVConfig, validate_dict
from docev.data.messages import ufx_to_messages
from docev.data.shards import (
    TOKEN_BUCKETS,
    ShardError,
    bucket,
    image_row,
    original_row,
    sha256_file,
    stores_original,
    write_shard,
)
from docev.data.split import Split, all_sources
from docev.data.transform import DocEVTransform, EncodedSample, transform_from_config
from docev.outputs import Outputs, outputs
from docev.progress import bar_disabled
from docev.run.paths import (
    MANIFEST,
    SHARDS_DROPPED,
    SHARDS_MANIFEST,
    SOURCE_FINGERPRINTS,
    shards_key,
    shards_manifest_key,
)
from docev.run.publish import publishing, write_text
from docev.sources import fingerprints
from docev.sources.fingerprints import SourceChanged
from docev.sources.readers import RawRecord, Unit, allowed_stores, read_unit, source_name, source_store
from docev.storage import RETRIES, ordered_map
from docev.vision.geometry import TilePlan
from docev.vision.image_io import load_image, read_image_size
from docev.vision.tiling import PixelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "preprocessor_config.json")  # fmt: skip


def shards_dir(cfg: DocEVConfig, split: Split = "train") -> Path:
    """The local folder of the split's shards (this process's copy when ``output_dir`` is an object store)."""
    return outputs(cfg).local(shards_key(split))


def shards_location(cfg: DocEVConfig, split: Split = "train") -> str:
    """Where the split's shards are published: a folder or a URL (what training stages or reads)."""
    return outputs(cfg).where(shards_key(split))


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 over the tokenizer and image-processor files that shape the bytes of a shard."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def config_hash(cfg: DocEVConfig) -> str:
    """Everything that changes shard bytes: the transform, image encoding, sources and the validated input."""
    data = cfg.to_dict()
    blob = {
        "tokenizer": data["tokenizer"],
        "preprocess": {k: data["preprocess"][k] for k in ("image_format", "jpeg_quality", "records_per_shard")},
        "datasets": [{k: v for k, v in d.items() if k != "weight"} for d in data["datasets"]],
        "validated": sha256_file(outputs(cfg).fetch(MANIFEST)),  # fetched once per process; _chunks reads it too
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _chunks(cfg: DocEVConfig, split: Split = "train") -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(shard index, accepted manifest entries of the split) streamed from validate/manifest.jsonl."""
    size, chunk, k = cfg.preprocess.records_per_shard, [], 0
    with outputs(cfg).fetch(MANIFEST).open() as fh:
        for line in fh:
            entry = json.loads(line)
            if entry.get("split", "train") != split:
                continue
            chunk.append(entry)
            if len(chunk) == size:
                yield k, chunk
                chunk, k = [], k + 1
    if chunk:
        yield k, chunk


def check_sources(cfg: DocEVConfig) -> int:
    """Every data file validate read is still what it read (``validate/sources.json``); returns how many.

    Raises:
        SourceChanged: naming the file (or the missing record of it).
    """
    outs = outputs(cfg)
    recorded = outs.read_json(SOURCE_FINGERPRINTS)
    if recorded is None:
        raise SourceChanged(outs.where(SOURCE_FINGERPRINTS), "missing: validate recorded no source "
                            "fingerprints (an older validate)")  # fmt: skip
    stores = {source_name(s): source_store(s) for s in all_sources(cfg)}
    unknown = sorted(set(recorded) - set(stores))
    if unknown:
        raise SourceChanged(", ".join(unknown), "validated sources no longer in the config's datasets")
    return fingerprints.check_files(stores, recorded)


def count_shards(cfg: DocEVConfig, split: Split = "train") -> int:
    with outputs(cfg).fetch(MANIFEST).open() as fh:
        n = sum(1 for line in fh if json.loads(line).get("split", "train") == split)
    return -(-n // cfg.preprocess.records_per_shard)


class ShardBuilder:
    """Builds shards in one process (the transform and tokenizer are loaded once)."""

    def __init__(self, cfg: DocEVConfig, chash: str, fingerprint: str, split: Split = "train"):
        self.cfg, self.chash, self.fingerprint, self.split = cfg, chash, fingerprint, split
        self.transform: DocEVTransform = transform_from_config(cfg)
        self.sources = {source_name(s): (i, s) for i, s in enumerate(all_sources(cfg))}
        self.ratios = sorted(cfg.tokenizer.sampling_ratio)

    def _records(self, entries: list[dict[str, Any]]) -> Iterator[tuple[RawRecord, dict[str, Any]]]:
        """Read entries back in file order, one contiguous range per (source, file, unit), each with its manifest
        entry. A row that is no longer the record validate accepted there is a changed source."""
        for (name, file, _), group in groupby(entries, key=lambda e: (e["source"], e["file"], e["unit"])):
            group = list(group)
            wanted = {e["row"]: e for e in group}
            first, last = group[0], group[-1]
            unit = Unit(name, file, first["row"], last["row"] - first["row"] + 1, first["offset"] or 0)
            src = self.sources[name][1]
            for raw in read_unit(src, unit, self.cfg.validate_.max_line_bytes):
                entry = wanted.get(raw.row)
                if entry is None:
                    continue
                if raw.data is None or raw.data.get("id") != entry["id"]:
                    got = raw.data.get("id") if raw.data else raw.error
                    raise SourceChanged(f"{source_store(src).display(source_store(src).join(file))} row {raw.row}",
                                        f"validate accepted id {entry['id']!r} there, now {got!r}")  # fmt: skip
                yield raw, entry

    def _fetch_images(self, item: tuple[RawRecord, dict[str, Any]]) -> list[tuple[str, bytes]]:
        """(where, bytes) of a validated record's images, read from its source's store (thread-safe), each
        checked against the fingerprint validate recorded for it."""
        raw, entry = item
        src = self.sources[raw.source][1]
        store, allowed = source_store(src), allowed_stores(src, self.cfg.validate_.allowed_roots)
        paths = [store.resolve(name, allowed) for name in raw.data.get("image_files", [])]
        blobs = [(store.display(p), store.read_bytes(p)) for p in paths]
        for (where, blob), image in zip(blobs, entry["images"], strict=True):
            fingerprints.check_bytes(where, image.get("fingerprint"), blob)
        return blobs

    def _image(self, where: str, blob: bytes, plan: TilePlan) -> dict[str, Any]:
        """The stored form of one image: its original bytes when that is decided from its size (most pages:
        nothing decoded), else decoded, tiled and encoded as ``preprocess.image_format`` says."""
        fmt, quality = self.cfg.preprocess.image_format, self.cfg.preprocess.jpeg_quality
        if stores_original(fmt, plan, self.transform.tile_size, len(blob)):
            return original_row(plan, blob)
        tiled = self.transform.tile(load_image(io.BytesIO(blob), name=where))
        return image_row(tiled, fmt, quality, blob)

    def build(self, k: int, entries: list[dict[str, Any]]) -> dict[str, Any]:
        outs, rel = outputs(self.cfg), shards_key(self.split)
        out = outs.local(rel)
        out.mkdir(parents=True, exist_ok=True)
        t, rows, dropped, stored, original = self.transform, [], [], 0, 0
        retries_before = RETRIES.value
        threads = max(s.storage_options.threads for _, s in self.sources.values())
        for (raw, _), blobs in ordered_map(self._fetch_images, self._records(entries), threads):
            if isinstance(blobs, BaseException):
                raise blobs
            index, src = self.sources[raw.source]
            messages = ufx_to_messages(raw.data, ufx_type=src.ufx_type, new_system_prompt=src.new_system_prompt)
            tokens, mask = t.tokenize_messages(messages, ufx_type=src.ufx_type)
            # placeholder n is image_files[n]; sizes from the headers (validate decoded every image and checked
            # that its decoded size is the header's)
            sizes = [read_image_size(io.BytesIO(blob), name=where) for where, blob in blobs]
            decision = t.fit(EncodedSample(tokens, mask, sizes), self.ratios[-1])
            if decision.drop_reason is not None:
                dropped.append({"source": raw.source, "file": raw.file, "row": raw.row, "id": raw.data["id"],
                                "reason": decision.drop_reason, "length": decision.length})  # fmt: skip
                continue
            if decision.keep is not None:
                tokens, mask = tokens[: decision.keep], mask[: decision.keep]
            images = [
                self._image(where, blob, t.plan(h, w)) for (where, blob), (h, w) in zip(blobs, sizes, strict=True)
            ]
            stored += sum(len(im["original"]) + len(im["base"]) + len(im["resized"]) for im in images)
            original += sum(len(blob) for _, blob in blobs)
            row = {"id": raw.data["id"], "source": raw.source, "source_index": index, "tokens": tokens,
                   "loss_mask": mask, "images": images}  # fmt: skip
            for r in self.ratios:
                row[f"len_r{r}"] = len(tokens) + sum(t.image_tokens(h, w, r) - 1 for h, w in sizes)
            rows.append(row)
        name = _shard_name(k)
        digest, count = write_shard(out / f"{name}.arrow", rows, self.ratios)
        outs.publish(f"{rel}/{name}.arrow", keep=False)
        lengths = Counter(f"{r}:{bucket(row[f'len_r{r}'], TOKEN_BUCKETS)}" for row in rows for r in self.ratios)
        sources = Counter(row["source"] for row in rows)
        side = {"file": f"{name}.arrow", "sha256": digest, "rows": count, "config_hash": self.chash,
                "tokenizer": self.fingerprint, "dropped": dropped, "lengths": dict(lengths),
                "sources": dict(sources), "bytes_stored": stored, "bytes_original": original,
                "storage_retries": RETRIES.value - retries_before}  # fmt: skip
        write_text(out / f"{name}.json", json.dumps(side, indent=1))
        outs.publish(f"{rel}/{name}.json")  # the sidecar last: it marks the shard done
        return side


def shard_done(outs: Outputs, rel: str, k: int, chash: str, fingerprint: str) -> bool:
    """True when shard k of the folder ``rel`` is published and intact; refuses shards of another config or
    tokenizer."""
    side_rel, data_rel = f"{rel}/{_shard_name(k)}.json", f"{rel}/{_shard_name(k)}.arrow"
    side = outs.read_json(side_rel)
    if side is None:
        return False
    if side["config_hash"] != chash or side["tokenizer"] != fingerprint:
        what = "config" if side["config_hash"] != chash else "tokenizer"
        raise ShardError(
            f"{outs.where(side_rel)} was built with another {what} ({side['config_hash'][:12]}/"
            f"{side['tokenizer'][:12]}, now {chash[:12]}/{fingerprint[:12]}); shards are never mixed: use a new "
            f"output_dir or delete {outs.where(rel)}"
        )
    return outs.exists(data_rel) and outs.sha256(data_rel) == side["sha256"]


_BUILDER: ShardBuilder | None = None


def _init(cfg_dict: dict[str, Any], chash: str, fingerprint: str, split: Split) -> None:
    global _BUILDER
    _BUILDER = ShardBuilder(validate_dict(cfg_dict), chash, fingerprint, split)


def _build(k: int, entries: list[dict[str, Any]]) -> dict[str, Any]:
    assert _BUILDER is not None
    return _BUILDER.build(k, entries)


def run_shards(
    cfg: DocEVConfig, shard: int = 0, num_shards: int = 1, workers: int | None = None, split: Split = "train"
) -> list[int]:
    """Build the split's missing shards k with k % num_shards == shard. Returns the shard indices built."""
    outs, rel = outputs(cfg), shards_key(split)
    chash, fingerprint = config_hash(cfg), tokenizer_fingerprint(cfg.tokenizer.model_name_or_path)
    check_sources(cfg)
    chunks = _chunks(cfg, split)
    todo = ((k, e) for k, e in chunks
            if k % num_shards == shard and not shard_done(outs, rel, k, chash, fingerprint))  # fmt: skip
    workers = workers or cfg.preprocess.workers
    built: list[int] = []
    bar = tqdm(unit="rec", desc=f"preprocess {split} {shard}/{num_shards}", disable=bar_disabled(), mininterval=1.0)
    if workers <= 1:
        builder = ShardBuilder(cfg, chash, fingerprint, split)
        for k, entries in todo:
            builder.build(k, entries)
            built.append(k)
            bar.update(len(entries))
    else:
        init_args = (cfg.to_dict(), chash, fingerprint, split)
        with ProcessPoolExecutor(workers, initializer=_init, initargs=init_args) as pool:
            running: dict[Any, tuple[int, int]] = {}
            for k, entries in todo:  # bounded submission: the manifest is streamed, never held whole
                if len(running) >= 2 * workers:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for f in finished:
                        built.append(_collect(f, running, bar))
                running[pool.submit(_build, k, entries)] = (k, len(entries))
            for f in list(running):
                built.append(_collect(f, running, bar))
    bar.close()
    return sorted(built)


def _collect(future: Any, running: dict[Any, tuple[int, int]], bar: tqdm) -> int:
    future.result()
    k, n = running.pop(future)
    bar.update(n)
    return k


def merge(cfg: DocEVConfig, split: Split = "train") -> dict[str, Any]:
    """All shards of the split present and intact → its ``dropped.jsonl`` and, published last, ``manifest.json``."""
    outs, rel = outputs(cfg), shards_key(split)
    out = outs.local(rel)
    out.mkdir(parents=True, exist_ok=True)
    chash, fingerprint = config_hash(cfg), tokenizer_fingerprint(cfg.tokenizer.model_name_or_path)
    n = count_shards(cfg, split)
    missing = [k for k in range(n) if not shard_done(outs, rel, k, chash, fingerprint)]
    if missing:
        raise ShardError(
            f"preprocess merge: {len(missing)} of {n} shards missing or corrupt in {outs.where(rel)}: {missing[:10]}"
        )
    sides = [outs.read_json(f"{rel}/{_shard_name(k)}.json") for k in range(n)]
    lengths: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    with publishing(out / SHARDS_DROPPED) as fh:
        for side in sides:
            lengths.update(side["lengths"])
            sources.update(side["sources"])
            for d in side["dropped"]:
                dropped[d["reason"]] += 1
                fh.write(json.dumps(d) + "\n")
    outs.publish(f"{rel}/{SHARDS_DROPPED}")
    tok = cfg.tokenizer
    resample = PixelConfig.from_checkpoint(tok.model_name_or_path).resample  # what the transform tiles with
    manifest = {
        "format": "arrow-ipc", "version": 1, "config_hash": chash, "tokenizer": fingerprint,
        "tile_size": tok.tile_size, "patch_size": tok.patch_size, "ratios": sorted(tok.sampling_ratio),
        "min_num_tiles": tok.min_num_tiles, "max_num_tiles": tok.max_num_tiles, "resample": int(resample),
        "max_seq_len": tok.max_seq_len, "image_format": cfg.preprocess.image_format,
        "shards": [{"file": s["file"], "sha256": s["sha256"], "rows": s["rows"]} for s in sides],
        "total_samples": sum(s["rows"] for s in sides), "sources": dict(sorted(sources.items())),
        "dropped": dict(dropped), "length_histogram": dict(sorted(lengths.items())),
        "bytes_stored_images": sum(s["bytes_stored"] for s in sides),
        "bytes_original_images": sum(s["bytes_original"] for s in sides),
        "storage_retries": sum(s["storage_retries"] for s in sides),
    }  # fmt: skip
    write_text(out / SHARDS_MANIFEST, json.dumps(manifest, indent=2))
    outs.publish(shards_manifest_key(split))  # last: every shard it names is published and verified
    return manifest


def run_preprocess(cfg: DocEVConfig, workers: int | None = None) -> dict[str, Any]:
    """Whole step on one machine: every missing shard of both splits, then the merges; returns the
    training manifest (``eval_samples``: the held-out split's samples)."""
    for split in splits_to_build(cfg):
        run_shards(cfg, 0, 1, workers, split)
    return merge_all(cfg)


def splits_to_build(cfg: DocEVConfig) -> list[Split]:
    """``train``, plus ``eval`` when the validated manifest holds held-out records."""
    return ["train", "eval"] if count_shards(cfg, "eval") else ["train"]


def merge_all(cfg: DocEVConfig) -> dict[str, Any]:
    """Merge each split; the training manifest, with the held-out split's sample count added."""
    manifests = {split: merge(cfg, split) for split in splits_to_build(cfg)}
    return {**manifests["train"], "eval_samples": manifests["eval"]["total_samples"] if "eval" in manifests else 0}
