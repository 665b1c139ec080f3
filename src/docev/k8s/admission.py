"""Offline validators for what we send to a cluster, written independently of the renderer, so that
``docev render-manifests`` refuses to write an object the API server or the operator's webhook would reject
(and the tests check every rendered object the same way). The CRDs are vendored in ``schemas/`` (provenance
in its README).

- PyTorchJob: the Training Operator's CRD schema (``schemas/kubeflow.org_pytorchjobs.yaml``,
  ``spec.versions[0].schema.openAPIV3Schema``) made strict — an object schema that declares ``properties``
  rejects any other key unless it says ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields``
  (the API server prunes unknown fields silently; a typo would vanish) — plus the operator's admission
  webhook rules (``schemas/README.md``).
- TrainJob / ClusterTrainingRuntime: Kubeflow Trainer v2.3.0's CRDs (``schemas/trainer-v2.3.0``) made
  strict the same way, plus the CEL, webhook and torch-plugin rules the schema does not express, and the pod
  Trainer would build from a runtime and a TrainJob (``effective_pod``) checked as a core pod.
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

SCHEMAS = Path(__file__).resolve().parent / "schemas"
CRD = SCHEMAS / "kubeflow.org_pytorchjobs.yaml"
K8S_VERSION = "1.37.0"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _load(path: Path) -> Any:
    """A vendored YAML file, parsed safely (libyaml when present: the CRDs are up to 0.9 MB)."""
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


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
    crd = _load(CRD)
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


# --- Kubeflow Trainer v2.3.0: TrainJob and ClusterTrainingRuntime -------------------------------------------------
# The CRDs of schemas/trainer-v2.3.0 made strict as above, plus the rules the schema's jsonschema part cannot
# express: its CEL rules (x-kubernetes-validations) that matter here, the TrainJob webhook and the torch plugin
# (schemas/README.md).

TRAINER = SCHEMAS / "trainer-v2.3.0"
TRAINJOB_CRD = TRAINER / "trainer.kubeflow.org_trainjobs.yaml"
RUNTIME_CRD = TRAINER / "trainer.kubeflow.org_clustertrainingruntimes.yaml"
STOCK_RUNTIME = TRAINER / "torch_distributed_runtime.yaml"
TORCH_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
ML_POLICIES = ("torch", "mpi", "jax", "xgboost", "flux")


@functools.cache
def trainer_validator(path: Path) -> jsonschema.Draft7Validator:
    crd = _load(path)
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and crd["spec"]["group"] == "trainer.kubeflow.org"
    return jsonschema.Draft7Validator(strict(copy.deepcopy(version["schema"]["openAPIV3Schema"])))


def _schema_errors(path: Path, obj: dict[str, Any]) -> list[str]:
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in trainer_validator(path).iter_errors(obj)
    ]
    name = obj.get("metadata", {}).get("name", "")
    if len(name) > 63 or not DNS1035.match(name):  # the CRDs' CEL rule on metadata.name
        errors.append(f"metadata.name {name!r} is not an RFC 1035 label of at most 63 chars")
    return errors


def _pod_template_errors(what: str, template: dict[str, Any]) -> list[str]:
    """A pod template against Kubernetes' PodTemplate schema, and every mount naming a volume of the pod."""
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": what}, "template": template}
    errors = [f"{what}: {e}" for e in core_errors(pod_template)]
    spec = template.get("spec", {})
    volumes = {v["name"] for v in spec.get("volumes") or []}
    for c in spec.get("containers") or []:
        errors += [
            f"{what}: container {c['name']} mounts unknown volume {m['name']!r}"
            for m in c.get("volumeMounts") or []
            if m["name"] not in volumes
        ]
    return errors


