"""Preflight: what a step needs before it starts, checked in seconds, each miss one line naming the command
that makes it.

A missing base checkpoint, an empty source, absent credentials or a skipped step are deterministic: running
the step (or retrying it) cannot help, so they are found before any work, by the CLI step itself and, for
the whole pipeline, by its first task (which KFP does not retry). Their exit code, :data:`PREFLIGHT_EXIT`,
tells them apart from faults a rerun may cure (``docev.cli.TRANSIENT_EXIT``). The checks read only names,
sizes and the previous step's report; nothing is written except a probe file that is removed at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from docev.config import DatasetSource, DocEVConfig, is_store_url
from docev.run.paths import run_paths
from docev.storage import TransientStorageError

PREFLIGHT_EXIT = 3  # a prerequisite is missing: deterministic, a retry would fail the same way
WEIGHT_PATTERNS = ("model.safetensors.index.json", "*.safetensors", "pytorch_model*.bin", ".metadata")


class PreflightError(RuntimeError):
    """Prerequisites a step lacks, one line each (the message joins them)."""

    def __init__(self, step: str, problems: list[str]):
        self.step, self.problems = step, problems
        super().__init__("; ".join(problems))


def _base_and_tokenizer(cfg: DocEVConfig, weights: bool) -> list[str]:
    """The base checkpoint (when ``weights``) and the tokenizer folder: present, with their files."""
    ckpt, tok = Path(cfg.checkpointer.checkpoint_dir), Path(cfg.tokenizer.model_name_or_path)
    make = "make a tiny one with `docev init-checkpoint --out {}` or point {} at a DocEV HF checkpoint"
    problems = []
    if weights and not ckpt.is_dir():
        what = "base checkpoint and tokenizer" if ckpt == tok else "base checkpoint"
        problems.append(f"{what} {ckpt}: not found; " + make.format(ckpt, "checkpointer.checkpoint_dir"))
    elif weights and not any(next(ckpt.glob(p), None) for p in WEIGHT_PATTERNS):
        problems.append(f"base checkpoint {ckpt}: no weights (model.safetensors.index.json, *.safetensors); "
                        + make.format(ckpt, "checkpointer.checkpoint_dir"))  # fmt: skip
    if not tok.is_dir():
        if not (weights and ckpt == tok):  # said once above
            problems.append(f"tokenizer {tok}: not found; " + make.format(tok, "tokenizer.model_name_or_path"))
    elif not (tok / "tokenizer.json").is_file():  # docev.text.tokenizer reads it (no conversion of other forms)
        problems.append(f"tokenizer {tok}: no tokenizer.json; "
                        + make.format(tok, "tokenizer.model_name_or_path"))  # fmt: skip
    return problems


def _credentials(url: str, anon: bool) -> str | None:
    """For an s3:// URL without anonymous access: a line when botocore's chain finds no credentials."""
    if not url.startswith(("s3://", "s3a://")) or anon:
        return None
    import botocore.session

    if botocore.session.Session().get_credentials() is None:
        return (f"{url}: no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a "
                "pod identity; kubernetes.storage_secret on the cluster; storage_options.anon: true for a public "
                "bucket)")  # fmt: skip
    return None


def _source(src: DatasetSource) -> str | None:
    """A line when a source is unreachable, has no data files, or only empty ones."""
    from docev.sources.readers import data_files, source_name, source_store

    name = source_name(src)
    if problem := _credentials(src.source, src.storage_options.anon):
        return f"source {name}: {problem}"
    try:
        files = data_files(src)
        store = source_store(src)
        if sum(store.size(path) for _, path in files) == 0:
            return f"source {name} ({src.source}): every data file is empty (0 bytes); nothing to train on"
    except TransientStorageError:
        raise  # not deterministic: the task fails and its retry (or a rerun) may succeed
    except Exception as exc:  # missing folder, no data files, denied, unknown bucket: the source as written
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if src.source in detail:
            return f"source {name}: {detail}"
        return f"source {name} ({src.source}): {type(exc).__name__}: {detail}"
    return None


