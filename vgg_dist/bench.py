"""Side-by-side throughput: the chapter's training loop against vgg_dist's, on the same device and data.

    python -m vgg_dist.bench                                   # 224x224, batch 128, chapter model
    python -m vgg_dist.bench --image-size 64 --steps 20        # a size a CPU finishes quickly
    accelerate launch --mixed_precision bf16 -m vgg_dist.bench --compile

Three measurements in one run, each after warm-up steps that are not timed:
  baseline   the chapter: PIL Resize + ToTensor in a DataLoader, fp32, NCHW, `.item()` every step
  vgg_dist   the real training step and data path of `vgg_dist/train.py` (uint8 batches resized on
             the device, no per-step host sync, the launch's precision)
  loader     vgg_dist's input pipeline alone (batch indexing, transfer, on-device resize)
  augmented  with --recipe or any augmentation flag (--hflip, --aa, --mixup, ...): vgg_dist's step again
             with that augmentation on, and the augmentation alone on the step's batch, so its cost is
             measured against the step itself in one run
Images/s count images through the whole step, data loading included. Results print as a table and
are written as JSON.

With `--data-dir` holding an ImageFolder tree, the chapter's baseline (a loader of 28x28 grey tensors)
gives way to a comparison of reading the folder (vgg_dist/bench_decode.py): the first decode into the
cache, an epoch from the cache, and torchvision's ImageFolder DataLoader; the JSON's `folder_loader`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vgg_dist.cli import FlagParser, check_positive, flag
from vgg_dist.config import COMPILE_MODES, RECIPES_DIR, TrainConfig, read_config_file, recipe_names, validate
from vgg_dist.bench_decode import compare_folder_loading, format_folder_table
from vgg_dist.data.batches import EpochBatchSampler, to_model_input
from vgg_dist.data.cache import DecodeOptions
from vgg_dist.data.folders import IMAGE_FOLDER, detect_layout
from vgg_dist.data.sources import Split, load_dataset
from vgg_dist.data.synthetic import make_images
from vgg_dist.errors import UsageError, exit_process, exits_cleanly_on_stop
from vgg_dist.model import build_model
from vgg_dist.training.cuda_graph import EAGER_STEPS
from vgg_dist.training.dist import agree, check_layout, finish, make_accelerator, make_loader
from vgg_dist.training.loop import NonFiniteWatch, Run, make_update, train_step
from vgg_dist.training.setup import (build_model_and_optimizer, check_cuda_graphs, compile_cache_dir, compiles,
                                     make_augmenter, make_schedule, maybe_compile)
from vgg_dist.training.state import Progress, TrainState


# The loader alone is timed over this many batches per timed step: it is far faster than a step.
LOADER_STEPS_PER_STEP = 4
# train.py's augmentation flags, which add a measurement of the step with them on: (field, type, metavar).
AUGMENTATION_FLAGS = (("random_crop_padding", int, "PIXELS"), ("hflip", float, "P"), ("random_erase", float, "P"),
                      ("auto_augment", str, "POLICY"), ("mixup", float, "ALPHA"), ("cutmix", float, "ALPHA"))


class ChapterDataset(torch.utils.data.Dataset):
    """What torchvision's FashionMNIST hands the chapter's DataLoader: one PIL image per index."""

    def __init__(self, split: Split, image_size: int):
        from PIL import Image
        from torchvision import transforms
        self.split, self.to_pil = split, Image.fromarray
        self.transform = transforms.Compose([transforms.Resize(image_size), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        image = self.to_pil(self.split.images[index, 0].numpy(), mode="L")
        return self.transform(image), int(self.split.labels[index])


def time_baseline(split: Split, config: TrainConfig, device: torch.device, steps: int, warmup: int,
                  workers: int) -> dict:
    """The chapter's `train_ch6` loop, timed over whole steps including the wait for data."""
    torch.manual_seed(config.seed)
    model = build_model(config.model_spec(1, 10)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    loader = torch.utils.data.DataLoader(ChapterDataset(split, config.image_size), batch_size=config.batch_size,
                                         shuffle=True, num_workers=workers, drop_last=True)
    model.train()
    batches = iter(loader)
    started, sums = None, [0.0, 0.0, 0]
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            started = time.perf_counter()
        images, labels = next(batches)
        optimizer.zero_grad()
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # d2l's Accumulator: a host round trip every step
            sums[0] += loss.item() * images.shape[0]
            sums[1] += (logits.argmax(dim=1) == labels).sum().item()
            sums[2] += images.shape[0]
    seconds = time.perf_counter() - started
    return {"images_per_sec": steps * config.batch_size / seconds, "seconds": seconds, "steps": steps}


def time_vgg_dist(accelerator, split: Split, config: TrainConfig, steps: int, warmup: int,
                  profile: Path | None = None) -> dict:
    """vgg_dist's own `train_step` over a prepared model, optimizer and loader, meeting the other
    processes every --sync-every steps as `fit` does. With `profile`, a few more steps then run under
    torch.profiler and its table of where the time went is written there."""
    spec = config.model_spec(split.images.shape[1], class_count(split))
    model, optimizer = build_model_and_optimizer(accelerator, config, spec)
    loaders = []
    for count in (warmup, steps):
        sampler = EpochBatchSampler(count * config.batch_size, config.batch_size, shuffle=True, drop_last=True,
                                    seed=config.seed)
        loaders.append(accelerator.prepare(make_loader(split.head(count * config.batch_size), sampler,
                                                       accelerator.device)))
    model, optimizer = accelerator.prepare(model, optimizer)
    model = maybe_compile(model, config, accelerator.device)  # as the trainer does; the warm-up pays for compiling
    model.train()
    state = TrainState(accelerator=accelerator, model=model, optimizer=optimizer, ema=None, seed=config.seed)
    run = Run(config=config, spec=spec, schedule=make_schedule(config, steps),
              augment=make_augmenter(accelerator, config))
    update = make_update(state, run)  # with --cuda-graphs: recorded during the warm-up, replayed when timed
    results = {}
    for name, loader in zip(("warmup", "timed"), loaders):
        state.progress, watch = Progress(), NonFiniteWatch(accelerator.device)
        state.sums.reset()
        reset_peak_memory(accelerator.device)
        synchronize(accelerator.device)
        started = time.perf_counter()
        for images, labels in loader:
            watch.record(train_step(state, run, update, images, labels), state.progress.global_step)
            if state.progress.global_step % config.sync_every == 0:
                agree(accelerator, False, watch.first_bad(state.progress.global_step), state.sums.values)
        state.sums.reduced(accelerator)  # what an epoch ends with; waits for the device
        seconds = time.perf_counter() - started
        results[name] = {"images_per_sec": state.progress.global_step * config.batch_size / seconds,
                         "seconds": seconds, "steps": state.progress.global_step}
    results["timed"]["peak_memory_bytes"] = peak_memory(accelerator.device)
    if profile is not None:
        write_profile(state, run, update, loaders[0], profile)
    results["timed"]["compiled"] = hasattr(model, "_orig_mod")  # what really ran, not the flag
    results["timed"]["warmup_seconds"] = results["warmup"]["seconds"]  # compilation included
    if results["timed"]["compiled"]:
        results["timed"]["compile_cache"] = compile_cache_report()
    return results["timed"]


def write_profile(state: TrainState, run: Run, update, loader, path: Path) -> None:
    """Profile the warm-up loader's steps again (already compiled) and write the top operators and
    kernels by device time (CPU time without a GPU)."""
    from torch.profiler import ProfilerActivity, profile
    on_gpu = state.accelerator.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as profiler:
        for images, labels in loader:
            train_step(state, run, update, images, labels)
        synchronize(state.accelerator.device)
    table = profiler.key_averages().table(sort_by="cuda_time_total" if on_gpu else "cpu_time_total", row_limit=40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table + "\n")


def compile_cache_report() -> dict:
    """Where torch.compile cached its work, and how often this process found it there."""
    from torch._dynamo.utils import counters
    return {"dir": str(compile_cache_dir()),
            "fx_graph_hits": counters["inductor"]["fxgraph_cache_hit"],
            "fx_graph_misses": counters["inductor"]["fxgraph_cache_miss"],
            "autograd_hits": counters["aot_autograd"]["autograd_cache_hit"],
            "autograd_misses": counters["aot_autograd"]["autograd_cache_miss"]}


def class_count(split: Split) -> int:
    """Classes the timed model needs: the chapter's 10, or more when a folder of images has them."""
    return max(10, int(split.labels.max()) + 1)


def time_augmentation(accelerator, split: Split, config: TrainConfig, steps: int) -> dict:
    """The augmentation alone, as a step runs it (draw, apply, mix) on the step's batch: its cost without the
    noise of two whole-step timings, whose difference it is."""
    augmenter = make_augmenter(accelerator, config)
    per_process = config.batch_size // accelerator.num_processes
    images = split.images[:per_process].to(accelerator.device)
    labels = split.labels[:per_process].to(accelerator.device)
    gather = accelerator.gather if accelerator.num_processes > 1 else None
    synchronize(accelerator.device)
    started = time.perf_counter()
    for step in range(steps):
        draws = augmenter.draw(0, step)
        augmented = augmenter.apply(images, draws)
        if "mix" in draws:
            augmented = augmenter.mix(augmented, labels, draws, class_count(split), gather)[0]
    synchronize(accelerator.device)
    seconds = time.perf_counter() - started
    del augmented
    return {"images_per_sec": steps * config.batch_size / seconds, "seconds": seconds, "steps": steps}


def time_loader(accelerator, split: Split, config: TrainConfig, steps: int) -> dict:
    """The input pipeline alone: what the trainer's loader and resize deliver with no model attached."""
    channels_last = config.channels_last
    sampler = EpochBatchSampler(len(split), config.batch_size, shuffle=True, drop_last=True, seed=config.seed)
    loader = accelerator.prepare(make_loader(split, sampler, accelerator.device))
    synchronize(accelerator.device)
    started, images_seen = time.perf_counter(), 0
    for step, (images, labels) in enumerate(loader):
        batch = to_model_input(images, config.image_size, channels_last)
        images_seen += labels.shape[0]
        if step + 1 >= steps:
            break
    synchronize(accelerator.device)
    seconds = time.perf_counter() - started
    del batch
    return {"images_per_sec": images_seen * accelerator.num_processes / seconds, "seconds": seconds}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: allocated GPU memory, or on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = FlagParser(prog="python -m vgg_dist.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=recipe_names(), default=None,
                        help="time this recipe's model, batch and size, and its augmentation as a second vgg_dist "
                             "measurement (default: the chapter's model, no augmentation)")
    parser.add_argument("--image-size", type=int, default=None, help="input side, a multiple of 32 (default: the "
                                                                     "recipe's; the chapter's 224)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the recipe's; 128)")
    parser.add_argument("--width-divisor", type=int, default=None,
                        help="conv channels divided by this (default: the recipe's; 4)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    parser.add_argument("--data-dir", help="time on real IDX files instead of synthetic 60k 28x28 images; an "
                                           "ImageFolder tree adds the comparison of reading it (folder_loader)")
    parser.add_argument("--baseline-workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers for the baseline (the chapter uses 4)")
    parser.add_argument("--skip-baseline", action="store_true", help="time vgg_dist and its loader only")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile vgg_dist's model (default: as training does, on with a GPU)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default", help="torch.compile's mode")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each step as a CUDA graph, recorded during the warm-up (one GPU)")
    parser.add_argument("--fused-pool", action="store_true",
                        help="max-pools as reshape + max, for torch.compile to fuse with the ReLU")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="NHWC activations for vgg_dist")
    augmenting = parser.add_argument_group("augmentation, timed as a second vgg_dist measurement (as train.py "
                                           "takes them)")
    for name, kind, metavar in AUGMENTATION_FLAGS:
        augmenting.add_argument(flag(name), *(["--aa"] if name == "auto_augment" else []), type=kind,
                                default=None, metavar=metavar)
    parser.add_argument("--json", default=None, help="where to write the results (default: runs/bench-<time>.json)")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="also profile the warm-up's steps again and write torch.profiler's table here")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "width_divisor", "steps"):
        if getattr(args, name) is not None:
            check_positive(name, getattr(args, name))
    if args.warmup < 1 or args.baseline_workers < 0:
        raise UsageError("--warmup must be at least 1 and --baseline-workers at least 0")
    if args.cuda_graphs and args.warmup <= EAGER_STEPS:
        raise UsageError(f"--cuda-graphs needs --warmup {EAGER_STEPS + 1} or more: {EAGER_STEPS} eager steps, "
                         f"then the recording, all before the timed steps")
    return args


