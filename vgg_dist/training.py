"""The training loop: `fit` runs epochs of `train_step`s, agrees across processes every --sync-every
steps, and evaluates and checkpoints at each epoch end. `train.py` builds everything it needs.

Nothing in a step waits for the host: loss and accuracy accumulate on the device, and a non-finite
loss is noted on the device too, until the processes next agree.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm import tqdm

from vgg_dist import checkpoint, checkpoint_state, sync_batchnorm
from vgg_dist.accelerated import NO_STEP, agree, evaluate, say, unwrapped_state_dict
from vgg_dist.augment import Augmentation, BatchAugmenter
from vgg_dist.checkpoint_state import EpochSums, Progress
from vgg_dist.config import TrainConfig
from vgg_dist.cuda_graph import GraphedUpdate
from vgg_dist.data import EpochBatchSampler, to_model_input
from vgg_dist.ema import ModelEMA
from vgg_dist.errors import Diverged, Preempted, UsageError
from vgg_dist.metrics import accuracy, sample_count
from vgg_dist.model import ModelSpec, build_model
from vgg_dist.optim import LRSchedule, make_sgd, set_learning_rate
from vgg_dist.preemption import StopRequest, requeue_slurm_job
from vgg_dist.run_files import RunFiles

CURVE_POINTS_PER_EPOCH = 5  # as many train points per epoch as the chapter's plot draws


class DeviceSums:
    """This process's running train-loss sum, correct predictions and sample count for the epoch."""

    LOSS, CORRECT, SAMPLES = range(3)

    def __init__(self, device: torch.device, start: EpochSums | None = None):
        self.values = torch.zeros(3, dtype=torch.float64, device=device)
        if start is not None:
            self.values += torch.tensor(start.as_list(), dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        batch = labels.shape[0]
        self.values[self.LOSS] += loss * batch
        self.values[self.CORRECT] += (logits.argmax(dim=1) == labels).sum()
        self.values[self.SAMPLES] += batch

    def local(self) -> EpochSums:
        """This process's sums (waits for the device)."""
        return EpochSums(*self.values.tolist())

    def reduced(self, accelerator: Accelerator) -> EpochSums:
        """All processes' sums together (a collective)."""
        return EpochSums(*accelerator.reduce(self.values.clone(), reduction="sum").tolist())


class NonFiniteWatch:
    """The first step whose loss was non-finite, kept on the device until the processes next agree."""

    def __init__(self, device: torch.device):
        self.first_bad_step = torch.full((), NO_STEP, dtype=torch.int64, device=device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        first = ~torch.isfinite(loss) & (self.first_bad_step == NO_STEP)
        self.first_bad_step = torch.where(first, step, self.first_bad_step)

    def first_bad(self, step: int, model: torch.nn.Module | None = None) -> torch.Tensor:
        """The first bad step; with `model`, weights that are already non-finite make `step` bad, so
        that nothing non-finite is ever checkpointed."""
        if model is None:
            return self.first_bad_step
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        return torch.where(finite | (self.first_bad_step != NO_STEP), self.first_bad_step, step)


@dataclasses.dataclass
class Training:
    """Everything a training step touches."""

    accelerator: Accelerator
    model: torch.nn.Module               # prepared: DDP, autocast, possibly compiled
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    config: TrainConfig
    progress: Progress
    sums: DeviceSums
    watch: NonFiniteWatch
    augment: BatchAugmenter | None = None
    ema: ModelEMA | None = None
    graphed: GraphedUpdate | None = None  # `update` as a CUDA graph (--cuda-graphs)


def train_step(t: Training, images: torch.Tensor, labels: torch.Tensor) -> None:
    """One optimizer step on one batch: the learning rate and the augmentation's random numbers for this
    step, the device work (`update`, replayed as a CUDA graph with --cuda-graphs), then the weights'
    average and the running sums."""
    progress = t.progress
    set_learning_rate(t.optimizer, t.schedule(progress.global_step))
    draws = t.augment.draw(progress.epoch, progress.step_in_epoch) if t.augment is not None else None
    if t.graphed is not None:
        loss, logits = t.graphed(images, labels, draws)
    else:
        loss, logits = update(t, images, labels, draws)
    progress.step_in_epoch += 1
    progress.global_step += 1
    if t.ema is not None:
        t.ema.update(progress.global_step)
    t.sums.add(loss, logits, labels)
    t.watch.record(loss, progress.global_step)


def update(t: Training, images: torch.Tensor, labels: torch.Tensor,
           draws: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's device work, from a batch to new weights: augment, forward, loss, backward, clip, optimizer
    step; the loss and logits come back detached. Nothing here waits for the host, so it can be recorded
    as a CUDA graph; the gradients are set to None before the backward writes them."""
    if draws is not None:
        images = t.augment.apply(images, draws)
    logits = t.model(to_model_input(images, t.config.image_size, t.config.channels_last))
    loss = F.cross_entropy(logits, labels, label_smoothing=t.config.label_smoothing)
    t.optimizer.zero_grad(set_to_none=True)
    t.accelerator.backward(loss)
    if t.config.clip_grad_norm is not None:
        t.accelerator.clip_grad_norm_(t.model.parameters(), t.config.clip_grad_norm)
    t.optimizer.step()
    return loss.detach(), logits.detach()


def check_cuda_graphs(accelerator: Accelerator, config: TrainConfig) -> None:
    """--cuda-graphs records one GPU's step: say which launch it does not fit, before any work."""
    if not config.cuda_graphs:
        return
    if config.compile_mode == "reduce-overhead":
        raise UsageError("--cuda-graphs and --compile-mode reduce-overhead both record CUDA graphs; use one "
                         "(--cuda-graphs records the optimizer's update too)")
    if accelerator.device.type != "cuda":
        raise UsageError("--cuda-graphs needs a GPU and none is visible; leave it out on a CPU")
    if accelerator.num_processes > 1:
        raise UsageError(f"--cuda-graphs records one process's step and this launch has "
                         f"{accelerator.num_processes}; leave it out with several processes")
    if accelerator.mixed_precision == "fp16":
        raise UsageError("--cuda-graphs cannot record fp16's loss scaling, which checks for infinities on the "
                         "host; use --mixed_precision bf16 or no")


def make_graphed_update(t: Training) -> GraphedUpdate | None:
    """With --cuda-graphs, `update` replayed as a CUDA graph (after a few eager steps)."""
    if not t.config.cuda_graphs:
        return None
    return GraphedUpdate(functools.partial(update, t), t.optimizer, t.accelerator.device)


def build_model_and_optimizer(accelerator: Accelerator, config: TrainConfig,
                              spec: ModelSpec) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The bare model (seeded first, so every process starts from the same weights) and its optimizer."""
    check_fits_in_memory(spec, accelerator.device)
    set_seed(config.seed)
    model = build_model(spec, fusable_pool=config.fused_pool)
    if config.batch_norm and config.sync_bn and accelerator.num_processes > 1:
        model = sync_batchnorm.synchronise(model, accelerator.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    on_gpu = accelerator.device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithm once
    optimizer = make_sgd(model, config.lr, config.momentum, config.nesterov, config.weight_decay, fused=on_gpu)
    return model, optimizer


# fp32 copies of every parameter while training: weights, gradients, momentum, and the EMA's weights.
TRAINING_COPIES = 4


def check_fits_in_memory(spec: ModelSpec, device: torch.device) -> None:
    """Refuse a model whose parameters alone would not fit in the device's memory, before allocating it
    (a --hidden-size typo should be one line, not an out-of-memory crash or a swapping machine)."""
    parameters = spec.parameter_count()
    needed = parameters * 4 * TRAINING_COPIES
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise UsageError(f"the model has {parameters:,} parameters: training needs about {needed / 2**30:,.0f} GiB, "
                         f"more than this {device.type.upper()}'s {available / 2**30:,.0f} GiB; lower --hidden-size, "
                         f"--image-size or raise --width-divisor")


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> LRSchedule:
    return LRSchedule(config.lr_schedule, config.lr, warmup_steps=round(config.warmup_epochs * steps_per_epoch),
                      total_steps=config.epochs * steps_per_epoch)


def make_augmenter(accelerator: Accelerator, config: TrainConfig) -> BatchAugmenter | None:
    augmentation = Augmentation(config.random_crop_padding, config.hflip, config.random_erase)
    if not augmentation:
        return None
    return BatchAugmenter(augmentation, accelerator.device, config.seed, accelerator.process_index,
                          accelerator.num_processes, config.batch_size)


COMPILE_CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def compiles(config: TrainConfig, device: torch.device) -> bool:
    """--compile as given, or by default on GPUs only (BENCHMARKS.md has the measurements behind this)."""
    return config.compile if config.compile is not None else device.type == "cuda"


def compile_cache_dir() -> Path:
    """Where torch.compile keeps its compiled graphs and kernels, so a second run does not compile again:
    $TORCHINDUCTOR_CACHE_DIR if the user set it, else a per-user cache (Inductor's own default is under
    /tmp, which clusters often clear at the end of every job). Inductor writes its default into the
    variable when it first looks, so that value counts as unset."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        inductor_default = os.path.abspath(default_cache_dir())
    except ImportError:  # older PyTorch sets no default into the variable
        inductor_default = None
    if os.environ.get(COMPILE_CACHE_VARIABLE) in (None, inductor_default):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ[COMPILE_CACHE_VARIABLE] = str(base / "vgg_dist" / "torchinductor")
    return Path(os.environ[COMPILE_CACHE_VARIABLE])


def maybe_compile(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    if not compiles(config, device):
        return model
    compile_cache_dir()
    # dynamic=False: batches are always full (Accelerate evens out the last one), so shapes never change.
    return torch.compile(model, dynamic=False, mode=None if config.compile_mode == "default" else config.compile_mode)


@dataclasses.dataclass
class Run:
    """What the loop needs beyond a step: the data, the model to evaluate, where results go, and how it
    is asked to stop."""

    train_loader: torch.utils.data.DataLoader
    train_sampler: EpochBatchSampler
    eval_loaders: dict[str, torch.utils.data.DataLoader]  # "val" (with --val-split) and "test"
    eval_model: torch.nn.Module  # the trained model, or its EMA
    spec: ModelSpec
    run_dir: Path
    files: RunFiles | None  # on the global main process only
    stop: StopRequest


@dataclasses.dataclass
class Result:
    last_epoch: dict           # the last metrics record ({} if nothing was trained)
    confusion: list[list[int]] | None  # of the test set
    trained_samples: int
    train_seconds: float


def fit(t: Training, run: Run, resumed_sums: EpochSums | None = None) -> Result:
    accelerator, config, progress = t.accelerator, t.config, t.progress
    steps_per_epoch = run.train_sampler.full_length()
    show_bar = accelerator.is_main_process and (sys.stdout.isatty() if config.progress is None else config.progress)
    result = Result({}, None, 0, 0.0)

    while progress.epoch < config.epochs:
        epoch, first_step = progress.epoch, progress.step_in_epoch
        run.train_sampler.start_epoch(epoch, skip_batches=first_step)
        # A resumed epoch's sums were saved reduced over all processes: add them back once, not per process.
        t.sums = DeviceSums(accelerator.device, resumed_sums if accelerator.is_main_process else None)
        resumed_sums = None
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(accelerator.device)
        bar = tqdm(total=steps_per_epoch, initial=first_step, desc=f"train epoch {epoch + 1}/{config.epochs}",
                   unit="batch", file=sys.stdout, leave=False, dynamic_ncols=True) if show_bar else None
        started = time.perf_counter()
        t.model.train()
        for images, labels in run.train_loader:
            train_step(t, images, labels)
            if bar is not None:
                bar.update(1)
            checkpoint_due = bool(config.checkpoint_every) and progress.global_step % config.checkpoint_every == 0
            if checkpoint_due or progress.global_step % config.sync_every == 0:
                agree_then_checkpoint(t, run, checkpoint_due)  # raises Diverged or Preempted
                show_progress(t, run, bar, steps_per_epoch)
        if bar is not None:
            bar.close()

        # End of the epoch: reduce the sums, agree once more (a non-finite end of epoch is never
        # evaluated, and a stop asked for now need not wait for the evaluation), evaluate, record, checkpoint.
        sums = t.sums.reduced(accelerator)
        seconds = time.perf_counter() - started  # reducing waited for the device
        agree_then_checkpoint(t, run, checkpoint_due=False)
        steps_run = progress.step_in_epoch - first_step
        record, confusion = evaluate_epoch(t, run, sums, steps_run, seconds)
        report_epoch(accelerator, record, run.files, config.epochs)
        result.last_epoch, result.confusion = record, confusion
        result.trained_samples += steps_run * config.batch_size
        result.train_seconds += seconds if steps_run else 0.0
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        # The best checkpoint is chosen on the validation set when there is one, never on the test set then.
        judged_on = "val" if "val_acc" in record else "test"
        is_best = progress.best_acc is None or record[f"{judged_on}_acc"] > progress.best_acc
        if is_best:
            progress.best_acc = record[f"{judged_on}_acc"]
        if config.checkpoint_epochs:
            t.sums = DeviceSums(accelerator.device)  # a new epoch starts with nothing summed
            path = save_checkpoint(t, run)
            if is_best and accelerator.is_main_process:
                checkpoint.mark_best(run.run_dir / checkpoint.CHECKPOINTS_DIR, path, f"{judged_on}_acc",
                                     progress.best_acc)
    return result


def show_progress(t: Training, run: Run, bar, steps_per_epoch: int) -> None:
    """Right after the processes agreed, when reading the running sums costs no extra stall: the bar's
    loss and accuracy, and CURVE_POINTS_PER_EPOCH points per epoch for the curves."""
    progress = t.progress
    curve_every = max(1, steps_per_epoch // CURVE_POINTS_PER_EPOCH)
    on_curve = progress.step_in_epoch % curve_every < t.config.sync_every
    if not t.accelerator.is_main_process or (bar is None and not on_curve):
        return
    sums = t.sums.local()
    point = {"epoch": progress.epoch + progress.step_in_epoch / steps_per_epoch, "global_step": progress.global_step,
             "train_loss": sums.loss / sums.samples, "train_acc": sums.correct / sums.samples,
             "lr": t.schedule(progress.global_step - 1)}
    if bar is not None:
        bar.set_postfix(loss=f"{point['train_loss']:.3f}", acc=f"{point['train_acc']:.3f}", refresh=False)
    if on_curve:
        run.files.add_curve_point(point)


def evaluate_epoch(t: Training, run: Run, sums: EpochSums, steps_run: int,
                   seconds: float) -> tuple[dict, list[list[int]]]:
    """The epoch's metrics record, with a fresh evaluation of every evaluation split, and the test
    set's confusion matrix."""
    accelerator, config, progress = t.accelerator, t.config, t.progress
    started = time.perf_counter()
    evaluations = {name: evaluate(accelerator, run.eval_model, loader, run.spec.image_size, run.spec.num_classes,
                                  config.channels_last, tta=config.tta)
                   for name, loader in run.eval_loaders.items()}
    record = {"epoch": progress.epoch + 1, "train_loss": sums.loss / sums.samples,
              "train_acc": sums.correct / sums.samples, "train_samples": int(sums.samples),
              "lr": t.schedule(progress.global_step - 1)}
    for name, (matrix, loss) in evaluations.items():
        record.update({f"{name}_loss": loss, f"{name}_acc": accuracy(matrix), f"{name}_samples": sample_count(matrix)})
    record.update({
        # Only this session's steps: an epoch resumed at its very end has no speed to report.
        "examples_per_sec": steps_run * config.batch_size / seconds if steps_run else None,
        "seconds": seconds, "eval_seconds": time.perf_counter() - started, "global_step": progress.global_step,
        # Per epoch, so a leak shows as growth from one line to the next.
        "peak_memory_bytes": (torch.cuda.max_memory_allocated(accelerator.device)
                              if accelerator.device.type == "cuda" else None)})
    return record, evaluations["test"][0]


def report_epoch(accelerator: Accelerator, record: dict, files: RunFiles | None, epochs: int) -> None:
    """The epoch's line, its metrics.jsonl record and curves (`files`, on the main process only), and the
    trackers' scalars."""
    speed = f", {record['examples_per_sec']:.1f} examples/sec" if record["examples_per_sec"] else ""
    val = f", val acc {record['val_acc']:.3f}" if "val_acc" in record else ""
    say(accelerator, f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.3f}, "
                     f"train acc {record['train_acc']:.3f}{val}, test acc {record['test_acc']:.3f}{speed}")
    if accelerator.is_main_process:
        files.add_epoch(record)
    splits = ["train", *(split for split in ("val", "test") if f"{split}_acc" in record)]
    scalars = {f"{split}/{metric}": record[f"{split}_{metric}"] for split in splits for metric in ("loss", "acc")}
    scalars["train/lr"] = record["lr"]
    if record["examples_per_sec"]:
        scalars["perf/examples_per_sec"] = record["examples_per_sec"]
    accelerator.log(scalars, step=record["epoch"])


def agree_then_checkpoint(t: Training, run: Run, checkpoint_due: bool) -> None:
    """All processes agree on two things in one small collective: did any see a non-finite loss (then
    the run ends, Diverged), and was any asked to stop (then a checkpoint is written and the run ends,
    Preempted). A checkpoint that is due is written here too, after the weights are checked finite."""
    progress, stop = t.progress, run.stop
    check_weights = checkpoint_due or stop.requested
    stop_requested, bad_step = agree(t.accelerator, stop.requested,
                                     t.watch.first_bad(progress.global_step, t.model if check_weights else None))
    if bad_step is not None:
        raise Diverged(f"non-finite loss or weights at step {bad_step} (epoch {progress.epoch + 1}); nothing after "
                       f"the last checkpoint was saved; lower --lr or check the data")
    if checkpoint_due or stop_requested:
        path = save_checkpoint(t, run)
    if stop_requested:
        say(t.accelerator, f"stop signal received: checkpoint {path} written")
        if t.config.requeue and t.accelerator.is_main_process:
            say(t.accelerator, requeue_slurm_job())
        raise Preempted(f"by {stop.signal_name or 'a signal on another process'} at step {progress.global_step}; "
                        f"checkpoint {path}; rerun with --resume auto to continue")


def save_checkpoint(t: Training, run: Run) -> Path:
    """Collective: every process contributes its RNG state and its sums; the main process writes and
    commits the checkpoint, then rotates old ones; all return once it exists."""
    accelerator = t.accelerator
    every_rank_rng = gather_object([checkpoint_state.rng_state()])
    sums = t.sums.reduced(accelerator)
    checkpoints_dir = run.run_dir / checkpoint.CHECKPOINTS_DIR
    path = checkpoints_dir / checkpoint.checkpoint_name(t.progress.global_step)
    if accelerator.is_main_process:
        tensor_files, state = checkpoint_state.build(
            t.progress, sums, unwrapped_state_dict(accelerator, t.model), t.optimizer.state_dict(),
            accelerator.scaler.state_dict() if accelerator.scaler is not None else None, every_rank_rng,
            run.spec, t.config.to_dict(), t.schedule, t.ema.state_dict() if t.ema is not None else None)
        path = checkpoint.save_checkpoint(checkpoints_dir, t.progress.global_step, tensor_files, state)
        checkpoint.rotate(checkpoints_dir, t.config.keep_last)
    accelerator.wait_for_everyone()  # nobody goes on (or exits) before the checkpoint is committed
    return path
