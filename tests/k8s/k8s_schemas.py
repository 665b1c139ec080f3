"""Offline validators for what we send to a cluster, written independently of the renderer.

- PyTorchJob: the Training Operator's CRD schema (``<repo>/../shared/schemas/kubeflow.org_pytorchjobs.yaml``,
  ``spec.versions[0].schema.openAPIV3Schema``) made strict — an object schema that declares ``properties``
  rejects any other key unless it says ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields``
  (the API server prunes unknown fields silently; a typo would vanish) — plus the operator's admission
  webhook rules from ``../shared/schemas/README.md``.
- Core objects: ``kubernetes-validate`` (ships the Kubernetes OpenAPI schemas, works offline) in strict mode.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD = REPO.parent / "shared" / "schemas" / "kubeflow.org_pytorchjobs.yaml"
K8S_VERSION = "1.37.0"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def strict(schema: Any) -> Any:
    """Copy of an OpenAPI v3 schema in which undeclared properties are errors, recursively."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k not in ("enum", "default", "example", "required") else v for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1" and crd["spec"]["group"] == "kubeflow.org"
    schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def admission_errors(job: dict[str, Any]) -> list[str]:
    """The operator's webhook rules (release-1.9) that the CRD schema does not express."""
    errors = []
    name = job.get("metadata", {}).get("name", "")
    if len(name) > 63 or not DNS1035.match(name):
        errors.append(f"metadata.name {name!r} is not a DNS-1035 label")
    spec = job.get("spec", {})
    replicas = spec.get("pytorchReplicaSpecs") or {}
    for rtype, rspec in replicas.items():
        if rtype not in ("Master", "Worker"):
            errors.append(f"replica type {rtype!r} is not Master or Worker")
        containers = rspec.get("template", {}).get("spec", {}).get("containers") or []
        named = [c for c in containers if c.get("name") == "pytorch"]
        if not named:
            errors.append(f"{rtype}: no container named 'pytorch'")
        elif not named[0].get("image"):
            errors.append(f"{rtype}: container 'pytorch' has no image")
    if "Master" in replicas and replicas["Master"].get("replicas", 1) != 1:
        errors.append("Master.replicas must be 1")
    elastic = spec.get("elasticPolicy")
    if elastic is not None and "Worker" not in replicas:
        errors.append("elasticPolicy requires a Worker replica spec")
    if elastic is not None and elastic.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
        errors.append("elasticPolicy.nProcPerNode and spec.nprocPerNode must not both be set")
    return errors


def core_errors(obj: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}: {exc.message} at {list(exc.path)}"]
    return []


def pytorchjob_errors(job: dict[str, Any]) -> list[str]:
    """CRD schema (strict) + admission rules + each pod template against the core PodTemplate schema."""
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in crd_validator().iter_errors(job)
    ]
    errors += admission_errors(job)
    for rtype, rspec in (job.get("spec", {}).get("pytorchReplicaSpecs") or {}).items():
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{job['metadata']['name']}-{rtype.lower()}"},
            "template": rspec.get("template", {}),
        }
        errors += [f"{rtype} template: {e}" for e in core_errors(pod_template)]
    return errors
