"""The torch APIs the recipe relies on, checked before anything runs: a torch that lacks one fails here, naming
what is missing and the versions this project runs on, instead of deep inside setup or the first step.

Tested torch versions: 2.13 (the pinned CI version) and 2.11 (the lent GPU machine's; the training tests ran
under it on CPU). ``gpu_check.sh``'s preflight stage prints this check's result with the versions.
"""

from __future__ import annotations

import importlib

import torch

TESTED_TORCH = ("2.11", "2.13")

# (module, attribute path) the recipe, the model or the checkpoint manager uses
REQUIRED_APIS: tuple[tuple[str, str], ...] = (
    ("torch.distributed.fsdp", "fully_shard"),
    ("torch.distributed.fsdp", "MixedPrecisionPolicy"),
    ("torch.distributed.fsdp", "FSDPModule.set_requires_gradient_sync"),
    ("torch.distributed.fsdp", "FSDPModule.set_requires_all_reduce"),
    ("torch.distributed.device_mesh", "init_device_mesh"),
    ("torch.distributed.tensor", "DTensor"),
    ("torch.distributed.tensor._utils", "compute_local_shape_and_global_offset"),  # docev.training.load
    ("torch.distributed.checkpoint", "async_save"),
    ("torch.distributed.checkpoint.staging", "DefaultStager"),
    ("torch.distributed.checkpoint.staging", "StagingOptions"),
    ("torch.distributed.checkpoint.state_dict", "get_optimizer_state_dict"),
    ("torch.distributed.checkpoint.state_dict", "set_optimizer_state_dict"),
    ("torch.nn.attention.flex_attention", "create_block_mask"),
    ("torch.nn.attention.flex_attention", "flex_attention"),
    ("torch.nn.utils", "get_total_norm"),
    ("torch.compiler", "disable"),
    ("torch._dynamo", "maybe_mark_dynamic"),
    ("torch._dynamo", "mark_dynamic"),
    ("torch._dynamo.config", "recompile_limit"),
    ("torch._dynamo.config", "fail_on_recompile_limit_hit"),
    ("torch._dynamo.eval_frame", "_debug_get_cache_entry_list"),
    ("torch.utils._python_dispatch", "TorchDispatchMode"),
    ("torch.cuda", "set_sync_debug_mode"),
)


def missing_torch_apis() -> list[str]:
    """``module.attr`` of every required API this torch lacks."""
    missing = []
    for module, path in REQUIRED_APIS:
        try:
            obj = importlib.import_module(module)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{path}")
    return missing


def require_torch_apis() -> None:
    """Raise ``RuntimeError`` naming the missing APIs and the tested versions when this torch lacks any."""
    missing = missing_torch_apis()
    if missing:
        raise RuntimeError(
            f"torch {torch.__version__} lacks {', '.join(missing)}, which the DocEV recipe uses; it runs on torch "
            f"{' and '.join(TESTED_TORCH)} (requirements.lock pins the version CI tests)"
        )
