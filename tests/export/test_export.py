"""The export step end to end: bit-identical tensors, same logits after reloading, checksums, atomic
publication (local and fsspec), the tokenizer offline, the model card's facts, and the CLI."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
from conftest import CONFIGS
from safetensors.torch import load_file

from docev.cli import main
from docev.export import ChecksumError, ExportError, export_checkpoint
from docev.export.card import TRAINING_SECTIONS
from docev.export.checksums import SUMS, verify_checksums
from docev.inference import DocEVGenerator
from docev.models.docev import DocEVCheckpointer, docev_tiny
from docev.run.checkpoints import CheckpointError, resolve_checkpoint

from .conftest import folder_tensors, make_config, sha256sum_check, sources_list


@pytest.fixture
def cfg(export_run, tiny_checkpoint, synth_sources):
    return make_config(export_run, tiny_checkpoint, synth_sources)


@pytest.fixture(scope="module")
def step_export(export_run, tiny_checkpoint, synth_sources, tmp_path_factory):
    """step_8 exported once in fp32 (read-only for the tests that use it)."""
    dest = tmp_path_factory.mktemp("published") / "export"
    cfg = make_config(export_run, tiny_checkpoint, synth_sources)
    return export_checkpoint(cfg, "latest", str(dest)), dest


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_untrained_export_is_the_base(cfg, tiny_checkpoint, tmp_path):
    dest = tmp_path / "base_export"
    result = export_checkpoint(cfg, "base", str(dest))
    base, exported = folder_tensors(tiny_checkpoint), folder_tensors(dest)
    assert set(exported) == set(base)  # SigLIP head.* included
    for key, value in base.items():
        assert exported[key].dtype == torch.float32 and torch.equal(exported[key], value), key
    assert result.step is None and result.checksums == verify_checksums(dest)
    assert json.loads((dest / "config.json").read_text()) == json.loads((tiny_checkpoint / "config.json").read_text())
    assert (dest / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()
    generation = json.loads((dest / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 4 and generation["do_sample"] is False  # 4 = <|im_end|>
    card = (dest / "README.md").read_text()
    assert "| training steps | 0 |" in card and "| final loss | not available (untrained base checkpoint) |" in card
    assert _leftovers(tmp_path) == [] and oct(dest.stat().st_mode & 0o777) == "0o755"
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in dest.iterdir())
    assert sha256sum_check(dest).returncode == 0


def _model(state, dtype=torch.float32):
    model = docev_tiny().to(dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_export_reloads_to_the_same_logits(export_run, tiny_checkpoint, synth_sources, step_checkpoint, step_export,
                                           tmp_path):  # fmt: skip
    _, fp32 = step_export
    state = DocEVCheckpointer(step_checkpoint).load_checkpoint()["model"]
    pages = sorted((synth_sources["instruct"] / "images").glob("*"))[:2]
    inputs = DocEVGenerator(step_checkpoint).prepare(pages, "What is the total?", sampling_ratio=2)
    with torch.no_grad():
        before = _model(state)(**inputs)
        after = _model(DocEVCheckpointer(fp32).load_checkpoint()["model"])(**inputs)
        assert torch.equal(after, before)

        cfg = make_config(export_run, tiny_checkpoint, synth_sources, "export.dtype=bf16")
        export_checkpoint(cfg, "step_8", str(tmp_path / "bf16"))
        exported = DocEVCheckpointer(tmp_path / "bf16").load_checkpoint()["model"]
        assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v.to(torch.bfloat16))
                   for k, v in state.items())  # fmt: skip
        half = {**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}
        assert torch.equal(_model(exported, torch.bfloat16)(**half), _model(state, torch.bfloat16)(**half))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not (tmp_path / "bf16" / "recipe_state.pt").exists()  # the optimizer state stays with training


def test_tampering_is_detected(step_export, tmp_path):
    result, published = step_export
    dest = tmp_path / "copy"
    shutil.copytree(published, dest)
    assert verify_checksums(dest) == result.checksums
    shard = sorted(dest.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    with (dest / "README.md").open("a") as fh:
        fh.write("edited\n")
    with pytest.raises(ChecksumError) as err:
        verify_checksums(dest)
    assert [p.split(":")[0] for p in err.value.problems] == ["README.md", shard.name]


def test_failed_export_leaves_no_partial_destination(cfg, tmp_path, monkeypatch):
    import docev.export.export as export_module

    def fail(*args, **kwargs):
        raise RuntimeError("disk full while writing the card")

    dest = tmp_path / "out" / "export"
    monkeypatch.setattr(export_module, "model_card", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(cfg, "base", str(dest))
    assert not dest.exists() and _leftovers(dest.parent) == []

    monkeypatch.undo()
    first = export_checkpoint(cfg, "base", str(dest))
    monkeypatch.setattr(export_module, "model_card", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(cfg, "latest", str(dest), overwrite=True)
    assert verify_checksums(dest) == first.checksums and _leftovers(dest.parent) == []


def test_existing_destination_is_refused_or_swapped_whole(cfg, tmp_path, monkeypatch):
    import docev.run.publish as publish_module
    from docev.export.publish import new_staging

    dest = tmp_path / "export"
    first = export_checkpoint(cfg, "base", str(dest))
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        export_checkpoint(cfg, "latest", str(dest), overwrite=False)

    def exchange(staging, dest):  # the swap fails: the old export stays, the new one is removed
        raise OSError("exchange failed")

    monkeypatch.setattr(publish_module, "exchange", exchange)
    with pytest.raises(OSError, match="exchange failed"):
        export_checkpoint(cfg, "latest", str(dest), overwrite=True)
    assert verify_checksums(dest) == first.checksums and _leftovers(tmp_path) == []
    monkeypatch.undo()
    real_replace = os.replace

    def replace(src, dst):  # no exchange here, and the new folder cannot take the name: the old one comes back
        if ".partial-" in str(src):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(publish_module, "_renameat2", None)
    monkeypatch.setattr(publish_module.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        export_checkpoint(cfg, "latest", str(dest), overwrite=True)
    assert verify_checksums(dest) == first.checksums and _leftovers(tmp_path) == []
    monkeypatch.undo()

    killed = new_staging(dest)  # a build killed by SIGKILL: the next export removes it
    (killed / "model-00001-of-00002.safetensors").write_bytes(b"half")
    second = export_checkpoint(cfg, "latest", str(dest), overwrite=True)
    assert second.step == 8 and verify_checksums(dest) == second.checksums != first.checksums
    assert _leftovers(tmp_path) == []


def test_tokenizer_loads_with_autotokenizer_offline(step_export):
    _, dest = step_export
    code = (
        "import sys; from transformers import AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "m = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Total?'}]}]\n"
        "print(t.convert_tokens_to_ids('<image>'), t.convert_tokens_to_ids('<|im_end|>'))\n"
        "print(repr(t.apply_chat_template(m, tokenize=False, add_generation_prompt=True)))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(dest.parent / "hf")}
    done = subprocess.run([sys.executable, "-c", code, str(dest)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ids, rendered = done.stdout.splitlines()
    assert ids == "1024 4"
    assert rendered == repr("<|im_start|>user\n<image>Total?<|im_end|>\n<|im_start|>assistant\n")


def test_model_card_facts(cfg, step_export, synth_sources, capsys):
    result, dest = step_export
    card = (dest / "README.md").read_text()
    assert "| training steps | 8 |" in card
    assert "| final loss | 5 at step 8 (`" in card and "metrics.jsonl; 1 malformed line(s) skipped`) |" in card
    assert f"| config hash | `{cfg.section_hash(*TRAINING_SECTIONS)}`" in card
    run = Path(cfg.output_dir)
    validated = json.loads((run / "validate" / "report.json").read_text())["sources"]
    shards = json.loads((run / "shards" / "manifest.json").read_text())
    assert validated["instruct"]["read"] == 20 and shards["sources"] == {"instruct": 20, "pretrain": 5}
    for name, counts in validated.items():
        row = f"| {counts['read']} | {counts['accepted']} | {counts['rejected']} | {shards['sources'][name]} |"
        assert f"| {name} | `{synth_sources[name]}` | 1 {row}" in card
    assert "3 shard(s), 25 samples, dropped by the overflow policy: none" in card
    # the smoke output in the card is what `docev generate` prints from the published folder
    smoke = result.smoke
    assert "Sample: `instruct` record `doc-000019` (data.jsonl, row 19), its first image" in card
    assert smoke is not None and f"```text\n{smoke.text}\n```" in card
    assert f"generated {len(smoke.token_ids)} token(s)" in card
    command = card.split("```bash\n")[1].split("\n```")[0]
    argv = shlex.split(command)
    assert argv[:4] == ["docev", "generate", "--model", "."]
    assert main(["generate", "--model", str(dest), *argv[4:]]) == 0
    assert capsys.readouterr().out == smoke.text + "\n"


def test_card_says_not_available_without_runfolder_tensors(tiny_checkpoint, synth_sources, tmp_path):
    cfg = make_config(tmp_path / "fresh", tiny_checkpoint, synth_sources)
    result = export_checkpoint(cfg, "base")
    assert result.destination == str(tmp_path / "fresh" / "export") and result.smoke is None
    card = (tmp_path / "fresh" / "export" / "README.md").read_text()
    assert "| instruct | `" in card and "| not available | not available | not available | not available |" in card
    assert "Validation counts: not available (no `" in card and "Shards: not available (no `" in card
    assert "Smoke generation: not available (no accepted record with images in " in card


@pytest.fixture
def memory_fs():
    fs = fsspec.filesystem("memory")
    yield fs
    if fs.exists("/exports"):
        fs.rm("/exports", recursive=True)


def test_fsspec_destination(cfg, step_export, memory_fs):
    local, _ = step_export
    url = "memory://exports/run/export"
    result = export_checkpoint(cfg, "latest", url)
    assert result.destination == url
    assert verify_checksums(url) == result.checksums == local.checksums  # the same bytes as the local export
    assert memory_fs.find("/exports/run") == sorted(f"/exports/run/export/{n}" for n in [*result.checksums, SUMS])
    with pytest.raises(ExportError, match="memory://exports/run/export exists; pass --overwrite"):
        export_checkpoint(cfg, "base", url, overwrite=False)
    replaced = export_checkpoint(cfg, "base", url, overwrite=True)
    assert verify_checksums(url) == replaced.checksums != result.checksums
    assert memory_fs.ls("/exports/run", detail=False) == ["/exports/run/export"]
    assert _leftovers(Path(cfg.output_dir)) == []  # the local staging folder is gone too


def _flaky(monkeypatch, fs, method, fail_at):
    """The store's ``method`` fails once, at its ``fail_at``-th call (a transient error)."""
    calls, real = [], getattr(type(fs), method)

    def flaky(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == fail_at:
            raise OSError(f"connection reset during {method} {path}")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(type(fs), method, flaky)
    return calls


# 13 files + SHA256SUMS: copies 1-14 move the old export aside, then it is deleted, copies 15-28 publish.
@pytest.mark.parametrize(
    "method, fail_at, where",
    [("copy", 3, "copy /exports/run/export/"), ("rm", 1, "rm /exports/run/export$"),
     ("copy", 20, "copy /exports/run/export.partial-"), ("copy", 28, "copy /exports/run/export.partial-.*/SHA256SUMS")],
)  # fmt: skip
def test_fsspec_failure_keeps_the_previous_export(cfg, memory_fs, monkeypatch, method, fail_at, where):
    url = "memory://exports/run/export"
    first = export_checkpoint(cfg, "latest", url)
    _flaky(monkeypatch, memory_fs, method, fail_at)
    with pytest.raises(OSError, match=f"connection reset during {where}"):
        export_checkpoint(cfg, "base", url, overwrite=True)
    monkeypatch.undo()
    assert verify_checksums(url) == first.checksums  # the previous export, whole
    assert memory_fs.ls("/exports/run", detail=False) == ["/exports/run/export"]  # no staging or aside left


def test_fsspec_failure_on_a_new_destination_leaves_nothing(cfg, memory_fs, monkeypatch):
    calls = _flaky(monkeypatch, memory_fs, "copy", 5)
    with pytest.raises(OSError, match="connection reset during copy /exports/new/export.partial-"):
        export_checkpoint(cfg, "base", "memory://exports/new/export")
    monkeypatch.undo()
    assert len(calls) == 5 and memory_fs.find("/exports") == []


def test_resolve_checkpoint(cfg, step_checkpoint, tiny_checkpoint, tmp_path):
    assert resolve_checkpoint(cfg, "latest") == step_checkpoint == resolve_checkpoint(cfg, "step_8")
    assert resolve_checkpoint(cfg, "base") == tiny_checkpoint
    assert resolve_checkpoint(cfg, str(step_checkpoint)) == step_checkpoint
    with pytest.raises(CheckpointError, match="step_99 is not a checkpoint folder"):
        resolve_checkpoint(cfg, "step_99")
    with pytest.raises(CheckpointError, match=f"no checkpoint under {tmp_path} yet"):
        resolve_checkpoint(cfg.model_copy(update={"checkpointer": cfg.checkpointer.model_copy(
            update={"output_dir": str(tmp_path)})}), "latest")  # fmt: skip
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        resolve_checkpoint(cfg, str(tmp_path))


def test_shard_size(cfg, tmp_path):
    small = cfg.model_copy(update={"export": cfg.export.model_copy(update={"max_shard_size": "300KB"})})
    assert small.export.max_shard_bytes == 300_000
    export_checkpoint(small, "base", str(tmp_path / "small"))
    shards = sorted((tmp_path / "small").glob("model-*.safetensors"))
    index = json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    for shard in shards:  # a tensor larger than the limit gets a shard of its own (transformers does the same)
        tensors = load_file(str(shard))
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 300_000


def test_cli(export_run, tiny_checkpoint, synth_sources, tmp_path, capsys):
    overrides = [f"output_dir={export_run}", f"tokenizer.model_name_or_path={tiny_checkpoint}", "synthetic=null",
                 f"datasets={json.dumps(sources_list(synth_sources))}", "export.overwrite=false"]  # fmt: skip
    args = ["export", "--config", str(CONFIGS / "tiny.yaml"), "--out", str(tmp_path / "cli"), *overrides]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"checkpoints/step_8 (fp32) to {tmp_path / 'cli'}" in out and "smoke generation: " in out
    assert main(args) == 1
    assert "export failed: " in capsys.readouterr().err
    assert main([*args, "--overwrite", "--checkpoint", "base"]) == 0
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    assert "config.json does not exist" in capsys.readouterr().err