def _replicated_jobs(runtime: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {j["name"]: j for j in runtime.get("spec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", [])}


def runtime_errors(runtime: dict[str, Any]) -> list[str]:
    """ClusterTrainingRuntime: CRD (strict) + its one-ML-policy CEL rule + each job's pod template (core)."""
    errors = _schema_errors(RUNTIME_CRD, runtime)
    policy = runtime.get("spec", {}).get("mlPolicy") or {}
    if sum(p in policy for p in ML_POLICIES) > 1:
        errors.append("mlPolicy: only one of the policies can be configured")
    for name, job in _replicated_jobs(runtime).items():
        errors += _pod_template_errors(f"{runtime['metadata']['name']}-{name}", job["template"]["spec"]["template"])
    return errors


def _upsert(items: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {i["name"]: i for i in items}
    for n in new:
        by_name[n["name"]] = {**by_name.get(n["name"], {}), **n}
    return list(by_name.values())


def effective_pod(runtime: dict[str, Any], job: dict[str, Any], job_name: str = "node", rank: int = 0) -> dict:
    """The pod template Trainer would build for node ``rank`` of ``job_name``: the runtime's, then each runtime
    patch (volumes, containers, env and mounts upserted by name; labels, annotations and the node selector
    merged; tolerations appended; other fields replaced), then ``spec.trainer`` on the ``node`` container
    (image, command, args, env, resourcesPerNode) and the torch plugin's PET_* variables. Written from the
    Trainer docs independently of the renderer; Trainer's own merge code is not available offline."""
    template = copy.deepcopy(_replicated_jobs(runtime)[job_name]["template"]["spec"]["template"])
    meta, spec = template.setdefault("metadata", {}), template["spec"]
    for patch in job["spec"].get("runtimePatches") or []:
        for rjob in patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", []):
            if rjob["name"] != job_name:
                continue
            ptemplate = rjob.get("template", {}).get("spec", {}).get("template", {})
            for key in ("labels", "annotations"):
                meta[key] = {**meta.get(key, {}), **ptemplate.get("metadata", {}).get(key, {})}
            for key, value in ptemplate.get("spec", {}).items():
                if key in ("volumes", "initContainers"):
                    spec[key] = _upsert(spec.get(key) or [], value)
                elif key == "containers":
                    for pc in value:
                        (c,) = [c for c in spec["containers"] if c["name"] == pc["name"]]
                        c["env"] = _upsert(c.get("env") or [], pc.get("env") or [])
                        c["volumeMounts"] = _upsert(c.get("volumeMounts") or [], pc.get("volumeMounts") or [])
                        if "securityContext" in pc:
                            c["securityContext"] = pc["securityContext"]
                elif key == "nodeSelector":
                    spec[key] = {**spec.get(key, {}), **value}
                elif key == "tolerations":
                    spec[key] = [*(spec.get(key) or []), *value]
                else:
                    spec[key] = value
    trainer = job["spec"].get("trainer") or {}
    (node,) = [c for c in spec["containers"] if c["name"] == "node"]
    for key in ("image", "command", "args"):
        if key in trainer:
            node[key] = trainer[key]
    if "resourcesPerNode" in trainer:
        node["resources"] = trainer["resourcesPerNode"]
    name = job["metadata"]["name"]
    torch_env = {
        "PET_NNODES": str(trainer.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))),
        "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", "auto")),
        "PET_NODE_RANK": str(rank),
        "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
        "PET_MASTER_PORT": "29500",
    }
    node["env"] = _upsert(
        node.get("env") or [], [*(trainer.get("env") or []), *[{"name": k, "value": v} for k, v in torch_env.items()]]
    )
    return template


def trainjob_errors(job: dict[str, Any], runtime: dict[str, Any] | None = None) -> list[str]:
    """TrainJob: CRD (strict) + webhook rules; with its ``runtime``, also that the reference, the patched jobs
    and containers resolve, and that the pod Trainer would build (``effective_pod``) is a valid pod."""
    errors = _schema_errors(TRAINJOB_CRD, job)
    spec = job.get("spec", {})
    env = [e.get("name") for e in (spec.get("trainer") or {}).get("env") or []]
    errors += [f"spec.trainer.env: {n} is set by the torch plugin and must not be set" for n in env if n in TORCH_ENV]
    ref = spec.get("runtimeRef") or {}
    if ref.get("apiGroup", "trainer.kubeflow.org") != "trainer.kubeflow.org":
        errors.append(f"runtimeRef.apiGroup {ref.get('apiGroup')!r} is not trainer.kubeflow.org")
    if ref.get("kind", "ClusterTrainingRuntime") not in ("ClusterTrainingRuntime", "TrainingRuntime"):
        errors.append(f"runtimeRef.kind {ref.get('kind')!r} is not a training runtime kind")
    managers = [p.get("manager") for p in spec.get("runtimePatches") or []]
    if len(managers) != len(set(managers)):
        errors.append("runtimePatches: duplicate manager (a list-map keyed by manager)")
    if runtime is None or errors:
        return errors
    if ref.get("name") != runtime["metadata"]["name"] or ref.get("kind", "ClusterTrainingRuntime") != runtime["kind"]:
        return [f"runtimeRef {ref} does not name the runtime {runtime['kind']} {runtime['metadata']['name']}"]
    jobs = _replicated_jobs(runtime)
    for patch in spec.get("runtimePatches") or []:
        for rjob in patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", []):
            if rjob["name"] not in jobs:
                errors.append(f"runtimePatches: replicated job {rjob['name']!r} is not in the runtime")
                continue
            known = {c["name"] for c in jobs[rjob["name"]]["template"]["spec"]["template"]["spec"]["containers"]}
            patched = rjob.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
            errors += [
                f"runtimePatches: container {c['name']!r} is not in the runtime's {rjob['name']!r} job"
                for c in patched.get("containers") or []
                if c["name"] not in known
            ]
    if errors:
        return errors
    return _pod_template_errors(f"{job['metadata']['name']}-node", effective_pod(runtime, job))


def manifest_errors(obj: dict[str, Any], runtime: dict[str, Any] | None = None) -> list[str]:
    """Why the API server or the operator's webhook would reject ``obj``: a PyTorchJob, a TrainJob (checked with
    the ``runtime`` it references when given), a ClusterTrainingRuntime, or a core object."""
    kind = obj.get("kind")
    if kind == "PyTorchJob":
        return pytorchjob_errors(obj)
    if kind == "TrainJob":
        return trainjob_errors(obj, runtime)
    if kind == "ClusterTrainingRuntime":
        return runtime_errors(obj)
    return core_errors(obj)
