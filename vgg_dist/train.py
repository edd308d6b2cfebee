"""Train d2l's VGG on Fashion-MNIST with Hugging Face Accelerate: CPU, one GPU, many GPUs, many nodes.

    accelerate launch --config_file launch/single_gpu.yaml vgg_dist/train.py        # one GPU, bf16
    accelerate launch --config_file launch/cpu.yaml vgg_dist/train.py --recipe fast  # one CPU process
    accelerate launch --config_file launch/multi_gpu.yaml vgg_dist/train.py         # all GPUs of a node
    accelerate launch --config_file launch/cpu_multi_process.yaml vgg_dist/train.py # 2 CPU processes (gloo)
    accelerate launch vgg_dist/train.py --output-dir runs/a --resume auto           # continue a stopped run

The entry point reads top to bottom: flags, Accelerator, run directory, data, model, restore or start,
`fit` (vgg_dist/training/loop.py), save.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`accelerate launch vgg_dist/train.py`): put the repository on the path instead of
    # this folder, so `vgg_dist` is importable and its modules cannot shadow top-level ones.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from accelerate import Accelerator

from vgg_dist.config import TrainConfig, parse_config
from vgg_dist.data.batches import EpochBatchSampler
from vgg_dist.data.cache import DecodeOptions
from vgg_dist.data.folders import HUB, IDX, detect_layout
from vgg_dist.data.sources import ImageData, Split, border_mean, load_dataset, read_class_names
from vgg_dist.errors import Preempted, UsageError, exit_process, exits_cleanly_on_stop
from vgg_dist.model import ModelSpec, count_parameters
from vgg_dist.pretrained import imagenet_statistics
from vgg_dist.store.checkpoint import RunIdentity
from vgg_dist.store.run_dir import Store
from vgg_dist.store.run_files import RunInfo
from vgg_dist.training.dist import (check_layout, device_label, finish, gather_layout, make_accelerator, make_loader,
                                    node_count, say, unwrapped_state_dict, weights_agree)
from vgg_dist.training.loop import Result, Run, fit
from vgg_dist.training.optim import ModelEMA
from vgg_dist.training.preemption import StopRequest, requeue_slurm_job
from vgg_dist.training.setup import (build_model_and_optimizer, check_cuda_graphs, compile_cache_dir, compiles,
                                     make_augmenter, make_schedule, maybe_compile,
                                     settle_compile_cache)
from vgg_dist.training.state import TrainState


@exits_cleanly_on_stop
def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, prog="accelerate launch vgg_dist/train.py", description=__doc__.splitlines()[0])
    stop = StopRequest.installed()
    accelerator = make_accelerator(config.dist_timeout, config.report_to, config.ddp_bf16_grads, config.cuda_graphs,
                                   config.grad_accum_steps)
    check_layout(accelerator, config.batch_size, config.grad_accum_steps)
    check_cuda_graphs(accelerator, config)
    settle_compile_cache(config, accelerator.device)
    layout = gather_layout(accelerator)
    try:
        with Store.open(accelerator, config) as store:
            data, splits = load_splits(accelerator, config)
            spec = config.model_spec(data.in_channels, len(data.class_names), input_statistics(config, data))
            state, run = build_training(accelerator, config, spec, splits)
            run.store, run.stop = store, stop
            info = describe_run(accelerator, config, spec, (data, splits), layout)
            identity = RunIdentity(spec=spec, config=config, schedule=run.schedule,
                                   steps_per_epoch=run.train_sampler.full_length())
            state = store.restore_or_start(state, identity, info)
            start_trackers(accelerator, config, store.run_dir)
            say(accelerator, run_header(accelerator, config, spec, state.model, store.run_dir, layout))
            result = fit(state, run)
            save_results(state, run, result, info)
            finish(accelerator)
    except Preempted:
        # Only now, with the checkpoint committed and the run directory's lock released: SLURM ends the
        # job as soon as it requeues it (srun SIGKILLs the step), and a lock left behind would hold the
        # requeued job off for minutes when its rank 0 lands on another node.
        if config.requeue and accelerator.is_main_process:
            say(accelerator, requeue_slurm_job())
        raise
    return 0


def load_splits(accelerator: Accelerator, config: TrainConfig) -> tuple[ImageData, dict[str, Split]]:
    """The dataset, and the splits this run uses: train, val (with --val-split) and test."""
    if config.class_names and config.data_dir and detect_layout(Path(config.data_dir), config.train_split) != IDX:
        raise UsageError(f"--class-names applies to IDX files; the classes of --data-dir {config.data_dir} are its "
                         f"own (its class folders, or its ClassLabel's names)")
    # The main process downloads or decodes, the others read its cache.
    with accelerator.main_process_first():
        names = read_class_names(Path(config.class_names)) if config.class_names else None
        data = load_dataset(config.dataset, config.data_dir, names, DecodeOptions.from_config(config))
    train = data.train.head(config.max_train_samples)
    splits = {}
    if config.val_split:
        train, splits["val"] = train.split_off(config.val_split)
        if len(splits["val"]) == 0:
            raise UsageError(f"--val-split {config.val_split} of {len(train)} training images holds no image; "
                             f"raise it")
    if len(train) < config.batch_size:
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {len(train)} training images; "
                         f"lower it or raise --max-train-samples (or lower --val-split)")
    return data, {"train": train, **splits, "test": data.test.head(config.max_eval_samples)}


def input_statistics(config: TrainConfig, data: ImageData) -> tuple[list[float], list[float]] | None:
    """(mean, std) per channel that --normalize standardises the input with, or None (the chapter's [0, 1]).
    The dataset's are its training split's, before --val-split or --max-train-samples: a property of the data,
    the same for every run on it."""
    if config.normalize == "imagenet":
        return imagenet_statistics(data.in_channels)
    if config.normalize == "dataset":
        mean, std = data.channel_statistics()
        constant = [channel for channel, value in enumerate(std) if value <= 0]
        if constant:
            raise UsageError(f"--normalize dataset: channel {constant[0]} of the training images is one constant "
                             f"value (std 0) and cannot be standardised; pass --normalize none")
        return mean, std
    return None


def build_training(accelerator: Accelerator, config: TrainConfig, spec: ModelSpec,
                   splits: dict[str, Split]) -> tuple[TrainState, Run]:
    """The model, optimizer and EMA as a TrainState, and the loaders, schedule and augmenter as a Run: all
    prepared by Accelerate (DDP, mixed precision, batches split over processes) and compiled if asked."""
    model, optimizer = build_model_and_optimizer(accelerator, config, spec)
    ema = ModelEMA(model, config.model_ema_decay) if config.model_ema else None
    # Whole global batches only: every optimizer step sees exactly --batch-size images on any world size.
    sampler = EpochBatchSampler(len(splits["train"]), config.batch_size, shuffle=True, drop_last=True, seed=config.seed)
    loaders = {name: make_loader(split, sampler if name == "train" else EpochBatchSampler(
        len(split), config.batch_size, shuffle=False, drop_last=False), accelerator.device)
        for name, split in splits.items()}
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared))
    if ema is not None:
        ema.module.to(accelerator.device)
    model = maybe_compile(model, config, accelerator.device)
    state = TrainState(accelerator=accelerator, model=model, optimizer=optimizer, ema=ema, seed=config.seed)
    run = Run(config=config, spec=spec, schedule=make_schedule(config, sampler.full_length()),
              augment=make_augmenter(accelerator, config), train_loader=loaders.pop("train"), train_sampler=sampler,
              eval_loaders=loaders, eval_model=maybe_compile(ema.module, config, accelerator.device) if ema else model)
    return state, run


def describe_run(accelerator: Accelerator, config: TrainConfig, spec: ModelSpec,
                 data_and_splits: tuple[ImageData, dict[str, Split]], layout: list[dict]) -> RunInfo:
    """config.json's contents (the final metrics are filled in at the end)."""
    data, splits = data_and_splits
    steps_per_epoch = len(splits["train"]) // config.batch_size
    return RunInfo(
        model=spec, class_names=list(data.class_names),
        class_names_from=config.class_names or (data.source if data.record else config.dataset),
        dataset=dataset_name(config, data), data_source=data.source, data=data.record,
        source_image_size=list(data.train.images.shape[2:]),
        # A folder of photos shares no one background, so predict must not invert an image to match it.
        background=None if data.record else border_mean(data.train.images), train_samples=len(splits["train"]),
        train_samples_per_epoch=steps_per_epoch * config.batch_size,
        val_samples=len(splits["val"]) if "val" in splits else None, test_samples=len(splits["test"]),
        flags=config, launch={"num_processes": accelerator.num_processes, "device": accelerator.device.type,
                              "compiled": compiles(config, accelerator.device), "nodes": node_count(layout),
                              "mixed_precision": accelerator.mixed_precision, "backend": accelerator.state.backend,
                              "ranks": layout})


def dataset_name(config: TrainConfig, data: ImageData) -> str:
    """What the run trained on, for config.json and the model card: the --dataset named, unless the images
    came from a folder of the user's own, which is named by its folder (--dataset's default is no name)."""
    own_folder = (data.record is not None and data.record.layout != HUB
                  and config.dataset in ("fashion_mnist", "mnist"))
    return Path(config.data_dir).name if own_folder else config.dataset


def save_results(state: TrainState, run: Run, result: Result, info: RunInfo) -> None:
    """The final weights (the EMA's with --model-ema), config.json with the final metrics, the report,
    and the chapter's two closing lines."""
    accelerator, store = state.accelerator, run.store
    identical = weights_agree(accelerator, state.model)
    if not identical:
        say(accelerator, f"warning: the {accelerator.num_processes} processes ended with different weights; "
                         f"rank 0's are saved")
    # A resume of a run that had already finished trains nothing: its last record is on file.
    last = result.last_epoch or (store.files.last_epoch() if accelerator.is_main_process else None)
    if accelerator.is_main_process:
        weights = state.ema.state_dict() if state.ema is not None else unwrapped_state_dict(accelerator, state.model)
        info.final_metrics, info.weights_identical_across_ranks = last, identical
        store.save_model(weights, info)
        if result.confusion is not None:
            store.files.write_report(result.confusion, info.class_names)
    if last is not None:
        say(accelerator, f"loss {last.train_loss:.3f}, train acc {last.train_acc:.3f}, test acc {last.test_acc:.3f}")
    if result.train_seconds:
        processes = accelerator.num_processes
        say(accelerator, f"{result.trained_samples / result.train_seconds:.1f} examples/sec on "
                         f"{device_label(accelerator.device)} ({processes} process{'es' if processes > 1 else ''})")


def run_header(accelerator: Accelerator, config: TrainConfig, spec: ModelSpec, model: torch.nn.Module,
               run_dir: Path, layout: list[dict]) -> str:
    processes, nodes = accelerator.num_processes, node_count(layout)
    ranks = ", ".join(f"{entry['rank']}:node{entry['node']}/{entry['device']}" for entry in layout)
    execution = (f"torch.compile mode {config.compile_mode} (cache {compile_cache_dir()})"
                 if compiles(config, accelerator.device) else "eager")
    if config.cuda_graphs:
        execution += ", each step replayed as a CUDA graph"
    return (f"vgg_dist: recipe {config.recipe}, {spec.arch} / {spec.width_divisor}"
            f"{' with BatchNorm' if spec.batch_norm else ''}, {count_parameters(model):,} parameters, "
            f"{spec.image_size}x{spec.image_size} input\n"
            f"  world size {processes} = {nodes} node{'s' if nodes > 1 else ''} x {processes // nodes} "
            f"process{'es' if processes // nodes > 1 else ''} per node, backend "
            f"{accelerator.state.backend or 'none'}, ranks {ranks}\n"
            f"  global batch {config.batch_size} = {processes} x {config.batch_size // processes} per process"
            f"{micro_batches(config)}, "
            f"mixed precision {accelerator.mixed_precision}, {execution}, warm-up {config.warmup_epochs:g} epochs\n"
            f"  run directory {run_dir}")


def micro_batches(config: TrainConfig) -> str:
    """How a process's share of the batch is accumulated, for the run's header."""
    steps = config.grad_accum_steps
    return f" in {steps} micro-batches" if steps > 1 else ""


def start_trackers(accelerator: Accelerator, config: TrainConfig, run_dir: Path) -> None:
    """TensorBoard / W&B through Accelerate, logging into the run directory."""
    if config.report_to == "none":
        return
    accelerator.project_configuration.logging_dir = str(run_dir / "tensorboard")
    # TensorBoard's hparams take numbers, strings and booleans only.
    flags = {name: (value if isinstance(value, (int, float, str, bool)) else str(value))
             for name, value in config.to_dict().items()}
    accelerator.init_trackers("vgg_dist", config=flags,
                              init_kwargs={"wandb": {"name": run_dir.name, "dir": str(run_dir)}})


def cli() -> None:
    """Console script `vgg-dist-train`: the same as `python vgg_dist/train.py`."""
    exit_process(main())


if __name__ == "__main__":
    exit_process(main())