def _writable(what: str, location: str, anon: bool = False) -> str | None:
    """A line when ``location`` (a folder, made if missing) cannot be written; object stores: credentials."""
    if is_store_url(location):
        return _credentials(location, anon)
    path = Path(location)
    probe = path / f".docev-preflight-{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"{what} {path}: not writable ({exc.strerror or exc})"
    return None


def _validated(cfg: DocEVConfig) -> list[str]:
    """validate's outputs exist and it passed its reject policy (what preprocess builds from)."""
    from docev.outputs import outputs
    from docev.run.paths import MANIFEST, VALIDATE_REPORTS

    outs = outputs(cfg)
    report = outs.read_json(VALIDATE_REPORTS["json"])
    if report is None or not outs.exists(MANIFEST):
        return [f"no validated records at {outs.where(MANIFEST)}; run `docev validate --config …` first"]
    failed = report.get("failed_sources") or {}
    empty = [n for n, s in report["sources"].items() if s["read"] == 0]
    if not failed and not empty:
        return []
    limit = report["max_reject_fraction"]
    parts = [f"{n} rejected {f:.1%}" for n, f in failed.items()] + [f"{n} is empty" for n in empty]
    return [f"validate failed ({', '.join(parts)}; max_reject_fraction {limit:.1%}): see "
            f"{outs.where(VALIDATE_REPORTS['md'])}; fix the data or the config and rerun `docev validate`"]  # fmt: skip


def _preprocessed(cfg: DocEVConfig) -> list[str]:
    from docev.outputs import outputs
    from docev.run.paths import shards_manifest_key

    outs, key = outputs(cfg), shards_manifest_key()
    if not outs.exists(key):
        return [f"no training shards at {outs.where(key)}; run `docev preprocess --config …` first"]
    return []


def _inputs(cfg: DocEVConfig) -> list[str]:
    """Every source reachable and non-empty, and output_dir writable."""
    from docev.data.split import all_sources

    problems = [p for src in all_sources(cfg) if (p := _source(src))]
    out = _writable("output_dir", cfg.output_dir, cfg.output_storage_options.anon)
    return problems + ([out] if out else [])


def _store_credentials(cfg: DocEVConfig) -> list[str]:
    """Credentials for every S3 source and an S3 output_dir (preprocess reads the sources' images again)."""
    from docev.data.split import all_sources

    found = [_credentials(s.source, s.storage_options.anon) for s in all_sources(cfg)]
    found.append(_credentials(cfg.output_dir, cfg.output_storage_options.anon))
    return [p for p in found if p]


def _checkpoints_writable(cfg: DocEVConfig) -> list[str]:
    problem = _writable("checkpointer.output_dir", str(run_paths(cfg).checkpoints))  # the folder training uses
    return [problem] if problem else []


CHECKS: dict[str, list[Callable[[DocEVConfig], list[str]]]] = {
    "validate": [lambda c: _base_and_tokenizer(c, weights=False), _inputs],
    "preprocess": [lambda c: _base_and_tokenizer(c, weights=False), _store_credentials, _validated],
    "evaluate": [lambda c: _base_and_tokenizer(c, weights=False), _validated],  # the held-out questions
    "train": [lambda c: _base_and_tokenizer(c, weights=True), _preprocessed, _checkpoints_writable],
    # the pipeline's first task: everything its later tasks need that exists before the run starts
    "pipeline": [lambda c: _base_and_tokenizer(c, weights=True), _inputs, _checkpoints_writable],
}


def check(cfg: DocEVConfig, step: str) -> list[str]:
    """The problems that stop ``step`` (one line each), cheapest first; empty when it can start."""
    problems: list[str] = []
    for fn in CHECKS[step]:
        problems += fn(cfg)
    return problems


def require(cfg: DocEVConfig, step: str) -> None:
    """Raise :class:`PreflightError` when ``step`` cannot start."""
    if problems := check(cfg, step):
        raise PreflightError(step, problems)
