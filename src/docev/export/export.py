"""The export step: a training checkpoint → a verified Hugging Face model folder, published atomically.

Everything is written to a staging folder, then checked (every tensor read back bit for bit, the
layout and the tokenizer loaded, a smoke generation run from the folder itself, ``SHA256SUMS``
recomputed), and only then published. Locally the staging folder sits beside the destination and
is exchanged with it (:mod:`docev.export.publish`), so the destination holds either the old export
or the new one, whole; only a folder holding this project's export manifest is ever replaced. On an
object store (any fsspec URI whose backend is installed) the verified folder is uploaded to a staging prefix, checked
there, then copied to the destination with ``SHA256SUMS`` last; a failure removes what was copied
and puts the previous export back.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from safetensors import safe_open
from torchtune.training.precision import PRECISION_STR_TO_DTYPE

from docev.config import DocEVConfig
from docev.export.adapter import merged_and_adapter, write_adapter
from docev.export.card import (
    SmokeSample,
    TrainingFacts,
    adaptation_rows,
    eval_results,
    model_card,
    parameter_counts,
    smoke_section,
    training_facts,
)
from docev.export.checksums import SUMS, list_files, verify_checksums, write_checksums
from docev.export.publish import (
    DestinationRefused,
    check_replaceable,
    destination_lock,
    new_staging,
    recover,
    remove_owned,
    replace_export,
    seal,
)
from docev.export.weights import ExportError, export_tensors
from docev.inference.generate import DocEVGenerator, Generation
from docev.models.docev._folder import INDEX, WEIGHT_SUFFIXES, save_sharded, side_files
from docev.models.docev._peft import is_trained_only
from docev.run.checkpoints import RECIPE_STATE, CheckpointError, resolve_checkpoint, step_or_none
from docev.run.diskspace import explain_write_error
from docev.run.paths import EXPORT_UPLOAD, MANIFEST, run_paths
from docev.run.publish import remote_names
from docev.sources.readers import allowed_stores, source_name, source_store
from docev.storage import read_file
from docev.text.chat_template import resolve_chat_template
from docev.vision.image_io import load_image

# Side files of a checkpoint folder that the export writes itself.
_WRITTEN = {"generation_config.json", "chat_template.jinja", "README.md", SUMS}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    destination: str
    checkpoint: Path
    step: int | None
    dtype: str
    checksums: dict[str, str]  # file name → sha256, as in SHA256SUMS
    smoke: Generation | None


def pick_smoke_sample(cfg: DocEVConfig) -> SmokeSample | None:
    """The first image of the last accepted record with images in ``validate/manifest.jsonl``, from an
    instruction source when there is one (the smoke prompt is a question); None without any. One image:
    the prompt then fits any model that can hold a full tile grid."""
    from docev.outputs import outputs
    from docev.run.paths import MANIFEST

    outs = outputs(cfg)
    if not outs.exists(MANIFEST):
        return None
    path = outs.fetch(MANIFEST)
    sources = {source_name(d): d for d in cfg.datasets}
    last: dict[str, dict] = {}
    with path.open() as fh:
        for n, line in enumerate(fh, start=1):
            try:
                entry = json.loads(line)
                if entry["images"] and entry["source"] in sources:
                    last[sources[entry["source"]].ufx_type] = entry
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ExportError(f"{path} line {n}: not a validate manifest entry ({exc})") from None
    entry = last.get("instruction") or last.get("pretrain")
    if entry is None:
        return None
    src = sources[entry["source"]]
    store = source_store(src)  # a folder or an object store: the image's full location, confined as validated
    image = store.display(store.resolve(entry["images"][0]["path"], allowed_stores(src, cfg.validate_.allowed_roots)))
    return SmokeSample(entry["source"], str(entry["id"]), entry["file"], entry["row"], image)


def _smoke_image(cfg: DocEVConfig, sample: SmokeSample) -> Image.Image:
    src = next(d for d in cfg.datasets if source_name(d) == sample.source)
    return load_image(io.BytesIO(read_file(sample.image, src.storage_options)), name=sample.image)


def smoke_device(cfg: DocEVConfig) -> str:
    return "cuda" if cfg.device == "cuda" and torch.cuda.is_available() else "cpu"


def _write_folder(cfg: DocEVConfig, checkpoint: Path, staging: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Weights, config, tokenizer/processor files, chat template and generation config."""
    save_sharded(dict(tensors), staging, cfg.export.max_shard_bytes)
    config = json.loads((checkpoint / "config.json").read_text())
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    for src in side_files(checkpoint, skip=_WRITTEN):
        shutil.copyfile(src, staging / src.name)
    (staging / "chat_template.jinja").write_text(resolve_chat_template(cfg.tokenizer.chat_template).source)
    tokenizer = _load_tokenizer(staging)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in cfg.tokenizer.stop_tokens]
    gen_path = checkpoint / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    generation.update(eos_token_id=stops[0] if len(stops) == 1 else stops, do_sample=False)
    if tokenizer.pad_token_id is not None:
        generation["pad_token_id"] = tokenizer.pad_token_id
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))