NO_AUGMENTATION = {"random_crop_padding": 0, "hflip": 0.0, "random_erase": 0.0, "auto_augment": None, "mixup": 0.0,
                   "cutmix": 0.0}


def bench_configs(args: argparse.Namespace) -> tuple[TrainConfig, TrainConfig | None]:
    """(the step to time, with no augmentation; the same with the recipe's augmentation and the flags', or
    None when that is none). Both checked as train.py checks its flags."""
    recipe = read_config_file(RECIPES_DIR / f"{args.recipe}.yaml", "--recipe") if args.recipe else {}
    chosen = {name: getattr(args, name) for name in ("image_size", "batch_size", "width_divisor")
              if getattr(args, name) is not None}
    config = TrainConfig(**{**recipe, **chosen, "recipe": args.recipe or TrainConfig.recipe}, compile=args.compile,
                         compile_mode=args.compile_mode, fused_pool=args.fused_pool,
                         channels_last=args.channels_last, cuda_graphs=args.cuda_graphs)
    given = {name: getattr(args, name) for name, _, _ in AUGMENTATION_FLAGS if getattr(args, name) is not None}
    augmented = dataclasses.replace(config, **given)
    validate(augmented)  # the same refusals as train.py's, naming the flag
    plain = dataclasses.replace(config, **NO_AUGMENTATION)
    return plain, (None if augmented == plain else augmented)


