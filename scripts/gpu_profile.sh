#!/usr/bin/env bash
# Where the GPU time of each training step goes, and the optimisations under trial, in one go.
#
#   bash scripts/gpu_profile.sh OUT_DIR [TOTAL_SECONDS]
#
# Prints, per workload, the kernels per step and the costliest kernels (cxr_jax.bench --profile),
# and times the variants under trial against the defaults on the same card.
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_profile.sh OUT_DIR [TOTAL_SECONDS]}")
total=${2:-270}
cd "$(dirname "$0")/.."
raw=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$raw/jax-cache CXR_JAX_CACHE=$raw/cache
bench=(python3 -m cxr_jax.bench --steps=20)
part() {  # part MAX_SECONDS ARGS...
  local limit=$1 left=$((total - SECONDS - 15))
  shift
  [ "$left" -lt 25 ] && { echo "=== skipped: $*"; return; }
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $* (limit $limit s)"
  timeout --signal=KILL "$limit" "${bench[@]}" "$@" --out="$raw/jax-$SECONDS.json" 2>&1 \
    | grep -v '^[IW][0-9]' | grep -v "^$"
  "${bench[@]}" --compare="$raw" --out="$out/results.json" >"$out/summary.txt" 2>/dev/null
}
part 90 --only=pix2pix_b1 --profile=25
part 60 --only=pix2pix_b1 --override=flat_optimizer=False --profile=8
part 70 --only=pix2pix_b16 --pix2pix_dtype=bfloat16 --profile=20
part 80 --only=resnet50_rgb --profile=20
cat "$out/summary.txt"
