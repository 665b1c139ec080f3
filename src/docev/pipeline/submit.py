"""``docev submit``: config → compiled pipeline → (reused) pipeline version → run, in one step.

The KFP 2.x equivalent of KFP 1.x's ``kfp run submit``. The pipeline version is named after the
sha256 of the compiled IR, so submitting the same config twice reuses the version instead of piling
up copies, and a changed config gets a new one. Authentication is kfp.Client's own: the host and
credentials from its usual environment (``KF_PIPELINES_ENDPOINT``, ``KF_PIPELINES_SA_TOKEN_PATH``,
IAP client ids) or an explicit token.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docev.config import DocEVConfig


@dataclass(frozen=True)
class Submitted:
    run_id: str
    url: str
    pipeline_id: str
    version_id: str
    version_reused: bool


def _find_version(client: Any, pipeline_id: str, name: str) -> str | None:
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    versions = client.list_pipeline_versions(pipeline_id, filter=flt).pipeline_versions or []
    return versions[0].pipeline_version_id if versions else None


def submit(
    cfg: DocEVConfig,
    *,
    experiment: str,
    params: dict[str, Any] | None = None,
    host: str | None = None,
    existing_token: str | None = None,
    client: Any = None,
) -> Submitted:
    import kfp
    from kfp import compiler

    from pipelines.pipeline import PIPELINE_NAME, build_pipeline

    client = client or kfp.Client(host=host, existing_token=existing_token)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "docev_finetune.yaml"
        compiler.Compiler().compile(build_pipeline(cfg), str(package))
        version = "v-" + hashlib.sha256(package.read_bytes()).hexdigest()[:16]
        pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
        if pipeline_id is None:
            pipeline_id = client.upload_pipeline(str(package), pipeline_name=PIPELINE_NAME).pipeline_id
        version_id = _find_version(client, pipeline_id, version)
        reused = version_id is not None
        if version_id is None:
            uploaded = client.upload_pipeline_version(str(package), version, pipeline_id=pipeline_id)
            version_id = uploaded.pipeline_version_id
    exp = client.create_experiment(experiment)
    run = client.run_pipeline(
        experiment_id=exp.experiment_id,
        job_name=f"{PIPELINE_NAME}-{time.strftime('%Y%m%d-%H%M%S')}",
        pipeline_id=pipeline_id,
        version_id=version_id,
        params=params or {},
        service_account=cfg.kubernetes.service_account,  # the identity the launcher's Role is bound to
    )
    base = (host or getattr(client, "_uihost", None) or "").rstrip("/")
    return Submitted(run.run_id, f"{base}/#/runs/details/{run.run_id}", pipeline_id, version_id, reused)
