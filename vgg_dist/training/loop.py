"""The training loop: `fit` runs epochs of `train_step`s, meets the other processes every --sync-every
steps, and evaluates, records and checkpoints at each epoch end. `vgg_dist/train.py` builds what it needs.

Nothing in a step waits for the host: loss and accuracy accumulate on the device, and a non-finite
loss is noted on the device too, until the processes next meet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vgg_dist.config import TrainConfig
from vgg_dist.data.augment import BatchAugmenter
from vgg_dist.data.batches import EpochBatchSampler, to_model_input
from vgg_dist.errors import Diverged, Preempted
from vgg_dist.model import ModelSpec
from vgg_dist.report import CurvePoint, EpochRecord, accuracy, sample_count
from vgg_dist.training.cuda_graph import GraphedUpdate
from vgg_dist.training.dist import NO_STEP, Agreement, agree, evaluate, say
from vgg_dist.training.optim import LRSchedule, set_learning_rate
from vgg_dist.training.preemption import StopRequest
from vgg_dist.training.state import EpochSums, TrainState

if TYPE_CHECKING:
    from vgg_dist.store.run_dir import Store

CURVE_POINTS_PER_EPOCH = 5  # as many train points per epoch as the chapter's plot draws
Update = Callable[[torch.Tensor, torch.Tensor, dict | None], tuple[torch.Tensor, ...]]


@dataclasses.dataclass(kw_only=True)
class Run:
    """What the loop needs beyond the TrainState: the recipe, the data, the model to evaluate, where
    results go, and how it is asked to stop. A benchmark fills in only what a step needs."""

    config: TrainConfig
    spec: ModelSpec  # the model's shape and the standardisation its input gets
    schedule: LRSchedule
    augment: BatchAugmenter | None = None
    train_loader: torch.utils.data.DataLoader | None = None
    train_sampler: EpochBatchSampler | None = None
    eval_loaders: dict[str, torch.utils.data.DataLoader] = dataclasses.field(default_factory=dict)  # val, test
    eval_model: torch.nn.Module | None = None  # the trained model, or its EMA
    store: Store | None = None
    stop: StopRequest | None = None


@dataclasses.dataclass
class Result:
    last_epoch: EpochRecord | None = None  # None if this run trained nothing (it had already finished)
    confusion: list[list[int]] | None = None  # of the test set
    trained_samples: int = 0
    train_seconds: float = 0.0


class NonFiniteWatch:
    """The first step whose loss was non-finite, kept on the device until the processes next meet."""

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


def fit(state: TrainState, run: Run) -> Result:
    config, progress = run.config, state.progress
    watch = NonFiniteWatch(state.accelerator.device)
    update = make_update(state, run)
    result = Result()
    while progress.epoch < config.epochs:
        first_step, started = progress.step_in_epoch, time.perf_counter()
        run.train_sampler.start_epoch(progress.epoch, skip_batches=first_step)
        if state.accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(state.accelerator.device)
        bar = open_progress_bar(state, run)
        train_mode(state.model, config.freeze_features)
        for images, labels in run.train_loader:
            loss = train_step(state, run, update, images, labels)
            watch.record(loss, progress.global_step)
            if bar is not None:
                bar.update(1)
            checkpoint_due = bool(config.checkpoint_every) and progress.global_step % config.checkpoint_every == 0
            if checkpoint_due or progress.global_step % config.sync_every == 0:
                show_progress(state, run, bar, sync_point(state, run, watch, checkpoint_due))
        if bar is not None:
            bar.close()
        record, confusion = end_epoch(state, run, watch, first_step, started)
        steps_run = run.train_sampler.full_length() - first_step  # an epoch that ends has taken all its steps
        result.last_epoch, result.confusion = record, confusion
        result.trained_samples += steps_run * config.batch_size
        result.train_seconds += record.seconds if steps_run else 0.0
    return result


def train_mode(model: torch.nn.Module, freeze_features: bool) -> None:
    """Training mode, except that frozen features keep their BatchNorm layers in eval mode: in training mode
    they would normalise by each batch's statistics and update their running ones, so the features would
    change although their weights do not, and the running statistics saved would no longer be those the
    frozen weights came with (the pretrained ones). All of VGG's BatchNorm layers are in its features; the
    wrapped model (DDP, torch.compile) holds the same layer objects, so setting them on it is enough."""
    model.train()
    if freeze_features:
        for layer in model.modules():
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                layer.eval()


def make_update(state: TrainState, run: Run) -> Update:
    """A step's device work (`update`), or with --cuda-graphs the same replayed as a CUDA graph."""
    eager = functools.partial(update, state, run)
    return GraphedUpdate(eager, state.optimizer, state.accelerator.device) if run.config.cuda_graphs else eager


