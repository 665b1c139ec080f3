#!/usr/bin/env bash
# The wheels the lent GPU machine lacks, for its Python (cp312, manylinux x86_64), at the versions of
# requirements.lock: run here (with the package registry), carry DIR to the device, where gpu_check.sh
# installs them with `pip install --no-index --no-deps --target`.
#
# The device has torch 2.11, triton, numpy, pyarrow, pillow, safetensors, tokenizers, transformers, jinja2,
# fsspec, pyyaml, tqdm, psutil, matplotlib, huggingface-hub, xxhash, pandas, aiohttp (the device tool's
# KINDS.md). What the check imports beyond that: torchtune (and what it imports at import time: torchao,
# torchdata, datasets with dill and multiprocess), omegaconf (+ antlr4 for interpolation), pydantic (+ core,
# annotated-types, typing-inspection). kfp, kubernetes, wandb, rapidfuzz and s3fs are imported lazily by the
# code paths that need them, none of which the check runs (gpu_check.sh --dry-run blocks them to prove it).
#
#   bash benchmarks/gpu_wheels.sh DIR      # PYTHON=... picks the pip; fails above 48 MiB or on two versions
set -euo pipefail

DIR=${1:?usage: bash benchmarks/gpu_wheels.sh DIR}
PY=${PYTHON:-python3}
LIMIT_MIB=48
NAMES=(torchtune torchao torchdata datasets dill multiprocess omegaconf antlr4-python3-runtime pydantic pydantic_core
       annotated-types typing-inspection typing_extensions)
cd "$(dirname "$0")/.."
mkdir -p "$DIR"

PINS=()
for name in "${NAMES[@]}"; do
  pin=$(grep -i "^${name}==" requirements.lock || true)
  [[ -n $pin ]] || { echo "gpu_wheels: $name is not pinned in requirements.lock" >&2; exit 1; }
  PINS+=("$pin")
done

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
# PIP_CONSTRAINT: a local cap on torch versions must not leak into wheels for another machine
PIP_CONSTRAINT="" "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DIR" "${PINS[@]}"

# exactly these wheels, one version each (a leftover of another version would stop the install there)
declare -A SEEN=()
for whl in "$DIR"/*.whl; do
  dist=$(basename "$whl" | cut -d- -f1 | tr 'A-Z-' 'a-z_')
  if [[ -n ${SEEN[$dist]:-} ]]; then echo "gpu_wheels: two versions of $dist in $DIR" >&2; exit 1; fi
  SEEN[$dist]=1
done
if (( ${#SEEN[@]} != ${#NAMES[@]} )); then
  echo "gpu_wheels: $DIR holds ${#SEEN[@]} distributions, expected ${#NAMES[@]} (${NAMES[*]})" >&2; exit 1
fi
BYTES=$(cat "$DIR"/*.whl | wc -c)
MIB=$(( (BYTES + 1048575) / 1048576 ))
ls -l "$DIR"/*.whl | awk '{printf "%9d  %s\n", $5, $NF}'
echo "gpu_wheels: ${#SEEN[@]} wheels, $BYTES bytes (${MIB} MiB of at most ${LIMIT_MIB})"
(( BYTES <= LIMIT_MIB * 1048576 )) || { echo "gpu_wheels: over ${LIMIT_MIB} MiB" >&2; exit 1; }
