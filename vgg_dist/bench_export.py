"""Serving on a CPU: ONNX Runtime against PyTorch eager, and how long each export format takes to write.

    python -m vgg_dist.bench_export                   # the fast recipe's model, then the chapter's
    python -m vgg_dist.bench_export --shrink          # tiny models: checks the benchmark itself in seconds

Two measurements in one run, on the CPU, with freshly initialised weights (speed does not depend on them):
  inference  the `fast` recipe's model (VGG-11 / 2, BatchNorm, 32x32 input, 512-wide classifier) as its ONNX
             export serves it: uint8 28x28 images in, the resize and scaling inside, logits out. PyTorch eager
             (inference mode) against ONNX Runtime's CPU provider on the exported file, at batch 1 and 64,
             each with the threads it picks by default (both recorded).
  export     the chapter's model (VGG-11 / 4, 224x224, 4096-wide classifier): seconds to write each format
             (onnx, exported, hub), and for onnx and exported to load the file back and run the 16-image check
             `vgg_dist.export` runs.
Results print as a table and are written as JSON.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from vgg_dist.cli import FlagParser
from vgg_dist.config import RECIPES_DIR, TrainConfig, read_config_file
from vgg_dist.errors import UsageError, exit_process, exits_cleanly_on_stop
from vgg_dist.export import CHECK_IMAGES, NEEDS, WithPreprocessing, run_exported, run_onnx, write_exported, write_onnx
from vgg_dist.model import build_model, count_parameters
from vgg_dist.store.run_files import RunInfo

BATCH_SIZES = (1, 64)
STORED_SIZE = (28, 28)  # Fashion-MNIST's, what the exports take
# --shrink: channels divided by this much more and classifiers this wide; a check of the code, not a figure.
SHRINK_WIDTH, SHRINK_HIDDEN = 8, 64


def bench_config(recipe: str, shrink: bool) -> TrainConfig:
    """A recipe's flags (its model is what matters here), shrunk with --shrink."""
    values = read_config_file(RECIPES_DIR / f"{recipe}.yaml", "--recipe")
    config = TrainConfig(**{**values, "recipe": recipe})
    if shrink:
        config.width_divisor *= SHRINK_WIDTH
        config.hidden_size = SHRINK_HIDDEN
    return config


def served_model(config: TrainConfig) -> tuple[WithPreprocessing, RunInfo]:
    """The recipe's model as an export serves it (uint8 stored images in), and a RunInfo for the Hub folder."""
    torch.manual_seed(config.seed)
    spec = config.model_spec(in_channels=1, num_classes=10)
    network = build_model(spec).eval()
    info = RunInfo(model=spec, class_names=[str(index) for index in range(10)], class_names_from="benchmark",
                   dataset="fashion_mnist", data_source="none: weights as initialised, for timing",
                   source_image_size=list(STORED_SIZE), background=0.0, train_samples=0, train_samples_per_epoch=0,
                   val_samples=None, test_samples=0, flags=config, launch={})
    return WithPreprocessing(network, spec).eval(), info


def images_per_second(call, batch: torch.Tensor, min_seconds: float) -> float:
    """Calls of `call(batch)` per second times the batch, over at least `min_seconds` and 5 calls, after 3
    untimed calls (allocations, ONNX Runtime's first-run set-up)."""
    for _ in range(3):
        call(batch)
    calls, started = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - started < min_seconds:
        call(batch)
        calls += 1
    return calls * len(batch) / (time.perf_counter() - started)


def measure_inference(config: TrainConfig, folder: Path, min_seconds: float) -> dict:
    """PyTorch eager and ONNX Runtime on the same model and images, at each of BATCH_SIZES, with one thread
    each and with as many as PyTorch uses by default. Both: on a CPU other jobs share, a second thread can
    cost more than it gives (each parallel region waits for a thread the scheduler has not run yet)."""
    wrapped, _ = served_model(config)
    path = folder / "inference.onnx"
    write_onnx(wrapped, torch.zeros(2, 1, *STORED_SIZE, dtype=torch.uint8), path)
    default_threads = torch.get_num_threads()
    result = {"model": config.model_spec(1, 10).to_dict(), "parameters": count_parameters(wrapped),
              "torch_default_threads": default_threads, "rows": []}
    generator = torch.Generator().manual_seed(0)
    batches = {size: torch.randint(0, 256, (size, 1, *STORED_SIZE), generator=generator, dtype=torch.uint8)
               for size in BATCH_SIZES}
    try:
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            pytorch, onnx_runtime = inference_calls(wrapped, path, threads)
            for size, images in batches.items():
                eager, ort = (images_per_second(call, images, min_seconds) for call in (pytorch, onnx_runtime))
                result["rows"].append({"threads": threads, "batch_size": size, "pytorch_eager_images_per_sec": eager,
                                       "onnxruntime_images_per_sec": ort, "onnxruntime_over_pytorch": ort / eager})
    finally:
        torch.set_num_threads(default_threads)
    return result


