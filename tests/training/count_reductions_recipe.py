"""The real recipe, run by torchrun in test_recipe's hybrid test, counting its cross-replica reductions.

``torch.distributed.all_reduce`` (which FSDP2 calls for the replicate dimension of a 2-D mesh) is wrapped to
count the calls on the run's replicate group, and an optimizer step hook closes each step's count from the start
of ``train()`` (a DCP resume initialises the optimizer state with a step on zero gradients before). Each rank
writes ``{"mesh": {dim: size}, "reductions": [per step], "units": FSDP modules}`` to ``$REDUCTIONS_OUT.<rank>``.
"""

import json
import os
import sys

import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.optim.optimizer import register_optimizer_step_post_hook

from docev.training import recipe

RUN: dict = {"mesh": {}, "replicate": None, "count": 0, "reductions": [], "units": 0}

_run_mesh, _setup_model, _all_reduce = recipe.run_mesh, recipe.setup_model, dist.all_reduce
_train = recipe.DocEVFinetuneRecipe.train


def run_mesh(*args, **kwargs):
    mesh = _run_mesh(*args, **kwargs)
    RUN["mesh"] = dict(zip(mesh.mesh_dim_names, mesh.shape, strict=True))
    RUN["replicate"] = mesh.get_group("replicate") if "replicate" in mesh.mesh_dim_names else None
    return mesh


def setup_model(*args, **kwargs):
    model = _setup_model(*args, **kwargs)
    RUN["units"] = sum(isinstance(m, FSDPModule) for m in model.modules())
    return model


def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    if group is not None and group is RUN["replicate"]:
        RUN["count"] += 1
    return _all_reduce(tensor, op=op, group=group, async_op=async_op)


def train(self):
    RUN["training"], RUN["count"] = True, 0
    return _train(self)


def _step_done(optimizer, args, kwargs):
    if RUN.get("training"):
        RUN["reductions"].append(RUN["count"])
    RUN["count"] = 0


recipe.run_mesh, recipe.setup_model, dist.all_reduce = run_mesh, setup_model, all_reduce
recipe.DocEVFinetuneRecipe.train = train
register_optimizer_step_post_hook(_step_done)

if __name__ == "__main__":
    code = recipe.main()
    keep = {k: RUN[k] for k in ("mesh", "reductions", "units")}
    with open(f"{os.environ['REDUCTIONS_OUT']}.{os.environ['RANK']}", "w") as f:
        json.dump(keep, f)
    sys.exit(code)
