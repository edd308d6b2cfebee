#!/bin/bash
# bash launch/gpu_check.sh OUT_DIR
# Every single-GPU check the speed issue asks for, in one run (sized for a 10-minute device slot):
# the benchmark at 224 (chapter baseline and vgg_dist; fp32 and bf16; with and without --compile),
# a short real training run on synthetic Fashion-MNIST-shaped data, and, if this machine holds
# Fashion-MNIST's IDX files anywhere, the chapter's full recipe on them. Results land in OUT_DIR;
# copy the figures into BENCHMARKS.md with this date, device and torch version.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() { echo "== $(date +%T) $*" | tee -a "$out/steps.log"; }

step environment
{ nvidia-smi; python -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"; } > "$out/environment.txt" 2>&1

bench() {  # name, precision, extra flags
  local name=$1 precision=$2; shift 2
  step "bench $name"
  ACCELERATE_MIXED_PRECISION=$precision timeout 150 python -m vgg_dist.bench --steps 200 --warmup 20 \
    --json "$out/bench_$name.json" "$@" > "$out/bench_$name.log" 2>&1 || echo "bench $name failed ($?)" >> "$out/steps.log"
}
bench fp32 no                                     # with the chapter baseline
bench bf16 bf16 --skip-baseline
bench bf16_compile bf16 --skip-baseline --compile
bench fp32_nchw no --skip-baseline --no-channels-last

step "synthetic data"
python -c "from vgg_dist.synthetic import write_dataset; write_dataset('$out/synthetic', 60000, 10000)"
step "train 3 epochs, bf16, synthetic"
ACCELERATE_MIXED_PRECISION=bf16 timeout 120 python vgg_dist/train.py --data-dir "$out/synthetic" --epochs 3 \
  --output-dir "$out/train_synthetic_bf16" --no-checkpoint-epochs > "$out/train_synthetic_bf16.log" 2>&1

step "look for Fashion-MNIST"
found=$(find / -name 'train-images-idx3-ubyte*' -not -path '*/proc/*' 2>/dev/null | head -n 1)
ls -d ~/.cache/huggingface/datasets/*fashion* 2>/dev/null >> "$out/steps.log"
if [ -n "$found" ]; then
  step "chapter recipe on $(dirname "$found")"
  ACCELERATE_MIXED_PRECISION=bf16 timeout 150 python vgg_dist/train.py --data-dir "$(dirname "$found")" \
    --output-dir "$out/chapter_recipe_bf16" > "$out/chapter_recipe_bf16.log" 2>&1
else
  step "no Fashion-MNIST IDX files on this machine"
fi
step done
