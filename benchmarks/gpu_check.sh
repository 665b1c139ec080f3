#!/usr/bin/env bash
# GPU check of the training recipe on one lent accelerator, in one script of at most 8 minutes that prints as
# it goes and leaves $OUT/gpu_check.json (every stage's numbers, written after each stage) and
# $OUT/trace.json.gz (a profiler trace of one training step):
#   1 preflight   versions, device, the recipe's imports, the torch APIs it uses (docev.training.preflight);
#   2 train       packed rows of 8192 tokens, real widths at reduced depth (benchmarks/gpu_check.py), ~20 steps,
#                 compile, flex attention, activation checkpointing: tokens/s, step time, peak memory, compile
#                 seconds, recompiles (a recompile-limit warning fails the check), one checkpoint save timed
#                 and deleted; Inductor and Triton caches under WORKDIR;
#   3 layers      one decoder layer at 8192 tokens, flex vs SDPA, activation checkpointing off/on, extrapolated
#                 to 48 layers; the 27-layer vision tower forward on 10 tiles (benchmarks/gpu_kernels.py);
#   4 host_syncs  one training step under torch.cuda.set_sync_debug_mode("warn") + HostSyncCounter, profiled;
#   5 mfu         MFU against the spec and the measured bf16 matmul peak; torchtitan's Llama-3.1-8B beside it.
# The device lacks torchtune, torchao, omegaconf, pydantic, datasets...: `bash benchmarks/gpu_wheels.sh .whl`
# here, carry .whl, and this script installs them with `pip install --no-index --no-deps --target`.
# --dry-run runs every stage on CPU at toy size (the tiny model), with the packages the device lacks and the
# check must not need (kfp, kubernetes, wandb, rapidfuzz, s3fs) made unimportable (benchmarks/device_env).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [WORKDIR]   # STEPS=20 GPU_CHECK_SECONDS=460 (dry run: 900) PYTHON OUT
set -euo pipefail

DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(realpath -m "${1:-${TMPDIR:-/tmp}/gpu_check}")
PY=${PYTHON:-python3}
STEPS=${STEPS:-$(( DRY ? 4 : 20 ))}
START=$(date +%s)
DEADLINE=$(( START + ${GPU_CHECK_SECONDS:-$(( DRY ? 900 : 460 ))} ))  # a dry run on a loaded CPU gets longer
export OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
rm -f "$OUT/gpu_check.json"
export PYTHONUNBUFFERED=1 GPU_CHECK_OUT="$OUT" GPU_CHECK_TOY=$DRY
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" TRITON_CACHE_DIR="$WORK/triton"  # kept for a rerun
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }
bounded() {  # run "$@" with the time left before the deadline
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left <= 0 )); then say "deadline reached before: $*" >&2; exit 124; fi
  timeout --kill-after=15 "$left" "$@"
}

PYPATH="$ROOT/src:$ROOT/benchmarks"
if (( DRY )); then
  export GPU_CHECK_BLOCK=kfp,kfp_kubernetes,kubernetes,wandb,rapidfuzz,s3fs
  PYPATH="$ROOT/benchmarks/device_env:$PYPATH"
else
  WHEELS=${GPU_WHEELS:-$ROOT/.whl}
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    say "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $WORK/site"
    bounded "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "$WHEELS"/*.whl
    PYPATH="$PYPATH:$WORK/site"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
export PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}"

say "stage 1: preflight"
bounded "$PY" benchmarks/gpu_check.py preflight "$WORK"

say "stage 2: packed training, $STEPS steps (checkpoint, synthetic pages, config in $WORK)"
CONFIG=$(bounded "$PY" benchmarks/gpu_check.py prepare "$WORK" "$STEPS" | tail -n 1)
rm -rf "$WORK/run/logs" "$WORK/run/checkpoints"
bounded "$PY" -m docev.cli validate --config "$CONFIG"
bounded "$PY" -m docev.cli preprocess --config "$CONFIG"
say "stage 2: train"
set +e
TORCH_LOGS=recompiles bounded "$PY" -m docev.cli train --config "$CONFIG" > "$WORK/train.log" 2>&1 &
TRAIN=$!
tail -n +1 -f "$WORK/train.log" --pid "$TRAIN" &
wait "$TRAIN"
RC=$?
set -e
cp "$WORK/train.log" "$OUT/train.log"
if (( RC != 0 )); then say "train exited with $RC"; fi
bounded "$PY" benchmarks/gpu_check.py report "$WORK" "$WORK/train.log" || say "stage 2 report: failed"

say "stages 3-5: layers, host syncs, MFU"
bounded "$PY" benchmarks/gpu_kernels.py "$WORK" || say "stages 3-5: some failed"

bounded "$PY" benchmarks/gpu_check.py summary "$WORK"
say "done"