def train_step(state: TrainState, run: Run, update: Update, images: torch.Tensor,
               labels: torch.Tensor) -> torch.Tensor:
    """One optimizer step on one batch: the learning rate and the augmentation's random numbers for this
    step, the device work, then the weights' average and the running sums. Returns the loss (on the device)."""
    progress = state.progress
    set_learning_rate(state.optimizer, run.schedule(progress.global_step))
    draws = run.augment.draw(progress.epoch, progress.step_in_epoch) if run.augment is not None else None
    loss, logits, judged_by = update(images, labels, draws)
    progress.step_in_epoch += 1
    progress.global_step += 1
    if state.ema is not None:
        state.ema.update(progress.global_step)
    state.sums.add(loss, logits, judged_by)
    return loss


def update(state: TrainState, run: Run, images: torch.Tensor, labels: torch.Tensor,
           draws: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's device work, from a batch to new weights: augment and mix, forward, loss, backward (per
    micro-batch with --grad-accum-steps), clip, optimizer step. Returns the loss, logits and the labels train
    accuracy is judged by (under MixUp/CutMix the dominant ones), detached. Nothing here waits for the host,
    so it can be recorded as a CUDA graph; the gradients are set to None before the backward writes them."""
    config, judged_by = run.config, labels
    if draws is not None:  # the whole per-process batch at once: each image keeps its row of the draws
        images = run.augment.apply(images, draws)
        if "mix" in draws:  # labels become soft targets; one process gathers nothing
            gather = state.accelerator.gather if state.accelerator.num_processes > 1 else None
            images, labels, judged_by = run.augment.mix(images, labels, draws, run.spec.num_classes, gather)
    state.optimizer.zero_grad(set_to_none=True)
    if config.grad_accum_steps == 1:
        loss, logits = forward_backward(state, run, images, labels, 1)
    else:
        loss, logits = accumulate(state, run, images, labels)
    if config.clip_grad_norm is not None:
        state.accelerator.clip_grad_norm_(state.model.parameters(), config.clip_grad_norm)
    state.optimizer.step()
    return loss, logits, judged_by


def forward_backward(state: TrainState, run: Run, images: torch.Tensor, labels: torch.Tensor,
                     micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one (micro-)batch, adding its gradients to those already there; the loss is
    divided by the number of micro-batches so that the sum of their gradients is the whole batch's mean."""
    config, spec = run.config, run.spec
    x = to_model_input(images, config.image_size, config.channels_last, spec.input_mean, spec.input_std)
    logits = state.model(x)
    loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
    state.accelerator.backward(loss if micro_batches == 1 else loss / micro_batches)
    return loss.detach(), logits.detach()


