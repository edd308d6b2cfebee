"""Train d2l's VGG on Fashion-MNIST with Hugging Face Accelerate: CPU, one GPU, many GPUs, many nodes.

    accelerate launch vgg_dist/train.py --data-dir data/fashion_mnist                # one process
    accelerate launch --multi_gpu --num_processes 8 vgg_dist/train.py               # all GPUs of a node
    accelerate launch --mixed_precision bf16 vgg_dist/train.py                        # bf16 autocast
    accelerate launch --multi_gpu --num_processes 2 vgg_dist/train.py --epochs 1    # 2 CPU processes (gloo)
    accelerate launch vgg_dist/train.py --output-dir runs/a --resume auto            # continue a stopped run

The entry point: parse the flags, build the Accelerator, data, model and run directory, `fit`, save.
The loop itself is `vgg_dist/training.py`.
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
from accelerate.utils import set_seed

from vgg_dist import checkpoint, checkpoint_state
from vgg_dist.accelerated import (check_layout, finish, gather_layout, make_accelerator, make_loader, node_count, say,
                                  unwrapped_state_dict, weights_agree)
from vgg_dist.artifacts import WEIGHTS_NAME, save_weights
from vgg_dist.config import TrainConfig, config_file_values, parse_config
from vgg_dist.data import EpochBatchSampler, ImageData, Split, load_dataset
from vgg_dist.ema import ModelEMA
from vgg_dist.errors import UsageError, exit_process, exits_cleanly_on_stop
from vgg_dist.model import ModelSpec, count_parameters
from vgg_dist.preemption import StopRequest
from vgg_dist.run_dir import hold_run_dir, resolve_resume
from vgg_dist.run_files import RunFiles
from vgg_dist.training import (DeviceSums, NonFiniteWatch, Result, Run, Training, build_model_and_optimizer,
                               check_cuda_graphs, compile_cache_dir, compiles, fit, make_augmenter,
                               make_graphed_update, make_schedule, maybe_compile)

# Dropout streams after a resume on more processes than were saved: a fresh seed per start step,
# spaced by a prime so that nearby steps never share one.
RESUME_SEED_STRIDE = 7919


@exits_cleanly_on_stop
def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, prog="accelerate launch vgg_dist/train.py", description=__doc__.splitlines()[0])
    stop = StopRequest()
    stop.install()
    accelerator = make_accelerator(config.dist_timeout, config.report_to, config.ddp_bf16_grads, config.cuda_graphs)
    check_layout(accelerator, config.batch_size)
    check_cuda_graphs(accelerator, config)
    layout = gather_layout(accelerator)
    data, splits = load_splits(accelerator, config)
    spec = config.model_spec(in_channels=data.in_channels, num_classes=len(data.class_names))

    model, optimizer = build_model_and_optimizer(accelerator, config, spec)
    ema = ModelEMA(model, config.model_ema_decay) if config.model_ema else None
    # Whole global batches only: every optimizer step sees exactly --batch-size images on any world size.
    train_sampler = EpochBatchSampler(len(splits["train"]), config.batch_size, shuffle=True, drop_last=True,
                                      seed=config.seed)
    schedule = make_schedule(config, train_sampler.full_length())

    accelerator.wait_for_everyone()  # every process has validated its flags before the run directory exists
    with hold_run_dir(accelerator, config) as run_dir:
        resume_from = resolve_resume(accelerator, config, run_dir)
        restored = None
        if resume_from is not None:
            restored = checkpoint_state.read(resume_from, spec, config.to_dict(), model, optimizer, schedule,
                                             accelerator.process_index, train_sampler.full_length())
            checkpoint_state.apply(restored, model, optimizer, accelerator.scaler, ema)
        accelerator.wait_for_everyone()  # all processes loaded before the main one tidies the directory
        if accelerator.is_main_process:
            for leftover in checkpoint.clean_leftovers(run_dir / checkpoint.CHECKPOINTS_DIR):
                say(accelerator, f"removed {leftover}, left by an interrupted save")
        progress = restored.progress if restored else checkpoint_state.Progress()

        train_loader = make_loader(splits["train"], train_sampler, accelerator.device)
        eval_loaders = {name: make_loader(split, EpochBatchSampler(len(split), config.batch_size, shuffle=False,
                                                                   drop_last=False), accelerator.device)
                        for name, split in splits.items() if name != "train"}
        model, optimizer, train_loader, *prepared = accelerator.prepare(model, optimizer, train_loader,
                                                                        *eval_loaders.values())
        eval_loaders = dict(zip(eval_loaders, prepared))
        if ema is not None:
            ema.module.to(accelerator.device)
        model = maybe_compile(model, config, accelerator.device)
        if restored and restored.rng_tensors is not None:
            checkpoint_state.set_rng_state(restored.rng_tensors, restored.rng_json)
        else:
            # A different dropout stream on each process (device_specific adds the process index).
            set_seed(config.seed + progress.global_step * RESUME_SEED_STRIDE, device_specific=True)

        run_info = describe_run(accelerator, config, spec, data, splits, layout, restored, run_dir)
        files = RunFiles(run_dir) if accelerator.is_main_process else None
        if accelerator.is_main_process:
            files.write_run_info(run_info)
            files.write_train_config(config_file_values(config))
            files.forget_after(progress.epoch, progress.global_step)
        start_trackers(accelerator, config, run_dir)
        say(accelerator, run_header(accelerator, config, spec, model, run_dir, layout))
        if restored:
            say(accelerator, f"resumed from {restored.path}: epoch {progress.epoch + 1}, step "
                             f"{progress.step_in_epoch} of the epoch, global step {progress.global_step}")

        training = Training(accelerator, model, optimizer, schedule, config, progress, DeviceSums(accelerator.device),
                            NonFiniteWatch(accelerator.device), make_augmenter(accelerator, config), ema)
        training.graphed = make_graphed_update(training)
        run = Run(train_loader, train_sampler, eval_loaders,
                  maybe_compile(ema.module, config, accelerator.device) if ema else model,
                  spec, run_dir, files, stop)
        result = fit(training, run, resumed_sums=restored.sums if restored else None)
        save_results(accelerator, training, run, result, run_info, list(data.class_names))
        finish(accelerator)
    return 0


def load_splits(accelerator: Accelerator, config: TrainConfig) -> tuple[ImageData, dict[str, Split]]:
    """The dataset, and the splits this run uses: train, val (with --val-split) and test."""
    with accelerator.main_process_first():  # the main process downloads, the others read its cache
        data = load_dataset(config.dataset, config.data_dir)
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


def describe_run(accelerator: Accelerator, config: TrainConfig, spec: ModelSpec, data: ImageData,
                 splits: dict[str, Split], layout: list[dict], restored, run_dir: Path) -> dict:
    """config.json's contents (final metrics are filled in at the end)."""
    steps_per_epoch = len(splits["train"]) // config.batch_size
    return {
        "model": spec.to_dict(),
        "class_names": list(data.class_names),
        "dataset": config.dataset,
        "data_source": data.source,
        "source_image_size": list(data.train.images.shape[2:]),  # what predict resizes new images to first
        "train_samples": len(splits["train"]),
        # Whole global batches only: the remainder (a different set each epoch) is left out.
        "train_samples_per_epoch": steps_per_epoch * config.batch_size,
        "val_samples": len(splits["val"]) if "val" in splits else None,
        "test_samples": len(splits["test"]),
        "flags": {**config.to_dict(), "output_dir": str(run_dir)},  # the directory chosen, even by default
        "launch": {"num_processes": accelerator.num_processes, "device": accelerator.device.type,
                   "compiled": compiles(config, accelerator.device),
                   "nodes": node_count(layout), "mixed_precision": accelerator.mixed_precision,
                   "backend": accelerator.state.backend, "ranks": layout},
        "resumed_from": str(restored.path) if restored else None,
        "final_metrics": None,
    }


