"""``docev submit``: config → compiled pipeline → (reused) pipeline version → run, in one step.

The KFP 2.x equivalent of KFP 1.x's ``kfp run submit``. The pipeline version is named after the
sha256 of the compiled IR, so submitting the same config twice reuses the version instead of piling
up copies, and a changed config gets a new one. Authentication is kfp.Client's own: credentials from its
usual environment (``KF_PIPELINES_SA_TOKEN_PATH``, IAP client ids) or an explicit token.

The order is what can fail without a cluster first: the config was checked when it was loaded, the pipeline
is compiled here before any connection, and only then is the host contacted. The host must be named
(``--host``, ``KFP_HOST`` or kfp's ``KF_PIPELINES_ENDPOINT``): kfp.Client would otherwise try
``localhost:80``. A host that does not answer is :class:`HostUnreachable`, one line instead of urllib3's
retries and traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docev.config import DocEVConfig

HOST_ENVS = ("KFP_HOST", "KF_PIPELINES_ENDPOINT")


class HostUnreachable(ConnectionError):
    """The KFP API did not answer (refused, unknown name, timed out)."""


def kfp_host(host: str | None) -> str:
    """``host``, else ``$KFP_HOST``, else ``$KF_PIPELINES_ENDPOINT``; raises ConfigError naming them when none."""
    from docev.config import ConfigError

    for value in (host, *(os.environ.get(name) for name in HOST_ENVS)):
        if value:
            return value
    raise ConfigError(["docev submit: no KFP host; pass --host URL or set KFP_HOST (e.g. http://localhost:8080 "
                       "after `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`)"])  # fmt: skip


def _unreachable(exc: BaseException) -> str | None:
    """Why a connection failed, when ``exc`` (or its cause) is a network failure rather than an API error."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names = {cls.__name__ for cls in type(e).__mro__}
        if names & {"MaxRetryError", "NewConnectionError", "ConnectionError", "TimeoutError", "NameResolutionError"}:
            reason = getattr(e, "reason", None) or e
            text = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
            return text.split("): ", 1)[-1]  # without urllib3's "HTTPConnection(host=…, port=…)" prefix
        e = e.__cause__ or e.__context__
    return None


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

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "docev_finetune.yaml"
        compiler.Compiler().compile(build_pipeline(cfg), str(package))  # before any connection
        version = "v-" + hashlib.sha256(package.read_bytes()).hexdigest()[:16]
        if client is None:
            host = kfp_host(host)
            logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings: the one line below says it
            try:
                with warnings.catch_warnings():  # kfp's notice that it needs KFP >= 2.0.0-beta.2, on every call
                    warnings.simplefilter("ignore", FutureWarning)
                    client = kfp.Client(host=host, existing_token=existing_token)
                pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
            except Exception as exc:
                if (why := _unreachable(exc)) is None:
                    raise
                raise HostUnreachable(f"KFP host {host} unreachable: {why}") from None
        else:
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