def accumulate(state: TrainState, run: Run, images: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient accumulation inside one optimizer step: this process's rows in --grad-accum-steps equal
    micro-batches, in order, so that micro-batch k of process p holds the same images on any processes x K
    of the same global batch. Returns the mean loss and all the logits, as one batch would.

    Written out with `accelerator.no_sync` rather than `accelerator.accumulate`: that one counts loader
    batches in Accelerate's GradientState, which the checkpoints do not hold, and would make the loader yield
    micro-batches, so a window could straddle a sync point or a checkpoint. Here the whole window lies inside
    one step, so steps, the schedule, checkpoints and the running sums stay counted in optimizer steps and a
    stop signal always lands between windows. DDP all-reduces once, in the last micro-batch's backward."""
    micro_batches = run.config.grad_accum_steps
    losses, logits = [], []
    for index, (part, part_labels) in enumerate(zip(images.chunk(micro_batches), labels.chunk(micro_batches))):
        last = index == micro_batches - 1
        with contextlib.nullcontext() if last else state.accelerator.no_sync(state.model):
            loss, part_logits = forward_backward(state, run, part, part_labels, micro_batches)
        losses.append(loss)
        logits.append(part_logits)
    return torch.stack(losses).mean(), torch.cat(logits)


def sync_point(state: TrainState, run: Run, watch: NonFiniteWatch, checkpoint_due: bool) -> Agreement:
    """Where the processes meet, in one small collective: did any see a non-finite loss (then the run
    ends, Diverged), was any asked to stop (then a checkpoint is written and the run ends, Preempted), and
    what are the global batch's running sums. A checkpoint that is due is written here too, once the
    weights are known to be finite."""
    progress, accelerator = state.progress, state.accelerator
    check_weights = checkpoint_due or run.stop.requested
    agreement = agree(accelerator, run.stop.requested,
                      watch.first_bad(progress.global_step, state.model if check_weights else None), state.sums.values)
    if agreement.bad_step is not None:
        raise Diverged(f"non-finite loss or weights at step {agreement.bad_step} (epoch {progress.epoch + 1}); nothing "
                       f"after the last checkpoint was saved; lower --lr or check the data")
    if checkpoint_due or agreement.stop:
        path = run.store.save(state)
    if agreement.stop:
        say(accelerator, f"stop signal received: checkpoint {path} written")
        raise Preempted(f"by {run.stop.signal_name or 'a signal on another process'} at step {progress.global_step}; "
                        f"checkpoint {path}; rerun with --resume auto to continue")
    return agreement


def open_progress_bar(state: TrainState, run: Run) -> tqdm | None:
    """A bar per epoch on the main process, when stdout is a terminal (or --progress says so)."""
    shown = run.config.progress if run.config.progress is not None else sys.stdout.isatty()
    if not (state.accelerator.is_main_process and shown):
        return None
    return tqdm(total=run.train_sampler.full_length(), initial=state.progress.step_in_epoch, unit="batch",
                desc=f"train epoch {state.progress.epoch + 1}/{run.config.epochs}", file=sys.stdout, leave=False,
                dynamic_ncols=True)


def show_progress(state: TrainState, run: Run, bar: tqdm | None, agreement: Agreement) -> None:
    """The bar's loss and accuracy and, CURVE_POINTS_PER_EPOCH times an epoch, a point of the curves: both
    from the global batch's sums, which the processes just agreed on."""
    progress, steps_per_epoch = state.progress, run.train_sampler.full_length()
    on_curve = progress.step_in_epoch % max(1, steps_per_epoch // CURVE_POINTS_PER_EPOCH) < run.config.sync_every
    if not state.accelerator.is_main_process or (bar is None and not on_curve):
        return
    sums = EpochSums(*agreement.sums)
    if bar is not None:
        bar.set_postfix(loss=f"{sums.mean_loss:.3f}", acc=f"{sums.accuracy:.3f}", refresh=False)
    if on_curve:
        run.store.files.add_curve_point(CurvePoint(
            epoch=progress.epoch + progress.step_in_epoch / steps_per_epoch, global_step=progress.global_step,
            train_loss=sums.mean_loss, train_acc=sums.accuracy, lr=run.schedule(progress.global_step - 1)))


def end_epoch(state: TrainState, run: Run, watch: NonFiniteWatch, first_step: int,
              started: float) -> tuple[EpochRecord, list[list[int]]]:
    """The end of an epoch: meet once more (a non-finite end of epoch is never evaluated, and a stop asked
    for now need not wait for the evaluation), evaluate, record, and checkpoint. Returns the epoch's record
    and the test set's confusion matrix."""
    progress, config = state.progress, run.config
    sums = EpochSums(*sync_point(state, run, watch, checkpoint_due=False).sums)
    seconds = time.perf_counter() - started  # meeting waited for the device
    record, confusion = evaluate_epoch(state, run, sums, seconds, progress.step_in_epoch - first_step)
    report_epoch(state, run, record)
    progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
    state.sums.reset()  # a new epoch starts with nothing summed
    metric, value = record.judged()
    is_best = progress.best_acc is None or value > progress.best_acc
    if is_best:
        progress.best_acc = value
    if config.checkpoint_epochs:
        path = run.store.save(state)
        if is_best:
            run.store.mark_best(path, metric, value)
    return record, confusion


def evaluate_epoch(state: TrainState, run: Run, sums: EpochSums, seconds: float,
                   steps_run: int) -> tuple[EpochRecord, list[list[int]]]:
    """The epoch's record, with a fresh evaluation of every evaluation split."""
    accelerator, config, progress = state.accelerator, run.config, state.progress
    started = time.perf_counter()
    evaluations = {name: evaluate(accelerator, run.eval_model, loader, run.spec, config.channels_last, config.tta)
                   for name, loader in run.eval_loaders.items()}
    scores = {f"{name}_{key}": value for name, (matrix, loss) in evaluations.items()
              for key, value in (("loss", loss), ("acc", accuracy(matrix)), ("samples", sample_count(matrix)))}
    record = EpochRecord(
        epoch=progress.epoch + 1, train_loss=sums.mean_loss, train_acc=sums.accuracy, train_samples=int(sums.samples),
        lr=run.schedule(progress.global_step - 1), **scores,
        # Only the steps this process ran: an epoch resumed at its very end has no speed to report.
        examples_per_sec=steps_run * config.batch_size / seconds if steps_run else None, seconds=seconds,
        eval_seconds=time.perf_counter() - started, global_step=progress.global_step,
        # Per epoch, so a leak shows as growth from one line to the next.
        peak_memory_bytes=(torch.cuda.max_memory_allocated(accelerator.device)
                           if accelerator.device.type == "cuda" else None))
    return record, evaluations["test"][0]


def report_epoch(state: TrainState, run: Run, record: EpochRecord) -> None:
    """The epoch's line, its metrics.jsonl record and curves (main process), and the trackers' scalars."""
    accelerator = state.accelerator
    speed = f", {record.examples_per_sec:.1f} examples/sec" if record.examples_per_sec else ""
    val = f", val acc {record.val_acc:.3f}" if record.val_acc is not None else ""
    say(accelerator, f"epoch {record.epoch}/{run.config.epochs}: loss {record.train_loss:.3f}, "
                     f"train acc {record.train_acc:.3f}{val}, test acc {record.test_acc:.3f}{speed}")
    if accelerator.is_main_process:
        run.store.files.add_epoch(record)
    values = record.to_dict()
    splits = ["train", *(split for split in ("val", "test") if f"{split}_acc" in values)]
    scalars = {f"{split}/{metric}": values[f"{split}_{metric}"] for split in splits for metric in ("loss", "acc")}
    scalars["train/lr"] = record.lr
    if record.examples_per_sec:
        scalars["perf/examples_per_sec"] = record.examples_per_sec
    accelerator.log(scalars, step=record.epoch)
