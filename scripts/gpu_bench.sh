#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one go; prints the comparison table last.
#
#   bash scripts/gpu_bench.sh OUT_DIR [TORCH_REFERENCE_PY] [TOTAL_SECONDS] [MODE]
#
# MODE `bench` (the default) runs these parts, most important first, each in its own process
# under a time limit (a failed part is logged and the others go on), all inside TOTAL_SECONDS
# (default 540):
#   1. our step workloads: pix2pix float32 b1/b16, ResNet-50 bf16 3- and 1-channel b256, synthesis;
#   2. the PyTorch reference (eager fp32, eager bf16 + channels_last, torch.compile), if given;
#   3. pix2pix with bf16 compute;
#   4. pix2pix b1 with XLA's CUDA-graph command buffers extended to the scan's while loop;
#   5. experiment:paper with one seed (pix2pix shortened to 4 epochs), for the time that is left.
# MODE `seeds` (issues 15 and 23; about 540 s): ResNet-50 at the experiment's size and batch
# (224 px, 64) with 1, 3, 5 seeds in one program (vmap; 3 seeds with lax.map too), images/s summed
# over seeds; the pix2pix batch-1 step with and without the channel padding of the first
# convolutions; CycleGAN's step; and the streamed input path against the resident one at
# experiment:demo's sizes (the per-step host work a streamed run adds, on an accelerator).
# MODE `experiment`: experiment:paper end to end with one seed, unshortened, for TOTAL_SECONDS
# (its stage times are reported when it is stopped early).
# MODE `profile` prints where the device time of each step goes (the kernels per step and the
# costliest kernels, `benchmarks.bench --profile`) and times the variants under trial against the
# defaults on the same card.
# After each part OUT_DIR/summary.txt and OUT_DIR/results.json are rewritten from all results so
# far, so a run stopped from outside still leaves its table. OUT_DIR/log.txt has everything.
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_bench.sh OUT_DIR [TORCH_REFERENCE_PY] [TOTAL_SECONDS] [MODE]}")
ref=${2:-}
total=${3:-540}
mode=${4:-bench}
cd "$(dirname "$0")/.."
raw=$(mktemp -d)
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$raw/jax-cache}
export CXR_JAX_CACHE=${CXR_JAX_CACHE:-$raw/cache}
bench=(python3 -m benchmarks.bench)

summarize() {
  "${bench[@]}" --compare="$raw" --out="$out/results.json" >"$out/summary.txt" 2>>"$log"
}

part() {  # part NAME MAX_SECONDS CMD...: runs CMD within MAX_SECONDS and the overall budget
  local name=$1 limit=$2
  shift 2
  local left=$((total - SECONDS - 20))
  if [ "$left" -lt 30 ]; then
    echo "=== $name: skipped, ${left} s left" | tee -a "$log"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit $limit s, at $SECONDS s)" | tee -a "$log"
  local t0=$SECONDS
  timeout --signal=KILL "$limit" "$@" >>"$log" 2>&1
  echo "=== $name: rc=$? in $((SECONDS - t0)) s" | tee -a "$log"
  summarize
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} >>"$log" 2>&1

if [ "$mode" = profile ]; then
  part "pix2pix b1 profile" 90 "${bench[@]}" --steps=20 --only=pix2pix_b1 --profile=25 \
    --out="$raw/jax-pix2pix-b1.json"
  part "pix2pix b1 without the flat optimizer" 60 "${bench[@]}" --steps=20 --only=pix2pix_b1 \
    --override=flat_optimizer=False --profile=8 --out="$raw/jax-pix2pix-b1-noflat.json"
  part "pix2pix b16 bf16 profile" 70 "${bench[@]}" --steps=20 --only=pix2pix_b16 \
    --pix2pix_dtype=bfloat16 --profile=20 --out="$raw/jax-pix2pix-b16-bf16.json"
  part "ResNet-50 profile" 80 "${bench[@]}" --steps=20 --only=resnet50_rgb --profile=20 \
    --out="$raw/jax-resnet50.json"
  grep -E '^profile |^ +[0-9.]+ us/step' "$log"