def _load_tokenizer(folder: Path):
    """``AutoTokenizer`` from the folder with no network, as a user of the export would load it."""
    from transformers import AutoTokenizer, PretrainedConfig

    # An empty config keeps AutoTokenizer from reading config.json, whose model_type it does not know.
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, config=PretrainedConfig())


def check_tokenizer(cfg: DocEVConfig, folder: Path, image_token_id: int) -> None:
    """``<image>`` at the model's id, the stop tokens known, the training chat template in place."""
    tokenizer = _load_tokenizer(folder)
    tok = cfg.tokenizer
    problems = []
    got = tokenizer.convert_tokens_to_ids(tok.image_token)
    if got != image_token_id:
        problems.append(f"{tok.image_token} is id {got}, config.json's image_token_index is {image_token_id}")
    unknown = [t for t in tok.stop_tokens if t not in tokenizer.get_vocab()]
    if unknown:
        problems.append(f"stop tokens {unknown} are not in the vocabulary")
    if tokenizer.chat_template != resolve_chat_template(tok.chat_template).source:
        problems.append("AutoTokenizer's chat_template differs from tokenizer.chat_template used in training")
    if problems:
        raise ExportError(f"{folder}: tokenizer check failed: " + "; ".join(problems))


def check_weights(folder: Path, expected: Mapping[str, torch.Tensor]) -> None:
    """Every shard read back: the index names each tensor's file, and each tensor equals what was
    meant to be written (dtype and bits)."""
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    problems, seen = [], set()
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is no mapping
                seen.add(key)
                tensor = f.get_tensor(key)
                if weight_map.get(key) != shard:
                    problems.append(f"{key} is in {shard}, the index says {weight_map.get(key)}")
                elif key not in expected:
                    problems.append(f"{key} in {shard} was not exported")
                elif tensor.dtype != expected[key].dtype or not torch.equal(tensor, expected[key]):
                    problems.append(f"{key} in {shard} differs from the exported tensor")
    problems += [f"{key} missing from the shards" for key in sorted(set(expected) - seen)]
    if problems:
        raise ExportError(f"{folder}: weights read back wrong: " + "; ".join(problems[:10]))


def build_export(cfg: DocEVConfig, checkpoint: Path, staging: Path) -> tuple[dict[str, str], Generation | None]:
    """Write and verify the export in ``staging``; returns the checksums and the smoke generation."""
    exp = cfg.export
    dtype = PRECISION_STR_TO_DTYPE[exp.dtype]
    base = Path(cfg.checkpointer.checkpoint_dir)
    adapter = None
    if is_trained_only(checkpoint):  # an adapter run: merged model + the PEFT adapter
        tensors, arch, adapter, adapter_cfg = merged_and_adapter(checkpoint, base, cfg.model, dtype)
    else:
        tensors, arch = export_tensors(checkpoint, base, cfg.model, dtype)
    _write_folder(cfg, checkpoint, staging, tensors)
    check_weights(staging, tensors)
    if adapter is not None:
        write_adapter(staging, adapter, adapter_cfg)
        del adapter
    parameters = parameter_counts(tensors)
    del tensors  # the smoke model loads its own copy from the folder
    check_tokenizer(cfg, staging, arch.image_token_id)

    sample, result, device = pick_smoke_sample(cfg), None, smoke_device(cfg)
    why_not = f"no accepted record with images in {MANIFEST}"
    if sample is not None:
        generator = DocEVGenerator(staging, device=device)
        result = generator.generate([_smoke_image(cfg, sample)], exp.smoke_prompt,
                                    max_new_tokens=exp.smoke_max_new_tokens,
                                    sampling_ratio=min(cfg.tokenizer.sampling_ratio))  # fmt: skip
        del generator
    untrained = checkpoint.resolve() == base.resolve()
    step = step_or_none(checkpoint)
    facts: TrainingFacts = training_facts(cfg, step, untrained=untrained)
    smoke = smoke_section(sample, result, exp.smoke_prompt, exp.smoke_max_new_tokens, device, why_not, cfg.output_dir,
                          scored=bool(eval_results(cfg)))  # fmt: skip
    dtype_name = str(dtype).removeprefix("torch.")
    card = model_card(cfg, checkpoint=checkpoint, training=facts, parameters=parameters, dtype=dtype_name, smoke=smoke,
                      adaptation=adaptation_rows(cfg.model) if is_trained_only(checkpoint) else ())  # fmt: skip
    (staging / "README.md").write_text(card)
    seal(staging, {"checkpoint": str(checkpoint), "step": step, "dtype": dtype_name, "untrained": untrained})
    for path in staging.iterdir():  # safetensors writes 0600; the export is read by other pods and users
        path.chmod(0o644)
    staging.chmod(0o755)
    return write_checksums(staging), result