def save_results(accelerator: Accelerator, training: Training, run: Run, result: Result, run_info: dict,
                 class_names: list[str]) -> None:
    """The final weights (the EMA's with --model-ema), config.json with the final metrics, the report,
    and the chapter's two closing lines."""
    files = run.files
    # A resume of a run that had already finished trains nothing: its last record is on file.
    last_epoch = result.last_epoch or (files.last_epoch() if accelerator.is_main_process else {})
    identical = weights_agree(accelerator, training.model)
    if not identical:
        say(accelerator, f"warning: the {accelerator.num_processes} processes ended with different weights; "
                         f"rank 0's are saved")
    if accelerator.is_main_process:
        weights = (training.ema.state_dict() if training.ema is not None
                   else unwrapped_state_dict(accelerator, training.model))
        save_weights(run.run_dir / WEIGHTS_NAME, weights, run.spec)
        files.write_run_info({**run_info, "final_metrics": last_epoch, "weights_identical_across_ranks": identical})
        if result.confusion is not None:
            files.write_report(result.confusion, class_names)
    if last_epoch:
        say(accelerator, f"loss {last_epoch['train_loss']:.3f}, train acc {last_epoch['train_acc']:.3f}, "
                         f"test acc {last_epoch['test_acc']:.3f}")
    if result.train_seconds:
        processes = accelerator.num_processes
        say(accelerator, f"{result.trained_samples / result.train_seconds:.1f} examples/sec on {accelerator.device} "
                         f"({processes} process{'es' if processes > 1 else ''})")


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
            f"  global batch {config.batch_size} = {processes} x {config.batch_size // processes} per process, "
            f"mixed precision {accelerator.mixed_precision}, {execution}\n"
            f"  run directory {run_dir}")


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