def format_table(result: dict) -> str:
    rows = [("baseline (chapter)", result.get("baseline")), ("vgg_dist", result["vgg_dist"]),
            ("vgg_dist augmented", result.get("augmented")), ("augmentation only", result.get("augmentation_only")),
            ("vgg_dist loader only", result["loader"])]
    lines = [f"device {result['device_name']} ({result['device']}), torch {result['torch']}, "
             f"precision {result['precision']}, {result['processes']} process(es), image {result['image_size']}, "
             f"global batch {result['batch_size']}, compile {result['compile']} ({result['compile_mode']}), "
             f"fused pool {result['fused_pool']}, CUDA graphs {result['cuda_graphs']}, "
             f"channels_last {result['channels_last']}",
             f"{'measurement':<24}{'images/s':>12}{'seconds':>10}"]
    for name, row in rows:
        if row:
            lines.append(f"{name:<24}{row['images_per_sec']:>12.1f}{row['seconds']:>10.2f}")
    if result.get("augmented"):
        lines.append(f"augmentation ({', '.join(f'{k}={v}' for k, v in result['augmented']['flags'].items() if v)}) "
                     f"takes {100 * result['augmentation_share']:.1f}% of an augmented step")
    if result.get("speedup") is not None:
        lines.append(f"speedup vgg_dist / baseline: {result['speedup']:.2f}x")
    lines.append(f"loader / vgg_dist step: {result['loader_headroom']:.1f}x "
                 f"(loading is {100 / result['loader_headroom']:.1f}% of step time)")
    lines.append(f"peak memory: {result['vgg_dist']['peak_memory_bytes'] / 2**20:.0f} MiB; warm-up steps "
                 f"{result['vgg_dist']['warmup_seconds']:.1f} s (compilation included)")
    return "\n".join(lines)


