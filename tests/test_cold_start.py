"""Commands that only read a config, and the data steps, start without the training stack: each is run in a fresh
interpreter and the modules it ended with are checked (times are measured in benchmarks/cold_start.py)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import CONFIGS, ROOT

PROBE = """
import contextlib, io, json, sys
from docev.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:  # --help
        code = exc.code
watched = ("torch", "torch._dynamo", "torchtune", "torchao", "kfp", "transformers", "pandas")
print(json.dumps({"code": code, "modules": [m for m in watched if m in sys.modules]}))
"""


def _probe(*argvs: list[str]) -> list[dict]:
    """Each argv through ``docev.cli.main`` in its own fresh interpreter: exit code and heavy modules loaded."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = []
    for argv in argvs:
        done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        out.append(json.loads(done.stdout.splitlines()[-1]))
    return out


@pytest.mark.parametrize(
    "argv",
    [
        ["config", "validate", str(CONFIGS / "tiny.yaml")],
        ["config", "validate", str(CONFIGS / "tiny_lora.yaml")],  # the LoRA rules live apart from the model
        ["tokens", "--config", str(CONFIGS / "docev_preview.yaml"), "--size", "3508x2480"],
        ["render-manifests", "--config", str(CONFIGS / "docev_preview.yaml")],
        ["submit", "--help"],
    ],
)
def test_config_commands_import_neither_torch_nor_kfp(argv):
    assert _probe(argv) == [{"code": 0, "modules": []}]


def test_data_steps_import_neither_torch_nor_transformers(tmp_path, tiny_checkpoint, synth_sources):
    """validate and preprocess, run for real: the tokenizer is read with ``tokenizers``, images tiled with Pillow,
    shard columns built from buffers (pyarrow's conversion of Python rows would import pandas)."""
    datasets = json.dumps([{"source": str(synth_sources["instruct"]), "name": "instruct"}])
    common = ["--config", str(CONFIGS / "tiny.yaml"), f"output_dir={tmp_path}", "synthetic=null",
              f"tokenizer.model_name_or_path={tiny_checkpoint}", f"datasets={datasets}",
              "validate.thumbnails=0"]  # fmt: skip
    validate, preprocess = _probe(["validate", "--workers", "1", *common], ["preprocess", "--workers", "1", *common])
    assert validate == {"code": 0, "modules": []}
    assert preprocess == {"code": 0, "modules": []}
    assert (tmp_path / "shards" / "manifest.json").is_file()


def test_torchaos_version_notice_is_filtered_other_torchao_messages_show():
    """torchao's notice about its compiled kernels (imported with torchtune) is dropped at its logger; the rest
    of what torchao logs still shows."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    code = "import docev, logging, torchtune; logging.getLogger('torchao').warning('another torchao warning')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "another torchao warning" in done.stderr
    assert "Skipping import of cpp extensions" not in done.stderr


def test_data_step_modules_import_neither_torch_nor_pandas():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys, docev.cli, docev.validate.runner, docev.data.preprocess, docev.text.tokenizer; "
            "print([m for m in ('torch', 'transformers', 'pandas') if m in sys.modules])")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[]"