def export_checkpoint(
    cfg: DocEVConfig, checkpoint: str | None = None, destination: str | None = None, *, overwrite: bool | None = None
) -> ExportResult:
    """The export step (``docev export``). ``checkpoint`` / ``destination`` / ``overwrite`` default to the
    config's ``export`` section; the destination defaults to ``{output_dir}/export``. Only an export this
    project wrote is ever replaced (see :mod:`docev.export.publish`).

    Raises:
        ExportError: bad checkpoint, a destination that is not a replaceable export, a failed check.
        ChecksumError: a copy on an object store that does not match the verified folder.
    """
    exp = cfg.export
    which = checkpoint or exp.checkpoint
    try:
        source = resolve_checkpoint(cfg, which)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    dest = destination or run_paths(cfg).export
    overwrite = exp.overwrite if overwrite is None else overwrite
    fs, dest_path = fsspec.core.url_to_fs(dest)
    local = isinstance(fs, LocalFileSystem)
    # Local: staged beside the destination (one exchange publishes). Remote: under output_dir (a volume
    # sized for checkpoints, unlike /tmp).
    anchor = Path(dest_path) if local else cfg.work_root / EXPORT_UPLOAD
    anchor.parent.mkdir(parents=True, exist_ok=True)
    try:
        with destination_lock(anchor):
            for line in recover(anchor, restore=local):
                log.warning("export: %s", line)
            _check_destination(fs, dest_path, dest, overwrite)
            staging = new_staging(anchor)
            try:
                sums, smoke = build_export(cfg, source, staging)
                if local:
                    replace_export(staging, anchor)
                else:
                    _publish_remote(staging, fs, dest_path, sums, overwrite)
            except Exception as exc:  # a full or read-only disk (safetensors, torch): named with bytes needed and free
                explained = explain_write_error(exc, staging, _weight_bytes(source), "choose another --out")
                if explained is exc:
                    raise
                raise ExportError(str(explained)) from exc
            finally:
                if staging.exists():
                    remove_owned(staging)
    except DestinationRefused as exc:
        raise ExportError(str(exc)) from None
    return ExportResult(dest, source, step_or_none(source), exp.dtype, sums, smoke)


def _weight_bytes(checkpoint: Path) -> int:
    """About what an export of ``checkpoint`` writes: its weight files (an over-estimate for a DCP step, whose
    shards hold the optimizer state too)."""
    return sum(p.stat().st_size for p in checkpoint.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
               and p.name != RECIPE_STATE)  # fmt: skip


def _check_destination(fs: AbstractFileSystem, path: str, shown: str, overwrite: bool) -> None:
    if fs.exists(path) or os.path.islink(path) and isinstance(fs, LocalFileSystem):
        check_replaceable(fs, path, shown)
        if not overwrite:
            raise ExportError(f"{shown} exists; pass --overwrite (export.overwrite=true) to replace it")


def _publish_remote(staging: Path, fs: AbstractFileSystem, dest: str, sums: dict[str, str], overwrite: bool) -> None:
    """Upload to ``dest.partial-*`` and check it; move an existing ``dest`` aside (copy, then delete);
    copy the upload onto ``dest`` with ``SHA256SUMS`` last and check it. A failure after the old export
    started to move puts it back whole."""
    (stage, aside), phase = remote_names(dest), "upload"
    try:
        for name in [*list_files(fsspec.filesystem("file"), str(staging)), SUMS]:
            fs.put_file(str(staging / name), f"{stage}/{name}")
        _expect_same(verify_checksums(_url(fs, stage)), sums, stage)
        if fs.exists(dest):
            if not overwrite:
                raise ExportError(f"{_url(fs, dest)} exists; pass --overwrite (export.overwrite=true) to replace it")
            phase = "aside"
            _copy_tree(fs, dest, aside)
            phase = "replace"
            fs.rm(dest, recursive=True)
        else:
            phase = "publish"
        _copy_tree(fs, stage, dest)
        _expect_same(verify_checksums(_url(fs, dest)), sums, dest)
    except BaseException:
        if phase in ("publish", "replace") and fs.exists(dest):
            fs.rm(dest, recursive=True)
        if phase == "replace":
            _copy_tree(fs, aside, dest)
        if phase in ("aside", "replace") and fs.exists(aside):
            fs.rm(aside, recursive=True)
        raise
    finally:
        if fs.exists(stage):
            fs.rm(stage, recursive=True)
    if fs.exists(aside):
        fs.rm(aside, recursive=True)


def _copy_tree(fs: AbstractFileSystem, src: str, dst: str) -> None:
    """Every file under ``src`` to the same name under ``dst``, ``SHA256SUMS`` last (object stores copy
    file by file: until the sums arrive, the copy is visibly unfinished)."""
    names = list_files(fs, src)
    for name in [*names, *([SUMS] if fs.isfile(f"{src}/{SUMS}") else [])]:
        fs.copy(f"{src}/{name}", f"{dst}/{name}")


def _url(fs: AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path)


def _expect_same(got: dict[str, str], want: dict[str, str], where: str) -> None:
    if got != want:
        raise ExportError(f"{where}: the uploaded SHA256SUMS differs from the verified folder's")