def bench_data(accelerator, args: argparse.Namespace, config: TrainConfig) -> tuple[Split, bool, dict | None]:
    """(the training images to time on, whether --data-dir is an ImageFolder tree, and for a folder the main
    process's comparison of reading it, printed now)."""
    batch_size, image_size = config.batch_size, config.image_size
    needed = (args.warmup + args.steps) * batch_size  # the baseline's batches, each image once
    folder = args.data_dir is not None and Path(args.data_dir).is_dir() and \
        detect_layout(Path(args.data_dir)) == IMAGE_FOLDER
    folder_loader = None
    if folder and accelerator.is_main_process:
        folder_loader = compare_folder_loading(Path(args.data_dir), image_size, batch_size, accelerator.device)
        print(format_folder_table(folder_loader), flush=True)
    if args.data_dir:
        with accelerator.main_process_first():
            split = load_dataset("fashion_mnist", args.data_dir, None, DecodeOptions(data_size=image_size)).train
    else:  # Fashion-MNIST's shape, 28x28 uint8; as many images as the measurements take, up to its 60,000
        images, labels = make_images(min(60_000, max(needed, LOADER_STEPS_PER_STEP * args.steps * batch_size)))
        split = Split(images.unsqueeze(1), labels.long())
    if len(split) < needed:
        raise UsageError(f"--steps {args.steps} x --batch-size {batch_size} needs {needed} images; "
                         f"the data has {len(split)}")
    return split, folder, folder_loader


