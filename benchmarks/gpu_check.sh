#!/usr/bin/env bash
# GPU check of the training recipe on one lent accelerator (CUDA torch; the trainer image has everything).
#
# Trains a reduced-depth, full-width DocEV (2+1 vision layers, 4 decoder layers, released widths; see
# benchmarks/gpu_check.py) for a few steps through the real path -- synthetic pages -> docev validate ->
# docev preprocess -> docev train -- in bf16 with compile: true and activation checkpointing (the
# docev_preview.yaml settings), packed rows of 8192 tokens at 560-px tiles, one process; then prints
# tokens/s, MFU and peak memory from logs/metrics.jsonl.
#
#   bash benchmarks/gpu_check.sh [STEPS=12] [WORKDIR=$(mktemp -d)]    # PYTHON=... picks the interpreter
#
# Expected wall time on an H200 with 16 cores: about 4-6 minutes, mostly data preparation and compilation.
set -euo pipefail

STEPS=${1:-12}
WORK=$(realpath -m "${2:-$(mktemp -d)}")
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$WORK"
export PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"  # model._component_: gpu_check.docev_reduced

$PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device visible")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "[gpu_check] checkpoint, synthetic pages and config in $WORK"
CONFIG=$($PY benchmarks/gpu_check.py prepare "$WORK" "$STEPS" | tail -n 1)
rm -rf "$WORK/run/logs" "$WORK/run/checkpoints"
echo "[gpu_check] validate + preprocess"
$PY -m docev.cli validate --config "$CONFIG"
$PY -m docev.cli preprocess --config "$CONFIG"
echo "[gpu_check] train: $STEPS steps, bf16, compile, activation checkpointing"
$PY -m docev.cli train --config "$CONFIG"
$PY benchmarks/gpu_check.py report "$WORK"
