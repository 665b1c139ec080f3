"""The pipeline's retries never rerun a deterministic error: under kfp.local (which honours the compiled retry
policy, backoff included), attempts are counted from the console's per-attempt task logs
(``<task>.log``, ``<task>-2.log``, …; fan-out 1, so a second log can only be a retry)."""

from __future__ import annotations

import re
import shutil
from collections import Counter

import pytest
from conftest import CONFIGS

from docev.pipeline.local import local_config, run_pipeline_locally

pytestmark = pytest.mark.slow  # runs kfp.local (a subprocess per task): make test runs it, make test-fast not


def _attempts(cfg) -> dict[str, int]:
    """Task name -> attempts: ``validate-merge.log`` and ``validate-merge-2.log`` are two attempts of one task."""
    logs = sorted(p.stem for p in (cfg.work_root / "pipeline" / "logs").glob("*.log") if p.stem != "pipeline")
    tasks = [re.sub(r"-\d+$", "", stem) for stem in logs]
    return dict(Counter(tasks))


def _cfg(tmp_path, ckpt, src, *extra):
    import json

    datasets = json.dumps([{"source": str(src), "name": "docs"}])
    return local_config(CONFIGS / "tiny.yaml", [f"output_dir={tmp_path / 'out'}", "synthetic=null",
                        f"tokenizer.model_name_or_path={ckpt}", f"datasets={datasets}", "validate.thumbnails=0",
                        "validate.fanout=1", *extra])  # fmt: skip


def test_a_missing_base_checkpoint_fails_the_first_task_once(tmp_path, synth_sources):
    cfg = _cfg(tmp_path, tmp_path / "no-checkpoint", synth_sources["instruct"])
    with pytest.raises(RuntimeError):
        run_pipeline_locally(cfg)
    assert _attempts(cfg) == {"resolve-config": 1}  # no retry, and no later task started
    log = (cfg.work_root / "pipeline" / "logs" / "resolve-config.log").read_text()
    assert "PreflightError" in log and "docev init-checkpoint" in log


def test_a_failed_reject_policy_is_not_retried(tmp_path, tiny_checkpoint, synth_sources):
    src = tmp_path / "src"
    shutil.copytree(synth_sources["instruct"], src)
    with (src / "data.jsonl").open("a") as fh:
        fh.write("not json\n" * 5)
    cfg = _cfg(tmp_path, tiny_checkpoint, src)
    with pytest.raises(RuntimeError):
        run_pipeline_locally(cfg)
    assert _attempts(cfg) == {"resolve-config": 1, "validate-shard": 1, "validate-merge": 1}
    assert "ValidationFailed" in (cfg.work_root / "pipeline" / "logs" / "validate-merge.log").read_text()