def inference_calls(wrapped: WithPreprocessing, path: Path, threads: int):
    """(PyTorch eager, ONNX Runtime on the exported file): each takes a uint8 batch and returns logits."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def pytorch(images):
        with torch.inference_mode():
            return wrapped(images)

    def onnx_runtime(images):
        return session.run(["logits"], {"images": images.numpy()})[0]

    return pytorch, onnx_runtime


def measure_exports(config: TrainConfig, folder: Path) -> dict:
    """Seconds to write each format (and to load onnx and exported back and run the export's check)."""
    from vgg_dist.hub import VGG
    wrapped, info = served_model(config)
    example = torch.randint(0, 256, (2, 1, *STORED_SIZE), dtype=torch.uint8)
    check = torch.randint(0, 256, (CHECK_IMAGES, 1, *STORED_SIZE), dtype=torch.uint8)
    result = {"model": config.model_spec(1, 10).to_dict(), "parameters": count_parameters(wrapped)}
    for fmt, write, run in (("onnx", write_onnx, run_onnx), ("exported", write_exported, run_exported)):
        path = folder / f"model.{'onnx' if fmt == 'onnx' else 'pt2'}"
        started = time.perf_counter()
        write(wrapped, example, path)
        written = time.perf_counter()
        run(path, check)
        result[fmt] = {"export_seconds": written - started, "check_seconds": time.perf_counter() - written,
                       "bytes": sum(item.stat().st_size for item in folder.glob(f"{path.name}*"))}
    started = time.perf_counter()
    VGG(wrapped.model, info).save_pretrained(folder / "hub")
    result["hub"] = {"export_seconds": time.perf_counter() - started,
                     "bytes": sum(item.stat().st_size for item in (folder / "hub").iterdir())}
    return result


def cpu_name() -> str:
    """The CPU's model name as Linux reports it (platform.processor() says only "x86_64" there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(result: dict) -> str:
    inference, exports = result["inference"], result["export"]
    lines = [f"{result['cpu']}, {result['cpu_count']} CPUs; torch {result['torch']}, onnxruntime "
             f"{result['onnxruntime']}",
             f"inference, fast recipe's model ({inference['parameters']:,} parameters), images/s:",
             f"  {'threads':<9}{'batch':<7}{'PyTorch eager':>15}{'ONNX Runtime':>15}{'ratio':>8}"]
    for row in inference["rows"]:
        lines.append(f"  {row['threads']:<9}{row['batch_size']:<7}{row['pytorch_eager_images_per_sec']:>15.1f}"
                     f"{row['onnxruntime_images_per_sec']:>15.1f}{row['onnxruntime_over_pytorch']:>8.2f}")
    lines.append(f"export, chapter's model ({exports['parameters']:,} parameters):")
    for fmt in ("onnx", "exported", "hub"):
        check = f", load and check {exports[fmt]['check_seconds']:.2f} s" if "check_seconds" in exports[fmt] else ""
        lines.append(f"  {fmt:<10}write {exports[fmt]['export_seconds']:.2f} s{check}, "
                     f"{exports[fmt]['bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    parser = FlagParser(prog="python -m vgg_dist.bench_export", description=__doc__.splitlines()[0])
    parser.add_argument("--min-seconds", type=float, default=5.0,
                        help="time each inference measurement for at least this long")
    parser.add_argument("--shrink", action="store_true",
                        help=f"channels / {SHRINK_WIDTH} more and {SHRINK_HIDDEN}-wide classifiers: a quick check "
                             f"of the benchmark, not a measurement")
    parser.add_argument("--json", default=None, help="where to write the results "
                                                     "(default: runs/bench-export-<time>.json)")
    args = parser.parse_args(argv)
    if not args.min_seconds > 0:
        raise UsageError(f"--min-seconds must be a positive number, got {args.min_seconds}")
    return args


@exits_cleanly_on_stop
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [name for name in NEEDS["onnx"] if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"the benchmark exports ONNX and needs {', '.join(missing)}: pip install 'vgg-dist[export]'")
    import onnxruntime
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "shrink": args.shrink,
              "command": " ".join(["python -m vgg_dist.bench_export", *(sys.argv[1:] if argv is None else argv)])}
    with tempfile.TemporaryDirectory(prefix="vgg_dist-bench-export-") as folder:
        (Path(folder) / "inference").mkdir()
        (Path(folder) / "export").mkdir()
        result["inference"] = measure_inference(bench_config("fast", args.shrink), Path(folder) / "inference",
                                                args.min_seconds)
        result["export"] = measure_exports(bench_config("chapter", args.shrink), Path(folder) / "export")
    print(format_table(result))
    path = Path(args.json or f"runs/bench-export-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    exit_process(main())