elif [ "$mode" = seeds ]; then
  part "ResNet-50 1/3/5 seeds in one program (vmap)" 220 "${bench[@]}" --steps=20 \
    --only=resnet50_seeds1,resnet50_seeds3,resnet50_seeds5 --seeds_mode=vmap \
    --out="$raw/jax-seeds-vmap.json"
  part "ResNet-50 3 seeds in one program (lax.map)" 80 "${bench[@]}" --steps=20 \
    --only=resnet50_seeds3 --seeds_mode=map --out="$raw/jax-seeds-map.json"
  part "pix2pix b1 with channel padding" 50 "${bench[@]}" --steps=20 --only=pix2pix_b1 \
    --out="$raw/jax-pix2pix-b1-pad.json"
  part "pix2pix b1 without channel padding" 50 "${bench[@]}" --steps=20 --only=pix2pix_b1 \
    --nochannel_padding --out="$raw/jax-pix2pix-b1-nopad.json"
  part "CycleGAN step" 60 "${bench[@]}" --steps=20 --only=cyclegan_b1 --out="$raw/jax-cyclegan.json"
  part "streamed vs resident input (experiment:demo sizes)" 120 "${bench[@]}" --steps=20 \
    --only=demo_classifier,demo_classifier_stream,demo_cyclegan,demo_cyclegan_stream \
    --out="$raw/jax-stream.json"
elif [ "$mode" = experiment ]; then
  weights="$raw/resnet50-random-init.safetensors"   # stands in for ImageNet weights (see below)
  python3 -c "import torchvision, safetensors.torch as st; \
  st.save_file(torchvision.models.resnet50().state_dict(), '$weights')" >>"$log" 2>&1 || weights=""
  exp_limit=$((total - SECONDS - 40))
  part "experiment:paper end to end, one seed" $((exp_limit + 10)) "${bench[@]}" \
    --only=experiment --experiment_timeout="$exp_limit" \
    --experiment_args="--config.pretrained=$weights" --out="$raw/jax-experiment-full.json"
elif [ "$mode" = bench ]; then
  part "cxr-jax step workloads" 300 "${bench[@]}" --steps=20 --out="$raw/jax-default.json"
  if [ -n "$ref" ]; then
    part "PyTorch reference" 240 python3 "$ref" --compile --out="$raw/torch.json"
  fi
  part "cxr-jax pix2pix bf16" 150 "${bench[@]}" --steps=20 --only=pix2pix_b1,pix2pix_b16 \
    --pix2pix_dtype=bfloat16 --out="$raw/jax-pix2pix-bf16.json"
  XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
    part "cxr-jax pix2pix b1, command buffers with WHILE" 100 "${bench[@]}" --steps=20 \
    --only=pix2pix_b1 --tag=cmdbuf-while --out="$raw/jax-pix2pix-cmdbuf.json"

  # Transfer rows need ImageNet weights; nothing is downloaded, so a randomly initialised
  # torchvision ResNet-50 in the same file format stands in (it times the same work).
  weights="$raw/resnet50-random-init.safetensors"
  python3 -c "import torchvision, safetensors.torch as st; \
  st.save_file(torchvision.models.resnet50().state_dict(), '$weights')" >>"$log" 2>&1 || weights=""
  exp_limit=$((total - SECONDS - 40))
  part "experiment:paper, one seed" $((exp_limit + 10)) "${bench[@]}" --only=experiment \
    --experiment_timeout="$exp_limit" \
    --experiment_args="--config.pix2pix.num_epochs=4,--config.pix2pix.decay_epochs=2,--config.pretrained=$weights" \
    --out="$raw/jax-experiment.json"
else
  echo "unknown MODE '$mode': use bench, seeds, experiment or profile" >&2
  exit 2
fi
cat "$out/summary.txt"
