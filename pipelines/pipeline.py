"""The DAG: resolve config → validate (fan-out + merge) → preprocess (fan-out + merge) → train → evaluate
→ export, with the base model's evaluation running beside training.

``build_pipeline(cfg)`` bakes one config into a pipeline function: the whole config is the default of
the ``config_json`` parameter and the rerun knobs default to its values. The function's signature is
built from ``docev.pipeline.params.RUN_PARAMETERS`` (KFP reads it; the body gets the values in its order).
Cluster settings (volume, secret, node selector, tolerations, resources, /dev/shm) come from the config at
compile time via kfp-kubernetes; ``kfp.local`` ignores them, which is how the same function runs on a laptop.
"""

import inspect
import json

from kfp import dsl, kubernetes

from components import evaluate as evaluate_c
from components import export as export_c
from components import preprocess as preprocess_c
from components import resolve as resolve_c
from components import train as train_c
from components import validate as validate_c
from docev.config import DocEVConfig
from docev.k8s.pod import volume_mounts
from docev.pipeline.params import RUN_PARAMETERS, knob_defaults

PIPELINE_NAME = "docev-finetune"


def _on_cluster(
    task: dsl.PipelineTask, cfg: DocEVConfig, *, retries: int = 0, shm: bool = False, step: str | None = None
) -> None:
    """Volume, security context, no caching (KFP's cache key ignores volumes), retries, /dev/shm, CPU/memory."""
    k8s = cfg.kubernetes
    task.set_caching_options(False)
    if step in k8s.step_resources:
        task.set_cpu_limit(k8s.step_resources[step].cpu).set_memory_limit(k8s.step_resources[step].memory)
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="30s", backoff_factor=2.0)
    for m in volume_mounts(cfg):
        kubernetes.mount_pvc(task, pvc_name=m.claim, mount_path=m.mount_path, sub_path=m.sub_path)
    kubernetes.set_security_context(
        task, run_as_user=k8s.run_as_user, run_as_group=k8s.run_as_group, run_as_non_root=True
    )
    if k8s.storage_secret:  # object-store credentials as env, referenced by name (never in the compiled YAML)
        kubernetes.use_secret_as_env(task, secret_name=k8s.storage_secret, secret_key_to_env=k8s.storage_secret_keys)
    if shm:
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=cfg.train.resources.shm_size
        )


def _schedule_like_training(task: dsl.PipelineTask, cfg: DocEVConfig) -> None:
    """GPUs, CPU/memory, node selector and tolerations of the training pods, for a task that trains itself."""
    res = cfg.train.resources
    task.set_cpu_limit(res.cpu).set_memory_limit(res.memory)
    if res.gpu:
        task.set_accelerator_type(res.gpu_resource).set_accelerator_limit(res.gpu)
    for key, value in cfg.kubernetes.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in cfg.kubernetes.tolerations:
        kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)


def _schedule_evaluation(task: dsl.PipelineTask, cfg: DocEVConfig) -> None:
    """One GPU of the training node type when training uses GPUs (generation is a one-process job)."""
    res = cfg.train.resources
    if res.gpu:
        task.set_accelerator_type(res.gpu_resource).set_accelerator_limit(1)
        for key, value in cfg.kubernetes.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in cfg.kubernetes.tolerations:
            kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)


def build_pipeline(cfg: DocEVConfig):
    """A ``@dsl.pipeline`` function for this config (see the module docstring)."""
    image = cfg.train.image
    resolve_op = resolve_c.build(image)
    validate_shard_op, validate_merge_op = validate_c.build(image)
    preprocess_shard_op, preprocess_merge_op = preprocess_c.build(image)
    train_op, export_op, evaluate_op = train_c.build(image), export_c.build(image), evaluate_c.build(image)
    embedded = json.dumps(cfg.to_dict(), sort_keys=True)
    v_shards, p_shards = list(range(cfg.validate_.fanout)), list(range(cfg.preprocess.fanout))

    def docev_finetune(*values):
        run = dict(zip(RUN_PARAMETERS, values, strict=True))  # KFP passes the parameters in signature order
        resolved = resolve_op(**run).set_display_name("resolve config")
        _on_cluster(resolved, cfg)

        with dsl.ParallelFor(items=v_shards, name="validate-shards") as i:
            v_shard = validate_shard_op(**run, shard=i, num_shards=len(v_shards)).after(resolved)
            _on_cluster(v_shard.set_display_name("validate shard"), cfg, retries=2, step="validate")
        v_merge = validate_merge_op(**run, num_shards=len(v_shards), shards_done=dsl.Collected(v_shard.output))
        # no KFP retry: the merge's failures are its verdicts (empty source, reject policy), which a retry would
        # only repeat; its storage faults are retried inside the task (docev.storage.with_retries)
        _on_cluster(v_merge.set_display_name("validate"), cfg, step="validate")

        with dsl.ParallelFor(items=p_shards, name="preprocess-shards") as j:
            p_shard = preprocess_shard_op(**run, shard=j, num_shards=len(p_shards)).after(v_merge)
            _on_cluster(p_shard.set_display_name("preprocess shard"), cfg, retries=2, shm=True, step="preprocess")
        p_merge = preprocess_merge_op(**run, shards_done=dsl.Collected(p_shard.output))
        _on_cluster(p_merge.set_display_name("preprocess"), cfg, retries=2, step="preprocess")

        trained = train_op(**run, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, task=dsl.PIPELINE_TASK_NAME_PLACEHOLDER)
        trained.after(p_merge).set_display_name("train")
        _on_cluster(trained, cfg, shm=cfg.train.backend == "local")  # a retried train resumes from `latest`
        if cfg.kubernetes.wandb_secret:
            kubernetes.use_secret_as_env(
                trained,
                secret_name=cfg.kubernetes.wandb_secret,
                secret_key_to_env={cfg.kubernetes.wandb_secret_key: "WANDB_API_KEY"},
                optional=True,
            )
        if cfg.train.backend == "local":
            _schedule_like_training(trained, cfg)

        # The base model is scored while training runs; the tuned one is the checkpoint the export publishes,
        # scored before the export so the model card carries both.
        base_eval = evaluate_op(**run, label="base", checkpoint="base").after(p_merge)
        _on_cluster(base_eval.set_display_name("evaluate base"), cfg, retries=1, step="evaluate")
        _schedule_evaluation(base_eval, cfg)
        tuned_eval = evaluate_op(**run, label="tuned", checkpoint="export").after(trained, base_eval)
        _on_cluster(tuned_eval.set_display_name("evaluate tuned"), cfg, retries=1, step="evaluate")
        _schedule_evaluation(tuned_eval, cfg)

        exported = export_op(**run).after(tuned_eval).set_display_name("export")
        _on_cluster(exported, cfg, retries=2, step="export")

    defaults = {"config_json": embedded, **knob_defaults(cfg)}
    docev_finetune.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults[name], annotation=kind)
         for name, kind in RUN_PARAMETERS.items()]
    )  # fmt: skip
    description = "Fine-tune DocEV Preview: validate, preprocess, train, evaluate."
    return dsl.pipeline(docev_finetune, name=PIPELINE_NAME, description=description)
