#!/bin/bash
# bash tools/gpu_check.sh OUT_DIR
# Every single-GPU measurement that docs/performance.md and docs/recipes.md list as not yet measured, on
# one H100 or H200, in sections. Real Fashion-MNIST must be in data/fashion_mnist (Zalando's four IDX
# files; DATA_DIR names another directory). Sections, in order of priority (SECTIONS picks):
#   bench     the benchmark at 224, bf16: eager, eager + CUDA graphs, compiled, compiled + fused pool,
#             compiled + fused pool + CUDA graphs, reduce-overhead; fp32 compiled beside the chapter's
#             own loop; one torch.profiler table of the compiled step
#   chapter   the chapter recipe, bf16: twice as it is by default (the first run fills a fresh compile
#             cache, the second finds it warm), then with --fused-pool --cuda-graphs
#   fast      --recipe fast, bf16: as it is, eager with --cuda-graphs, compiled with --cuda-graphs;
#             then seeds 1 and 2 with --cuda-graphs --no-compile for the 3-seed mean
#   best      --recipe best, bf16, seed 0, with --cuda-graphs --no-compile; then the same with random
#             erasing and the weight EMA, which were neutral at a quarter of the width
# Estimates, not measurements (compilation dominates): bench 5-6 minutes, chapter 3-4, fast 2-3, best 3-4
# on an H200. By these, SECTIONS=bench, SECTIONS="chapter fast" and SECTIONS=best each run in under 10
# minutes: where a job's run time is limited, run them one at a time in that order. Logs, JSON and
# metrics land in OUT_DIR; weights stay in a scratch directory. SMOKE=1 runs every step at toy sizes on
# any machine, to check the script itself (on a CPU the --cuda-graphs steps stop at once with their
# one-line error, which the log keeps). Afterwards
# `python3 tools/summarize_gpu_check.py OUT_DIR` prints every figure as markdown tables.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
scratch="$(mktemp -d)"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="$scratch/bench_cache"  # each section starts cold, so its first run shows
                                                       # what compiling costs
py="${PYTHON:-python3}"  # or PYTHON, if another interpreter holds PyTorch
sections="${SECTIONS:-bench chapter fast best}"
data="${DATA_DIR:-data/fashion_mnist}"
if [ "${SMOKE:-0}" = 1 ]; then
  "$py" -c "from vgg_dist.data.synthetic import write_dataset; write_dataset('$scratch/data', 512, 200)"
  data="$scratch/data"
  bench_size=(--image-size 32 --steps 2 --warmup 4 --batch-size 16 --baseline-workers 0)
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

train() {  # name, then flags; bf16 like the H200 baseline in docs/performance.md
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
  bench bf16_eager_cuda_graphs bf16 --no-compile --cuda-graphs --skip-baseline
  bench bf16_compiled bf16 --compile --skip-baseline --profile "$out/profile_bf16_compiled.txt"
  bench bf16_compiled_fused_pool bf16 --compile --fused-pool --skip-baseline
  bench bf16_compiled_fused_pool_cuda_graphs bf16 --compile --fused-pool --cuda-graphs --skip-baseline \
    --profile "$out/profile_bf16_compiled_fused_pool_cuda_graphs.txt"
  bench bf16_reduce_overhead bf16 --compile --compile-mode reduce-overhead --skip-baseline
  bench fp32_compiled no --compile  # with the chapter's own loop beside it
esac
case " $sections " in *" chapter "*)
  export TORCHINDUCTOR_CACHE_DIR="$scratch/chapter_cache"
  train chapter_cold_cache
  train chapter_warm_cache
  train chapter_fused_pool_cuda_graphs --fused-pool --cuda-graphs
esac
case " $sections " in *" fast "*)
  export TORCHINDUCTOR_CACHE_DIR="$scratch/fast_cache"
  train fast --recipe fast
  train fast_eager_cuda_graphs --recipe fast --no-compile --cuda-graphs
  train fast_compiled_cuda_graphs --recipe fast --cuda-graphs
  train fast_eager_cuda_graphs_seed1 --recipe fast --no-compile --cuda-graphs --seed 1
  train fast_eager_cuda_graphs_seed2 --recipe fast --no-compile --cuda-graphs --seed 2
esac
case " $sections " in *" best "*)
  train best_eager_cuda_graphs --recipe best --no-compile --cuda-graphs
  train best_erase_ema_eager_cuda_graphs --recipe best --no-compile --cuda-graphs --random-erase 0.25 --model-ema
esac
rm -rf "$scratch"
step done
