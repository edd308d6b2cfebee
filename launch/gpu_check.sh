#!/bin/bash
# bash launch/gpu_check.sh OUT_DIR
# Every single-GPU check the speed issue asks for, in one run (sized for a 10-minute device slot):
# the benchmark at 224 (chapter baseline and vgg_dist; fp32 and bf16; with and without --compile),
# a short real training run on synthetic Fashion-MNIST-shaped data, and, if this machine holds
# Fashion-MNIST's IDX files anywhere, the chapter's full recipe on them. Logs, JSON and metrics land
# in OUT_DIR (weights and data stay in a scratch directory); copy the figures into BENCHMARKS.md with
# the date, device and torch version. SMOKE=1 runs the same steps at toy sizes, to check the script.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"
scratch="$(mktemp -d)"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"  # the lent GPU machines' python3 is the one that holds PyTorch
if [ "${SMOKE:-0}" = 1 ]; then
  bench_size=(--image-size 32 --steps 2 --warmup 1 --batch-size 16 --baseline-workers 0)
  train_size=(--image-size 32 --width-divisor 16 --hidden-size 64 --epochs 1 --max-train-samples 256
              --max-eval-samples 100 --batch-size 32)
  recipe_size=("${train_size[@]}")
else
  bench_size=(--steps 200 --warmup 20)
  train_size=(--epochs 3)
  recipe_size=()  # the chapter's own: 10 epochs, 224x224, batch 128
fi
step() { echo "== $(date +%T) $*" | tee -a "$out/steps.log"; }
keep_run() { cp "$1"/metrics.jsonl "$1"/config.json "$1"/report.json "$out/$2/" 2>/dev/null; }

step environment
{ nvidia-smi; "$py" -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate',
  accelerate.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } \
  > "$out/environment.txt" 2>&1

bench() {  # name, precision, extra flags
  local name=$1 precision=$2; shift 2
  step "bench $name"
  ACCELERATE_MIXED_PRECISION=$precision timeout 150 "$py" -m vgg_dist.bench "${bench_size[@]}" \
    --json "$out/bench_$name.json" "$@" > "$out/bench_$name.log" 2>&1 || echo "bench $name failed ($?)" >> "$out/steps.log"
}
bench fp32 no                                     # with the chapter baseline
bench bf16 bf16 --skip-baseline
bench bf16_compile bf16 --skip-baseline --compile
bench fp32_nchw no --skip-baseline --no-channels-last

step "synthetic data"
"$py" -c "from vgg_dist.synthetic import write_dataset; write_dataset('$scratch/synthetic', 60000, 10000)"
step "train, bf16, synthetic"
mkdir -p "$out/train_synthetic_bf16"
ACCELERATE_MIXED_PRECISION=bf16 timeout 150 "$py" vgg_dist/train.py --data-dir "$scratch/synthetic" \
  "${train_size[@]}" --output-dir "$scratch/train_synthetic_bf16" --no-checkpoint-epochs \
  > "$out/train_synthetic_bf16/log.txt" 2>&1 || echo "training failed ($?)" >> "$out/steps.log"
keep_run "$scratch/train_synthetic_bf16" train_synthetic_bf16

step "look for Fashion-MNIST"
found=$(find / -xdev -name 'train-images-idx3-ubyte*' 2>/dev/null | head -n 1)
ls -d ~/.cache/huggingface/datasets/*fashion* 2>/dev/null >> "$out/steps.log"
if [ -n "$found" ]; then
  step "chapter recipe on $(dirname "$found")"
  mkdir -p "$out/chapter_recipe_bf16"
  ACCELERATE_MIXED_PRECISION=bf16 timeout 150 "$py" vgg_dist/train.py --data-dir "$(dirname "$found")" \
    "${recipe_size[@]}" --output-dir "$scratch/chapter_recipe_bf16" --no-checkpoint-epochs \
    > "$out/chapter_recipe_bf16/log.txt" 2>&1 || echo "chapter recipe failed ($?)" >> "$out/steps.log"
  keep_run "$scratch/chapter_recipe_bf16" chapter_recipe_bf16
else
  step "no Fashion-MNIST IDX files on this machine"
fi
rm -rf "$scratch"
step done
