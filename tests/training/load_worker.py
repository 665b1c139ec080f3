"""torchrun worker of tests/training/test_load.py: 2 gloo ranks fill the tiny DocEV from the tiny checkpoint twice,
the recipe's way (``load_model_state`` with ``DocEVCheckpointer.open_checkpoint``: rows read per rank) and the old
way (``load_checkpoint``'s full state dict through torchtune's ``load_from_full_model_state_dict``), in several
layouts, and compare every local tensor bit for bit. The bytes the new way takes out of the safetensors files are
counted at ``safe_open`` (a proxy around it), beside the bytes this rank keeps (its rows, in the file's dtype).
Rank 0 saves ``{scenario: [per-rank result]}``.

    torchrun --nproc_per_node 2 tests/training/load_worker.py CHECKPOINT OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from torchtune import training

import docev.models.docev._sliced as sliced
from docev.models.docev import DocEVCheckpointer, docev_from_arch, tiny
from docev.training.parallelize import build_mesh, load_model_state, parallelize_model
from docev.training.peft import PeftRun

FP32, BF16 = torch.float32, torch.bfloat16
LORA = {"lora_attn_modules": ["q_proj", "k_proj", "v_proj"], "apply_lora_to_mlp": True}
SCENARIOS = {  # name: (mesh (replicate, shard) or None for full, master dtype, compute dtype, builder kwargs)
    "full": (None, FP32, BF16, {}),
    "full_bf16_master": (None, BF16, BF16, {}),
    "hybrid": ((1, 2), FP32, FP32, {}),
    "replicated": ((2, 1), FP32, FP32, {}),
    "trainable_tower": (None, FP32, FP32, {"encoder_trainable": True}),
    "lora": (None, FP32, BF16, {"decoder_trainable": False, "lora": LORA}),
}
READ = [0]  # bytes handed out by safetensors since the last reset


class _CountingSlice:
    def __init__(self, piece):
        self._piece = piece

    def get_shape(self):
        return self._piece.get_shape()

    def get_dtype(self):
        return self._piece.get_dtype()

    def __getitem__(self, index):
        out = self._piece[index]
        READ[0] += out.numel() * out.element_size()
        return out


class _CountingHandle:
    def __init__(self, *args, **kwargs):
        self._handle = safe_open(*args, **kwargs)

    def keys(self):
        return self._handle.keys()

    def get_slice(self, key):
        return _CountingSlice(self._handle.get_slice(key))

    def get_tensor(self, key):
        out = self._handle.get_tensor(key)
        READ[0] += out.numel() * out.element_size()
        return out


def _build(world: int, mesh_shape, master, compute, kwargs):
    if mesh_shape is None:
        mesh = build_mesh("full", world_size=world, ranks_per_node=world, device_type="cpu")
    else:
        mesh = build_mesh("hybrid", world_size=world, ranks_per_node=mesh_shape[1], device_type="cpu")
    with training.set_default_dtype(master), torch.device("meta"):
        model = docev_from_arch(tiny(), **kwargs)
    return parallelize_model(model, compute_dtype=compute, master_dtype=master, mesh=mesh)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def run(checkpoint: Path, world: int, scenario: str) -> dict:
    mesh_shape, master, compute, kwargs = SCENARIOS[scenario]
    adapters = "lora" in kwargs
    ckpt = DocEVCheckpointer(checkpoint)
    READ[0] = 0
    state = ckpt.open_checkpoint()["model"]
    new = _build(world, mesh_shape, master, compute, kwargs)
    load_model_state(new, state, torch.device("cpu"), compute, fill=PeftRun.load_model if adapters else None)
    read = READ[0]
    file_dtype = {k: v.dtype for k, v in state.items()}
    unused = sum(v.numel() * v.element_size() for v in ckpt.unused.values())

    old = _build(world, mesh_shape, master, compute, kwargs)
    training.load_from_full_model_state_dict(
        old, DocEVCheckpointer(checkpoint).load_checkpoint()["model"], torch.device("cpu"), strict=not adapters
    )
    got, want = new.state_dict(), old.state_dict()
    mismatched, kept = [], unused
    for key, w in want.items():
        if key not in file_dtype:  # an adapter: not in the checkpoint (initialised, not loaded)
            continue
        g = got[key]
        if type(g) is not type(w) or g.dtype != w.dtype or not torch.equal(_local(g), _local(w)):
            mismatched.append(key)
        kept += _local(w).numel() * file_dtype[key].itemsize
    zero = [bool((_local(v) == 0).all()) for k, v in got.items() if k.endswith("lora_b.weight")]
    return {"mismatched": mismatched, "compared": len(file_dtype), "read": read, "kept": kept, "adapters_zero": zero}


def main() -> None:
    checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    sliced.safe_open = _CountingHandle  # count at the safetensors boundary what the new path reads
    results = {}
    for scenario in SCENARIOS:
        mine = run(checkpoint, world, scenario)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        results[scenario] = gathered
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
