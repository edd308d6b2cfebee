#!/bin/bash
# bash launch/gpu_check.sh OUT_DIR
# Every single-GPU measurement the speed and recipe issues ask for, in one run on a lent H100/H200.
# Real Fashion-MNIST must be in data/fashion_mnist (python3 ../shared/data/fashion_mnist.py data/fashion_mnist
# here, then carry "data/fashion_mnist" to the device). Sections, in order of priority (SECTIONS picks):
#   bench     the benchmark at 224, bf16: eager, compiled, compiled + fused pool, reduce-overhead
#             (CUDA graphs); fp32 compiled; one torch.profiler table of the compiled step
#   chapter   the chapter recipe, bf16, twice: the first run fills the compile cache, the second is warm
#   recipes   --recipe fast and --recipe best, bf16, seed 0
# By estimate (compilation dominates): bench about 4 minutes, chapter 2, recipes 2-3 on an H200; with a
# 15-minute device budget run SECTIONS="bench chapter" first and the recipes in a second call. Logs, JSON
# and metrics land in OUT_DIR; weights stay in a scratch directory. SMOKE=1 runs every step at toy
# sizes on any machine, to check the script itself (3.5 minutes on a 2-core CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
scratch="$(mktemp -d)"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="$scratch/compile_cache"  # starts cold, so the first run shows the compile cost
py="${PYTHON:-python3}"  # the lent GPU machines' python3 is the one that holds PyTorch
sections="${SECTIONS:-bench chapter recipes}"
data="${DATA_DIR:-data/fashion_mnist}"
if [ "${SMOKE:-0}" = 1 ]; then
  "$py" -c "from vgg_dist.synthetic import write_dataset; write_dataset('$scratch/data', 512, 200)"
  data="$scratch/data"
  bench_size=(--image-size 32 --steps 2 --warmup 1 --batch-size 16 --baseline-workers 0)
  run_size=(--epochs 1 --max-train-samples 256 --max-eval-samples 100 --image-size 32 --warmup-epochs 0
            --no-compile)
else
  bench_size=(--steps 100 --warmup 10)
  run_size=()
fi
step() { echo "== $(date +%T) $*" | tee -a "$out/steps.log"; }

step environment
{ nvidia-smi; "$py" -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate',
  accelerate.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } \
  > "$out/environment.txt" 2>&1
[ -f "$data/train-images-idx3-ubyte.gz" ] || step "no Fashion-MNIST in $data: the runs below will fail"

bench() {  # name, precision, flags
  local name=$1 precision=$2; shift 2
  step "bench $name"
  ACCELERATE_MIXED_PRECISION=$precision timeout 240 "$py" -m vgg_dist.bench --data-dir "$data" "${bench_size[@]}" \
    --json "$out/bench_$name.json" "$@" > "$out/bench_$name.log" 2>&1 || echo "bench $name failed ($?)" >> "$out/steps.log"
}

train() {  # name, then flags; bf16 like the issue's baseline
  local name=$1; shift
  step "train $name"
  mkdir -p "$out/$name"
  local started=$(date +%s.%N)
  ACCELERATE_MIXED_PRECISION=bf16 timeout 300 "$py" vgg_dist/train.py --data-dir "$data" \
    --output-dir "$scratch/$name" --no-checkpoint-epochs "${run_size[@]}" "$@" > "$out/$name/log.txt" 2>&1 \
    || echo "train $name failed ($?)" >> "$out/steps.log"
  awk "BEGIN { print $(date +%s.%N) - $started }" > "$out/$name/wall_seconds.txt"  # process start to the end
  cp "$scratch/$name"/metrics.jsonl "$scratch/$name"/config.json "$scratch/$name"/report.json "$out/$name/" 2>/dev/null
}

case " $sections " in *" bench "*)
  bench bf16_eager bf16 --no-compile --skip-baseline
  bench bf16_compiled bf16 --compile --skip-baseline --profile "$out/profile_bf16_compiled.txt"
  bench bf16_compiled_fused_pool bf16 --compile --fused-pool --skip-baseline
  bench bf16_reduce_overhead bf16 --compile --compile-mode reduce-overhead --skip-baseline
  bench fp32_compiled no --compile  # with the chapter's own loop beside it
esac
case " $sections " in *" chapter "*)
  train chapter_cold_cache
  train chapter_warm_cache
esac
case " $sections " in *" recipes "*)
  train recipe_fast --recipe fast
  train recipe_best --recipe best
esac
rm -rf "$scratch"
step done
