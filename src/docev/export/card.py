"""The export's ``README.md``: what the model is and where it came from, from the run's own files.

Every number is read from a file the pipeline wrote (``validate/report.json``,
``shards/manifest.json``, ``logs/metrics.jsonl``, the checkpoint folder) or computed from the
exported tensors; a fact whose file is absent reads "not available" with the path looked at.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from docev.config import DocEVConfig, ModelSection
from docev.inference.generate import NO_TEXT, Generation
from docev.models.docev._convert_weights import is_unused
from docev.models.docev._peft import PeftSpec
from docev.run.paths import VALIDATE_REPORTS, run_paths, shards_manifest_key

# The config sections that decide the trained weights (the card's config hash).
TRAINING_SECTIONS = (
    "model", "tokenizer", "datasets", "dataloader", "seed", "dtype", "master_dtype", "epochs", "max_steps_per_epoch",
    "batch_size", "gradient_accumulation_steps", "optimizer", "lr_scheduler", "loss", "clip_grad_norm",
)  # fmt: skip
NOT_AVAILABLE = "not available"


@dataclass(frozen=True)
class SmokeSample:
    """An accepted record of the validated manifest and the image the smoke generation reads."""

    source: str
    id: str
    file: str
    row: int
    image: str | Path  # a path, or a URL for a source on an object store


@dataclass(frozen=True)
class TrainingFacts:
    step: int | None  # None: the checkpoint is no step_N folder
    loss: float | None
    loss_step: int | None
    note: str  # where the loss came from, or why it is missing


def training_facts(cfg: DocEVConfig, step: int | None, *, untrained: bool) -> TrainingFacts:
    """Steps from the checkpoint's ``step_N`` name; the loss logged at the last step ≤ N in
    ``{output_dir}/logs/metrics.jsonl`` (malformed lines, e.g. cut by a kill, are skipped and counted)."""
    if untrained:
        return TrainingFacts(0, None, None, "untrained base checkpoint")
    path = run_paths(cfg).metrics
    if step is None:
        return TrainingFacts(None, None, None, "the checkpoint folder is not named step_N")
    if not path.is_file():
        return TrainingFacts(step, None, None, f"{relative(cfg, path)} does not exist")
    best: tuple[int, float] | None = None
    bad = 0
    with path.open() as fh:
        for line in fh:
            try:
                entry = json.loads(line)
                if "loss" not in entry and ("eval_loss" in entry or "event" in entry):  # eval-loss or event line
                    continue
                s, loss = int(entry["step"]), float(entry["loss"])
            except (ValueError, KeyError, TypeError):
                bad += len(line.strip()) > 0
                continue
            if s <= step and (best is None or s >= best[0]):
                best = (s, loss)
    skipped = f"; {bad} malformed line(s) skipped" if bad else ""
    if best is None:
        return TrainingFacts(step, None, None, f"no entry with step ≤ {step} in {relative(cfg, path)}{skipped}")
    return TrainingFacts(step, best[1], best[0], f"{relative(cfg, path)}{skipped}")


def _read_json(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.is_file() else None


def relative(cfg: DocEVConfig, path: str | Path) -> str:
    """A path as the card prints it: relative to the run's output folder when below it (the card travels
    with the export; absolute local paths would name another machine), else as given (URLs too)."""
    if "://" in str(path):
        return str(path)
    try:
        return str(Path(path).resolve().relative_to(cfg.work_root.resolve()))
    except ValueError:
        return str(path)


def _below(path: str, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def data_section(cfg: DocEVConfig) -> list[str]:
    """Per source: records read/accepted/rejected by validate, samples in the shards."""
    from docev.outputs import outputs

    outs = outputs(cfg)
    keys = (VALIDATE_REPORTS["json"], shards_manifest_key())
    report, manifest = (outs.read_json(k) for k in keys)
    report_path, manifest_path = (outs.where(k) if outs.remote else relative(cfg, outs.local(k)) for k in keys)
    names = [d.name or Path(d.source).name for d in cfg.datasets]
    validated = (report or {}).get("sources", {})
    shards = (manifest or {}).get("sources", {})
    lines = [
        "| source | path | weight | read | accepted | rejected | preprocessed samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in zip(names, cfg.datasets, strict=True):
        v = validated.get(name, {})
        cells = [str(v.get(k, NOT_AVAILABLE)) for k in ("read", "accepted", "rejected")]
        lines.append(
            f"| {name} | `{relative(cfg, d.source)}` | {d.weight:g} | {' | '.join(cells)} "
            f"| {shards.get(name, NOT_AVAILABLE)} |"
        )
    lines.append("")
    lines.append(
        f"Validation report: `{report_path}`."
        if report is not None
        else f"Validation counts: {NOT_AVAILABLE} (no `{report_path}`)."
    )
    if manifest is not None:
        dropped = ", ".join(f"{r}: {n}" for r, n in sorted(manifest.get("dropped", {}).items())) or "none"
        lines.append(
            f"Shards: `{manifest_path}`, {len(manifest.get('shards', []))} shard(s), "
            f"{manifest.get('total_samples', NOT_AVAILABLE)} samples, dropped by the overflow policy: {dropped}, "
            f"config hash `{manifest.get('config_hash', NOT_AVAILABLE)}`."
        )
    else:
        lines.append(f"Shards: {NOT_AVAILABLE} (no `{manifest_path}`).")
    return lines


def smoke_section(
    sample: SmokeSample | None,
    result: Generation | None,
    prompt: str,
    max_new_tokens: int,
    device: str,
    why_not: str,
    run_dir: str | Path | None = None,
    scored: bool = False,
) -> list[str]:
    """The smoke generation's facts and the command that repeats it from this folder (``scored``: the card
    carries held-out scores, so the wording can point at them). An image below
    ``run_dir`` (the run's output folder) is named relative to it, ``"$RUN"/…`` in the command: the card
    travels with the export and is the same wherever the export is published."""
    if sample is None or result is None:
        return [f"Smoke generation: {NOT_AVAILABLE} ({why_not})."]
    image = str(sample.image)
    inside = run_dir is not None and "://" not in image and _below(image, Path(run_dir))
    if inside:
        image = str(Path(image).resolve().relative_to(Path(run_dir).resolve()))
    before = ["docev", "generate", "--model", ".", "--image"]
    after = ["--prompt", prompt, "--max-new-tokens", str(max_new_tokens),
             "--sampling-ratio", str(result.sampling_ratio)]  # fmt: skip
    image_arg = f'"$RUN"/{shlex.quote(image)}' if inside else shlex.quote(image)
    command = f"{shlex.join(before)} {image_arg} {shlex.join(after)}"
    end = "the stop token" if result.stopped else f"the limit of {max_new_tokens} new tokens"
    return [
        f"Greedy decoding with a KV cache, run on this folder after it was written ({device}). Sample: "
        f"`{sample.source}` record `{sample.id}` ({sample.file}, row {sample.row}), its first image: the last "
        "accepted record with images in the validated manifest, instruction sources first; training may have "
        + (
            "seen it (the held-out scores above are on pages it did not see)."
            if scored
            else "seen it, and this run scored no held-out pages, so this answer says nothing about unseen documents."
        ),
        "",
        f"- prompt: {json.dumps(prompt)} after the image `{image}`, sampling ratio {result.sampling_ratio}, "
        f"{result.prompt_tokens} prompt tokens",
        f"- generated {len(result.token_ids)} token(s), ended by {end}; ids {result.token_ids}",
        "",
        "```text",
        result.text if result.text else NO_TEXT,
        "```",
        "",
        "Reproduce (from this folder" + ("; `RUN` is the run's output folder" if inside else "") + "):",
        "",
        "```bash",
        command,
        "```",
    ]


def eval_results(cfg: DocEVConfig) -> dict[str, dict[str, Any]]:
    """``metrics.json`` of the ``base`` / ``tuned`` evaluations that scored at least one question."""
    from docev.evaluation.report import LABELS

    paths = run_paths(cfg)
    return {k: m for k in LABELS if (m := _read_json(paths.eval_file(k, "metrics.json"))) is not None and m.get("n")}


def evaluation_section(cfg: DocEVConfig) -> list[str]:
    """The base vs tuned table of ``eval/<label>/metrics.json`` (the pipeline's evaluate tasks)."""
    from docev.evaluation.report import breakdown_sections, metric_table

    results = eval_results(cfg)
    if not results:
        return [f"{NOT_AVAILABLE}: no `eval/base` or `eval/tuned` results (hold data out with "
                "`datasets[].eval_fraction` or `eval_datasets`, then `docev evaluate`)."]  # fmt: skip
    note = (f"ANLS (DocVQA), exact match, relaxed accuracy (ChartQA: numbers within 5 %) and, for JSON answers, "
            f"field F1 on the held-out questions; greedy, "
            f"sampling ratio {next(iter(results.values()))['sampling_ratio']}. Per question: "
            "`eval/<label>/predictions.jsonl` under the run folder.")  # fmt: skip
    return [note, "", *metric_table(results), *breakdown_sections(results, level="###")]


def parameter_counts(tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(model parameters, elements of checkpoint tensors the model does not use)."""
    unused = sum(t.numel() for k, t in tensors.items() if is_unused(k))
    return sum(t.numel() for t in tensors.values()) - unused, unused


def adaptation_rows(model: ModelSection) -> list[str]:
    """Card rows of an adapter run: method, rank, alpha, targets, and what the two exports are."""
    spec = PeftSpec.from_model(model)
    if spec is None:
        return []
    method = {"lora": "LoRA", "dora": "DoRA", "qlora": "QLoRA (NF4 base)", "qdora": "DoRA on an NF4 base"}
    return [
        f"| method | {method[spec.method]} on the decoder (torchtune), merged into these weights |",
        f"| rank / alpha | {spec.rank} / {spec.alpha:g} (scale alpha/rank = {spec.scale:g}) |",
        f"| adapter targets | {', '.join(spec.targets)} (torchtune names), every decoder layer |",
        "| adapter | `adapter/` (PEFT: adapter_config.json + adapter_model.safetensors) for the base checkpoint |",
    ]


def model_card(
    cfg: DocEVConfig,
    *,
    checkpoint: Path,
    training: TrainingFacts,
    parameters: tuple[int, int],
    dtype: str,
    smoke: Sequence[str],
    adaptation: Sequence[str] = (),
) -> str:
    """The whole ``README.md`` (HF model card front matter + facts); ``adaptation``: table rows of an
    adapter run (``adaptation_rows``)."""
    base = Path(cfg.checkpointer.checkpoint_dir)
    used, unused = parameters
    if training.loss is None:
        loss = f"{NOT_AVAILABLE} ({training.note})"
    else:
        loss = f"{training.loss:.6g} at step {training.loss_step} (`{training.note}`)"
    steps = str(training.step) if training.step is not None else f"{NOT_AVAILABLE} ({training.note})"
    trained = [g for g in ("decoder", "encoder", "fusion") if getattr(cfg.model, f"{g}_trainable")]
    lines = [
        "---",
        "pipeline_tag: image-text-to-text",
        "tags: [docev, document-understanding, torchtune]",
        "---",
        "",
        f"# DocEV fine-tune: {cfg.work_root.name}",
        "",
        "A DocEV checkpoint in the released Hugging Face layout (SigLIP tower, LDPv2 connector, Llama decoder), "
        "written by `docev export`.",
        "",
        "| fact | value |",
        "|---|---|",
        f"| base checkpoint | `{relative(cfg, base)}` |",
        f"| exported checkpoint | `{relative(cfg, checkpoint)}` |",
        f"| training steps | {steps} |",
        f"| final loss | {loss} |",
        f"| trained groups | {', '.join(trained) or 'none'} (the others are the base's tensors, unchanged) |",
        *adaptation,
        f"| dtype | {dtype} |",
        f"| parameters | {used:,} (+ {unused:,} in checkpoint tensors the model does not use, carried through) |",
        f"| config hash | `{cfg.section_hash(*TRAINING_SECTIONS)}` (sha256 of {', '.join(TRAINING_SECTIONS)}) |",
        f"| chat template | `chat_template.jinja`; stop token(s) {', '.join(cfg.tokenizer.stop_tokens)} |",
        "",
        "## Data",
        "",
        *data_section(cfg),
        "",
        "## Evaluation (held-out split)",
        "",
        *evaluation_section(cfg),
        "",
        "## Smoke generation",
        "",
        *smoke,
        "",
        "## Files",
        "",
        "`model-*.safetensors` + `model.safetensors.index.json` (weights), `config.json`, tokenizer files with "
        "`<image>`, `chat_template.jinja`, `preprocessor_config.json`, `generation_config.json`. `SHA256SUMS` "
        "lists every other file; check a copy with `sha256sum -c SHA256SUMS`.",
        "",
    ]
    return "\n".join(lines)
