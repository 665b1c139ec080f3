#!/usr/bin/env bash
# GPU check of the training recipe on one lent accelerator (CUDA torch; the trainer image has everything).
#
# Trains a reduced-depth, full-width DocEV with the real 64064-row vocabulary (2+1 vision layers, 4 decoder
# layers, released widths; see benchmarks/gpu_check.py) for a few steps through the real path -- synthetic
# pages -> docev validate -> docev preprocess -> docev train -- in bf16 with compile: true and activation
# checkpointing (the docev_preview.yaml settings), one process, twice:
#   packed    rows of 8192 tokens, flex attention with the BlockMask built on the GPU from document ids;
#   unpacked  batch 1, length buckets, S padded to multiples of 512, SDPA is_causal (flash).
# Each training runs with TORCH_LOGS=recompiles; the report prints tokens/s, MFU (attention counted as
# computed: the document mask's blocks for flex), peak memory, compiled graphs and the recompiles logged.
# A hard deadline (GPU_CHECK_SECONDS, default 450 s: inside the 8-minute budget) bounds the whole script:
# every step runs under `timeout` with what is left, and the script stops with 124 when time is up.
#
#   bash benchmarks/gpu_check.sh [STEPS=10] [WORKDIR=$(mktemp -d)]    # PYTHON=... picks the interpreter
set -euo pipefail

STEPS=${1:-10}
WORK=$(realpath -m "${2:-$(mktemp -d)}")
PY=${PYTHON:-python}
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-450} ))
cd "$(dirname "$0")/.."
mkdir -p "$WORK"
export PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"  # model._component_: gpu_check.docev_reduced

bounded() {  # run "$@" with the time left before the deadline
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left <= 0 )); then echo "[gpu_check] deadline reached before: $*" >&2; exit 124; fi
  timeout --kill-after=15 "$left" "$@"
}

bounded $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device visible")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

for RUN in packed unpacked; do
  echo "[gpu_check] $RUN: checkpoint, synthetic pages and config in $WORK"
  CONFIG=$(bounded $PY benchmarks/gpu_check.py prepare "$WORK" "$STEPS" "$RUN" | tail -n 1)
  rm -rf "$WORK/run-$RUN/logs" "$WORK/run-$RUN/checkpoints"
  echo "[gpu_check] $RUN: validate + preprocess"
  bounded $PY -m docev.cli validate --config "$CONFIG"
  bounded $PY -m docev.cli preprocess --config "$CONFIG"
  echo "[gpu_check] $RUN: train $STEPS steps, bf16, compile, activation checkpointing"
  TORCH_LOGS=recompiles bounded $PY -m docev.cli train --config "$CONFIG" 2>&1 | tee "$WORK/train-$RUN.log"
  RECOMPILES=$(grep -c "Recompiling function" "$WORK/train-$RUN.log" || true)
  bounded $PY benchmarks/gpu_check.py report "$WORK" "$RUN" "$RECOMPILES" | tee "$WORK/report-$RUN.txt"
done
