"""Stages 3 to 5 of ``benchmarks/gpu_check.sh``, after the training run (stage 2, ``gpu_check.py``):

3. one decoder layer at the widths of DocEV Preview on a packed row of 8192 tokens (4 documents), flex
   attention (``BlockMask``) vs SDPA (one causal row), activation checkpointing off/on: forward + backward
   TFLOP/s (``gpu_check.model_flops``' definition per layer: attended pairs) and GiB per layer (what the
   forward leaves for the backward, and the peak), extrapolated to the 48 layers; the vision tower (27
   layers) forward on 10 tiles;
4. one training micro-batch and optimizer step of the check's model counted for host syncs, with
   ``torch.cuda.set_sync_debug_mode("warn")`` and ``HostSyncCounter``, under the profiler: a Chrome trace
   ``$OUT/trace.json.gz``;
5. MFU of stage 2 against the device's spec bf16 peak and the bf16 matmul peak measured here (8192³), and
   tokens/s/GPU beside torchtitan's published Llama-3.1-8B figures on H100 (FSDP, 8192 tokens: 5,762 eager,
   6,667 compiled), scaled by FLOPs per token. torchtitan counts ``6·N`` (N without the embedding) plus
   ``12·L·H·Q·T`` for attention over the whole T² (not halved for causality): 57.9 GFLOP per token; ours counts
   the pairs the kernel computes, so the comparison is of FLOP/s as each side defines them.

On CPU (``--dry-run``): the tiny model, 256 tokens, SDPA only (flex attention has no CPU backward), a 512³
fp32 matmul; no spec peak.

    python benchmarks/gpu_kernels.py WORKDIR
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import time
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from gpu_check import SPEC_BF16_FLOPS, TOY, arch, device, docev_reduced, model_flops, out_dir, record
from torch.utils.checkpoint import checkpoint
from torchtune.modules.loss import CEWithChunkedOutputLoss

from docev.models.docev import docev_from_arch, image_positions, materialize, preview
from docev.models.docev._attention import attended_pairs, document_mask
from docev.training.host_sync import HostSyncCounter
from docev.vision.geometry import num_image_tokens, plan_tiles

GIB = 2**30
# torchtitan, Llama-3.1-8B on H100 (FSDP, seq 8192): tokens/s/GPU, and its FLOPs per token by its formula
TITAN_TOKENS_PER_S = {"eager": 5762, "compiled": 6667}
_L, _D, _KV, _FFN, _V, _T = 32, 4096, 1024, 14336, 128256, 8192
TITAN_FLOPS_PER_TOKEN = 6 * (_L * (2 * _D * _D + 2 * _D * _KV + 3 * _D * _FFN) + _V * _D) + 12 * _L * _D * _T


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _init(module: torch.nn.Module, dev: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return materialize(module, dev).to(dtype)


def _timed(fn: Any, dev: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernels chosen, flex compiled
    _sync(dev)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(dev)
    return (time.perf_counter() - start) / repeats


def _layer_step(layer: torch.nn.Module, x: torch.Tensor, kwargs: dict[str, Any], ckpt: bool) -> int:
    """Forward (checkpointed or not) and backward of one layer; returns the bytes the forward left allocated."""
    cuda = x.device.type == "cuda"
    before = torch.cuda.memory_allocated(x.device) if cuda else 0
    h = checkpoint(layer, x, use_reentrant=False, **kwargs) if ckpt else layer(x, **kwargs)
    saved = torch.cuda.memory_allocated(x.device) - before if cuda else 0
    h.float().square().mean().backward()
    x.grad = None
    return saved


def _memory(fn: Any, dev: torch.device) -> tuple[float | None, float | None]:
    """GiB the forward leaves for the backward, and the peak of forward + backward, above what was there."""
    if dev.type != "cuda":
        return None, None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    saved = fn()
    torch.cuda.synchronize(dev)
    return saved / GIB, (torch.cuda.max_memory_allocated(dev) - base) / GIB


def layers_stage() -> dict[str, Any]:
    """Stage 3 (see the module docstring)."""
    dev, dtype = device(), torch.float32 if TOY else torch.bfloat16
    full = arch() if TOY else preview()
    seq, depth = (256, 48) if TOY else (8192, full.layers)
    with torch.device("meta"):
        model = docev_from_arch(replace(full, layers=1))
    layer = _init(model.decoder.layers[0], dev, dtype)
    n_layer = sum(p.numel() for p in layer.parameters())
    docs = [seq // 4] * 4
    ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(docs)]).to(dev)[None]
    pos = torch.cat([torch.arange(n) for n in docs]).to(dev)[None]
    kinds = ["sdpa"] if dev.type == "cpu" else ["flex", "sdpa"]
    out: dict[str, Any] = {"seq": seq, "layers_extrapolated": depth, "dtype": str(dtype)}
    for kind in kinds:
        mask = document_mask(ids, "flex") if kind == "flex" else None  # sdpa: one causal row
        pairs = attended_pairs(docs) if kind == "flex" else attended_pairs([seq])  # model_flops' definition
        flops = 6 * n_layer * seq + 12 * full.dim * pairs
        kwargs = {"mask": mask, "input_pos": pos if kind == "flex" else None}
        for ckpt in (False, True):
            x = torch.randn(1, seq, full.dim, device=dev, dtype=dtype, requires_grad=True)
            step = partial(_layer_step, layer, x, kwargs, ckpt)
            seconds = _timed(step, dev, 2 if TOY else 5)
            saved, peak = _memory(step, dev)
            name = f"{kind}_{'ckpt' if ckpt else 'no_ckpt'}"
            out[name] = {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "saved_gib": saved, "peak_gib": peak,
                         f"ms_x{depth}": seconds * 1e3 * depth,
                         f"saved_gib_x{depth}": None if saved is None else saved * depth}  # fmt: skip
            print(f"[gpu_check] layer {name}: " + json.dumps(out[name]), flush=True)
    if dev.type == "cpu":
        out["flex"] = "not run on CPU (flex attention has no CPU backward)"
    out["vision_tower"] = _vision_tower(full, dev, dtype)
    return out


def _vision_tower(full: Any, dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The whole tower (27 layers at preview size) forward on 10 tiles, frozen (no grad), as training runs it."""
    with torch.device("meta"):
        model = docev_from_arch(replace(full, layers=1))
    tower = _init(model.encoder, dev, dtype)
    tiles = torch.randn(10, 3, full.tile_size, full.tile_size, device=dev, dtype=dtype)
    with torch.no_grad():
        seconds = _timed(lambda: tower(tiles), dev, 2 if TOY else 5)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            tower(tiles)
            peak = (torch.cuda.max_memory_allocated(dev) - base) / GIB
        else:
            peak = None
    n = sum(p.numel() for p in tower.parameters())
    patches = (full.tile_size // full.patch_size) ** 2
    flops = 10 * (2 * n * patches + 4 * full.vision_layers * patches**2 * full.vision_width)
    return {"layers": full.vision_layers, "tiles": 10, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
            "peak_gib": peak}  # fmt: skip


def _train_batch(a: Any, dev: torch.device) -> dict[str, Any]:
    """One row: text, one 800×600 page's image slots, text; S a multiple of the 8 loss chunks."""
    grid = list(plan_tiles(800, 600, a.tile_size, a.min_num_tiles, a.max_num_tiles).grid)
    n = num_image_tokens(800, 600, 2, tile_size=a.tile_size, patch_size=a.patch_size)
    row = list(range(5, 69)) + [a.image_token_id] * n + list(range(5, 69))
    tokens = torch.tensor([row + [0] * (-len(row) % 8)])
    tiles = 1 + grid[0] * grid[1]
    pixels = torch.randint(0, 256, (1, tiles, 3, a.tile_size, a.tile_size), dtype=torch.uint8)
    return {"tokens": tokens, "pixels": pixels, "sizes": [[800, 600]], "grids": [grid], "tiles": tiles}


def host_syncs_stage(out: Path) -> dict[str, Any]:
    """Stage 4: a micro-batch + optimizer step of the check's model, counted (see the module docstring)."""
    from docev.vision.tiling import normalize

    dev, dtype = device(), torch.float32 if TOY else torch.bfloat16
    a = arch()
    with torch.device("meta"):
        model = docev_reduced()
    model = _init(model, dev, dtype)
    model.set_num_output_chunks(8)
    # fused on CUDA as the recipe runs it (the foreach AdamW reads every parameter's step count on the host)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=dev.type == "cuda")
    loss_fn, b = CEWithChunkedOutputLoss(), _train_batch(a, dev)
    slots = image_positions(b["tokens"], model.image_token_id)

    def micro_batch() -> None:
        tokens = b["tokens"].to(dev, non_blocking=True)
        pixels = normalize(b["pixels"].to(dev, non_blocking=True), dtype=dtype)
        logits = model(tokens, pixel_values=pixels, image_sizes=b["sizes"], image_grids=b["grids"], sampling_ratio=2,
                       image_slots=slots.to(dev, non_blocking=True), inputs_checked=True)  # fmt: skip
        loss = loss_fn(logits, tokens) * 10
        del logits
        loss.backward()

    micro_batch()  # warm-up
    opt.zero_grad(set_to_none=True)
    _sync(dev)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with warnings.catch_warnings(record=True) as caught, torch.profiler.profile(activities=activities) as prof:
        warnings.simplefilter("always")
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with HostSyncCounter() as micro:
                micro_batch()
            with HostSyncCounter() as step:
                opt.step()
                opt.zero_grad(set_to_none=True)
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        _sync(dev)
    cuda_warnings = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message)]
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    with trace.open("rb") as src, gzip.open(out / "trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    counted = dict(micro.counts)
    return {"ok": not counted and not cuda_warnings, "micro_batch": counted, "optimizer_step": dict(step.counts),
            "cuda_sync_warnings": len(cuda_warnings), "first_warnings": cuda_warnings[:5],
            "trace": "trace.json.gz", "tiles": b["tiles"], "tokens": b["tokens"].shape[1]}  # fmt: skip


def matmul_peak(dev: torch.device) -> float:
    """FLOP/s of a square matmul, 8192³ bf16 on CUDA (512³ fp32 on CPU), mean of 10 after 3 warm-ups."""
    n, dtype = (512, torch.float32) if dev.type == "cpu" else (8192, torch.bfloat16)
    x, y = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        x @ y
    _sync(dev)
    start = time.perf_counter()
    for _ in range(10):
        x @ y
    _sync(dev)
    return 10 * 2 * n**3 / (time.perf_counter() - start)


def mfu_stage(work: Path) -> dict[str, Any]:
    """Stage 5 (see the module docstring), from stage 2's model FLOP/s."""
    dev = device()
    train = json.loads((out_dir(work) / "gpu_check.json").read_text()).get("train", {})
    achieved = train.get("model_tflops_per_second", 0.0) * 1e12
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    spec = next((v for k, v in SPEC_BF16_FLOPS.items() if name.startswith(k)), None)
    measured = matmul_peak(dev)
    flops_per_token = train.get("flops_per_token") or 0.0
    preview_flops_per_token = _preview_flops_per_token()
    ours = achieved / preview_flops_per_token  # tokens/s/GPU of the full preview at this FLOP/s
    titan = {k: v * TITAN_FLOPS_PER_TOKEN / preview_flops_per_token for k, v in TITAN_TOKENS_PER_S.items()}
    return {
        "ok": achieved > 0,
        "device": name,
        "achieved_tflops": achieved / 1e12,
        "spec_peak_tflops": None if spec is None else spec / 1e12,
        "measured_matmul_peak_tflops": measured / 1e12,
        "mfu_vs_spec": None if spec is None else achieved / spec,
        "mfu_vs_measured": achieved / measured,
        "check_model_flops_per_token": flops_per_token,
        "preview_flops_per_token_8192": preview_flops_per_token,
        "preview_tokens_per_s_per_gpu_at_this_rate": ours,
        "titan_llama8b_flops_per_token": TITAN_FLOPS_PER_TOKEN,
        "titan_scaled_to_preview_tokens_per_s_per_gpu": titan,
    }


def _preview_flops_per_token() -> float:
    """FLOPs per text token of the full DocEV Preview on causal 8192-token rows (``model_flops``' definition)."""
    with torch.device("meta"):
        model = docev_from_arch(preview())
    seq = 8192
    return model_flops(model, preview(), seq, seq * (seq + 1) // 2, 0) / seq


def main(work: Path) -> None:
    out = out_dir(work)
    failed = []
    for stage, fn in (("layers", layers_stage), ("host_syncs", lambda: host_syncs_stage(out)),
                      ("mfu", lambda: mfu_stage(work))):  # fmt: skip
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 (one stage failing must not cost the others' numbers)
            result, failed = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, [*failed, stage]
        result.setdefault("ok", True)
        record(work, stage, {**result, "seconds": round(time.perf_counter() - start, 1)})
        if dev_is_cuda():
            torch.cuda.empty_cache()
    if failed:
        raise SystemExit(f"stages failed: {failed}")


def dev_is_cuda() -> bool:
    return device().type == "cuda"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