def describe_bench(accelerator, args: argparse.Namespace, config: TrainConfig, split: Split) -> dict:
    """What was timed, where and how: the head of the JSON."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(accelerator.device),
        "device_name": (torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__, "precision": accelerator.mixed_precision,
        "processes": accelerator.num_processes, "recipe": config.recipe, "image_size": config.image_size,
        "batch_size": config.batch_size, "width_divisor": config.width_divisor, "steps": args.steps,
        "warmup": args.warmup,
        "compile": compiles(config, accelerator.device), "compile_mode": args.compile_mode,
        "fused_pool": args.fused_pool, "cuda_graphs": args.cuda_graphs, "channels_last": config.channels_last,
        "data": args.data_dir or f"synthetic {len(split)}x28x28 uint8", "command": " ".join(sys.argv),
    }


@exits_cleanly_on_stop
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config, augmented = bench_configs(args)  # refused now, not after the other measurements
    accelerator = make_accelerator(cuda_graphs=args.cuda_graphs)
    check_layout(accelerator, config.batch_size)
    check_cuda_graphs(accelerator, config)
    split, folder, folder_loader = bench_data(accelerator, args, config)
    result = describe_bench(accelerator, args, config, split)
    if folder_loader is not None:
        result["folder_loader"] = folder_loader
    if not args.skip_baseline and not folder and accelerator.num_processes == 1:
        result["baseline"] = time_baseline(split, config, accelerator.device, args.steps, args.warmup,
                                           args.baseline_workers)
    result["vgg_dist"] = time_vgg_dist(accelerator, split, config, args.steps, args.warmup,
                                       args.profile if accelerator.is_main_process else None)
    if augmented is not None:
        result["augmented"] = time_vgg_dist(accelerator, split, augmented, args.steps, args.warmup)
        result["augmented"]["flags"] = {name: getattr(augmented, name) for name, _, _ in AUGMENTATION_FLAGS}
        result["augmentation_only"] = time_augmentation(accelerator, split, augmented, args.steps)
        step, alone = (1 / result[name]["images_per_sec"] for name in ("vgg_dist", "augmentation_only"))
        result["augmentation_share"] = alone / (step + alone)  # of a step with it
    result["loader"] = time_loader(accelerator, split, config, args.steps * LOADER_STEPS_PER_STEP)
    result["speedup"] = (result["vgg_dist"]["images_per_sec"] / result["baseline"]["images_per_sec"]
                         if "baseline" in result else None)
    result["loader_headroom"] = result["loader"]["images_per_sec"] / result["vgg_dist"]["images_per_sec"]
    if accelerator.is_main_process:
        print(format_table(result))
        path = Path(args.json or f"runs/bench-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    finish(accelerator)
    return 0


if __name__ == "__main__":
    exit_process(main())
