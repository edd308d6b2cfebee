"""Train d2l's VGG on Fashion-MNIST with Hugging Face Accelerate: CPU, one GPU, many GPUs, many nodes.

    accelerate launch vgg_dist/train.py --data-dir data/fashion_mnist                # one process
    accelerate launch --multi_gpu --num_processes 8 vgg_dist/train.py               # all GPUs of a node
    accelerate launch --mixed_precision bf16 vgg_dist/train.py                        # bf16 autocast
    accelerate launch --multi_gpu --num_processes 2 vgg_dist/train.py --epochs 1    # 2 CPU processes (gloo)
    accelerate launch vgg_dist/train.py --output-dir runs/a --resume auto            # continue a stopped run

This is the only module that imports Accelerate: the model, the data, the checkpoint files and the
artifacts are plain PyTorch, and `vgg_dist.evaluate` reuses `make_accelerator` and `evaluate` from here.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`accelerate launch vgg_dist/train.py`): put the repository on the path instead of
    # this folder, so `vgg_dist` is importable and its modules cannot shadow top-level ones.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import (DDPCommunicationHookType, DistributedDataParallelKwargs, InitProcessGroupKwargs,
                               ProjectConfiguration, broadcast_object_list, gather_object, set_seed)

from vgg_dist import artifacts, checkpoint
from vgg_dist.config import CONFIG_FILE_NAME, TrainConfig, config_file_values, parse_config
from vgg_dist.data import BatchIndexedTensors, EpochBatchSampler, Split, keep_batch, load_dataset, to_model_input
from vgg_dist.errors import Diverged, Preempted, UsageError, exits_cleanly_on_stop
from vgg_dist.model import ModelSpec, build_model, count_parameters
from vgg_dist.preemption import StopRequest, requeue_slurm_job
from vgg_dist.run_files import RunFiles

# Flags that fix which images each step sees; a checkpoint only continues a run that agrees on them.
DATA_ORDER_FLAGS = ("batch_size", "seed", "dataset", "max_train_samples")


TRACKERS = {"none": None, "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}


def make_accelerator(dist_timeout: int = 600, report_to: str = "none", ddp_bf16_grads: bool = False) -> Accelerator:
    """An Accelerator whose dataloaders take GLOBAL batches and split them across processes.

    Without a GPU it is built with cpu=True: that is what turns `accelerate launch --multi_gpu
    --num_processes N` into one N-process gloo job instead of N independent runs. `dist_timeout`
    bounds every collective, so a dead rank fails the job instead of hanging it for gloo's 30 minutes.
    DDP keeps gradients as views into its all-reduce buckets (no extra copy of the 42M-parameter
    classifier's gradients) and treats the graph as static (the same parameters every step).
    """
    ddp = DistributedDataParallelKwargs(
        gradient_as_bucket_view=True, static_graph=True,
        comm_hook=DDPCommunicationHookType.BF16 if ddp_bf16_grads else DDPCommunicationHookType.NO)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        # non_blocking: batches come from pinned memory, so the copy to the GPU need not wait for the
        # previous step's kernels, which a blocking copy on the same stream would.
        dataloader_config=DataLoaderConfiguration(split_batches=True, even_batches=True, non_blocking=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=dist_timeout)), ddp],
        log_with=TRACKERS[report_to],
        # The real logging directory (inside the run directory) is set once the run directory is chosen.
        project_config=ProjectConfiguration(logging_dir="runs"),
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate would silently train in fp32 here; say so instead.
        raise UsageError("--mixed_precision fp16 needs a GPU and none is visible; use bf16 or no on CPU")
    return accelerator


def say(accelerator: Accelerator, line: str) -> None:
    """Print once per job: on the global main process (Accelerate's own print runs once per node)."""
    if accelerator.is_main_process:
        print(line, flush=True)


def check_layout(accelerator: Accelerator, batch_size: int) -> None:
    processes = accelerator.num_processes
    if batch_size % processes:
        raise UsageError(f"--batch-size {batch_size} does not split evenly over {processes} processes; "
                         f"use a multiple of {processes}")


def make_loader(split: Split, sampler: EpochBatchSampler, device: torch.device) -> torch.utils.data.DataLoader:
    # The whole dataset is a few tensors in memory and a batch is one index op, so worker processes
    # would only add inter-process copies. The loader's own generator keeps it from drawing on the
    # global RNG, whose stream (dropout) a resumed run must continue exactly.
    return torch.utils.data.DataLoader(BatchIndexedTensors(split), batch_sampler=sampler, collate_fn=keep_batch,
                                       pin_memory=device.type == "cuda",  # for non-blocking copies
                                       generator=torch.Generator())


@dataclasses.dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0          # the epoch in progress (0-based)
    step_in_epoch: int = 0  # optimizer steps already taken in it
    global_step: int = 0
    best_test_acc: float | None = None


class Health:
    """Per-step signals that must be agreed on by all processes, checked without a per-step host sync:
    the first step whose loss was non-finite stays on the device until `agree` reads it."""

    NONE = 2 ** 62

    def __init__(self, device: torch.device, stop: StopRequest):
        self.first_bad_step = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.stop = stop

    def record(self, loss: torch.Tensor, global_step: int) -> None:
        first = ~torch.isfinite(loss.detach()) & (self.first_bad_step == self.NONE)
        self.first_bad_step = torch.where(first, global_step, self.first_bad_step)

    def agree(self, accelerator: Accelerator, global_step: int, model=None) -> tuple[bool, int | None]:
        """(some process was asked to stop, first non-finite step on any process or None); one collective.

        With `model`, weights that are already non-finite mark the current step as bad too, so nothing
        non-finite is ever checkpointed.
        """
        bad = self.first_bad_step.clone()
        if model is not None:
            finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
            bad = torch.where(finite | (bad != self.NONE), bad, global_step)
        local = torch.stack([torch.tensor(int(self.stop.requested), device=bad.device), bad])
        both = accelerator.gather(local.unsqueeze(0)).view(-1, 2).cpu()
        stop, first_bad = bool(both[:, 0].max()), int(both[:, 1].min())
        return stop, (None if first_bad == self.NONE else first_bad)


def train_steps(accelerator: Accelerator, model, optimizer, loader, config: TrainConfig, channels_last: bool,
                progress: Progress, totals: torch.Tensor, health: Health, on_sync, bar=None) -> None:
    """Steps through the rest of the epoch in the chapter's order. Loss and accuracy accumulate into
    `totals` on the device (loss sum, correct, samples); nothing here waits on the host except the
    agreement every --sync-every steps (`on_sync`)."""
    model.train()
    for images, labels in loader:
        logits = model(to_model_input(images, config.image_size, channels_last))
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        batch = labels.shape[0]
        totals[0] += loss.detach() * batch
        totals[1] += (logits.detach().argmax(dim=1) == labels).sum()
        totals[2] += batch
        progress.step_in_epoch += 1
        progress.global_step += 1
        health.record(loss, progress.global_step)
        if bar is not None:
            bar.update(1)
        checkpoint_due = config.checkpoint_every and progress.global_step % config.checkpoint_every == 0
        if checkpoint_due or progress.global_step % config.sync_every == 0:
            on_sync(checkpoint_due)


def evaluate(accelerator: Accelerator, model, loader, image_size: int, num_classes: int,
             channels_last: bool) -> torch.Tensor:
    """Confusion matrix [true, predicted] over the whole test set, on every process.

    `gather_for_metrics` drops the samples Accelerate repeats to even out the last batch, so each test
    image counts exactly once whatever the number of processes.
    """
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=accelerator.device)
    with torch.no_grad():
        for images, labels in loader:
            predictions = model(to_model_input(images, image_size, channels_last)).argmax(dim=1)
            predictions, labels = accelerator.gather_for_metrics((predictions, labels))
            confusion += torch.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
    return confusion.view(num_classes, num_classes)


def accuracy(confusion: torch.Tensor) -> tuple[float, int]:
    total = int(confusion.sum())
    return (int(confusion.trace()) / total if total else 0.0), total


def build_training(accelerator: Accelerator, config: TrainConfig, in_channels: int, num_classes: int):
    """(model, optimizer, channels_last) for this device, not yet prepared; seeds the weights first so
    every process starts from the same ones."""
    set_seed(config.seed)
    model = build_model(config.model_spec(in_channels=in_channels, num_classes=num_classes))
    channels_last = config.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    on_gpu = accelerator.device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithm once
    # One fused kernel for the whole SGD update on the GPU instead of one per parameter.
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                **({"fused": True} if on_gpu else {"foreach": True}))
    return model, optimizer, channels_last


def maybe_compile(model, config: TrainConfig):
    # dynamic=False: batches are always full (Accelerate evens out the last one), so shapes never change.
    return torch.compile(model, dynamic=False) if config.compile else model


# ---- Run directory ------------------------------------------------------------------------------

def choose_run_dir(accelerator: Accelerator, config: TrainConfig) -> Path:
    """The main process picks (and creates) the run directory; every process learns its name."""
    chosen = [None]
    if accelerator.is_main_process:
        if config.output_dir is not None:
            path = Path(config.output_dir)
        elif config.resume not in (None, "auto"):
            path = Path(config.resume).resolve().parent.parent  # RUN_DIR/checkpoints/step_N
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            path, suffix = Path("runs") / stamp, 1
            while path.exists():
                path, suffix = Path("runs") / f"{stamp}-{suffix}", suffix + 1
        path.mkdir(parents=True, exist_ok=True)
        chosen = [str(path)]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0])


def gather_layout(accelerator: Accelerator) -> list[dict]:
    """Where every rank runs: host, node rank, local rank, device; collected on all processes."""
    here = {"rank": accelerator.process_index, "host": socket.gethostname(),
            "node": int(os.environ.get("GROUP_RANK", 0)), "local_rank": accelerator.local_process_index,
            "device": str(accelerator.device)}
    return gather_object([here]) if accelerator.num_processes > 1 else [here]


def run_header(accelerator: Accelerator, config: TrainConfig, spec: ModelSpec, model, run_dir: Path,
               layout: list[dict]) -> str:
    processes = accelerator.num_processes
    nodes = len({entry["node"] for entry in layout})
    ranks = ", ".join(f"{entry['rank']}:node{entry['node']}/{entry['device']}" for entry in layout)
    return (f"vgg_dist: {spec.arch} / {spec.width_divisor}, {count_parameters(model):,} parameters, "
            f"{spec.image_size}x{spec.image_size} input\n"
            f"  world size {processes} = {nodes} node{'s' if nodes > 1 else ''} x {processes // nodes} "
            f"process{'es' if processes // nodes > 1 else ''} per node, backend "
            f"{accelerator.state.backend or 'none'}, ranks {ranks}\n"
            f"  global batch {config.batch_size} = {processes} x {config.batch_size // processes} per process, "
            f"mixed precision {accelerator.mixed_precision}\n"
            f"  run directory {run_dir}")


def weights_agree(accelerator: Accelerator, model) -> bool:
    """Whether every rank holds the same weights (DDP keeps them in step; this checks it did)."""
    if accelerator.num_processes == 1:
        return True
    with torch.no_grad():
        fingerprint = torch.stack([p.double().sum() for p in model.parameters()]
                                  + [p.double().abs().sum() for p in model.parameters()])
    every = accelerator.gather(fingerprint.unsqueeze(0))
    return bool((every == every[0]).all())


# ---- Checkpoint state -----------------------------------------------------------------------------

def plain_state_dict(accelerator: Accelerator, model) -> dict[str, torch.Tensor]:
    """The weights under the plain model's names (`0.0.weight`), whatever wraps it: DDP, autocast,
    torch.compile (whose `_orig_mod.` prefix Accelerate keeps unless told otherwise)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's random number generators: tensors, and JSON for Python's and NumPy's."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, words, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(words), gauss],
                     "numpy": [name, keys.tolist(), position, has_gauss, cached]}


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, words, gauss = plain["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))


def save_training_checkpoint(accelerator: Accelerator, model, optimizer, spec: ModelSpec, config: TrainConfig,
                             progress: Progress, totals: torch.Tensor, run_dir: Path) -> Path:
    """Collective: every process contributes its RNG state; the main process writes and commits;
    all return once the checkpoint exists."""
    rng_tensors, rng_plain = rng_state()
    every_rng = gather_object([(rng_tensors, rng_plain)])
    partial = accelerator.reduce(totals.clone(), reduction="sum").tolist()  # sums, so any world size can resume
    checkpoints_dir = run_dir / checkpoint.CHECKPOINTS_DIR
    path = checkpoints_dir / checkpoint.checkpoint_name(progress.global_step)
    if accelerator.is_main_process:
        optimizer_structure, optimizer_tensors = checkpoint.split_tensors(optimizer.state_dict(), "optimizer")
        rng_files = {f"rank{rank}.{kind}": tensor for rank, (tensors, _) in enumerate(every_rng)
                     for kind, tensor in tensors.items()}
        state = {
            "progress": dataclasses.asdict(progress),
            "world_size": accelerator.num_processes,
            "partial_epoch_totals": partial,
            "optimizer": optimizer_structure,
            "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "rng": [plain for _, plain in every_rng],
            "model": artifacts.spec_dict(spec),
            "flags": config.to_dict(),
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        weights = plain_state_dict(accelerator, model)
        path = checkpoint.save_checkpoint(checkpoints_dir, progress.global_step, {
            "model.safetensors": (weights, artifacts.weights_metadata(spec)),
            "optimizer.safetensors": (optimizer_tensors, {}),
            "rng.safetensors": (rng_files, {}),
        }, state)
    accelerator.wait_for_everyone()  # nobody goes on (or exits) before the checkpoint is committed
    return path


@dataclasses.dataclass
class Restored:
    path: Path
    progress: Progress
    partial_totals: list[float]
    rng_tensors: dict[str, torch.Tensor] | None
    rng_plain: dict | None


def load_training_checkpoint(path: Path, model, optimizer, scaler, spec: ModelSpec, config: TrainConfig,
                             process_index: int) -> Restored:
    """Verify a checkpoint completely, then load it into the plain model and optimizer.

    Every check happens before the first weight changes, and each failure is one CheckpointError line.
    """
    path = Path(path)
    checkpoint.verify(path)
    state = checkpoint.read_state(path)
    try:
        saved_spec = ModelSpec.from_dict(state["model"])
        saved_flags, progress = state["flags"], Progress(**state["progress"])
    except (KeyError, TypeError, ValueError) as error:
        raise checkpoint.CheckpointError(f"{path / checkpoint.STATE}: missing or malformed field ({error})") from None
    if saved_spec != spec:
        changed = {key: (value, getattr(spec, key)) for key, value in artifacts.spec_dict(saved_spec).items()
                   if getattr(spec, key) != value}
        raise checkpoint.CheckpointError(
            f"{path}: holds a different model ({', '.join(f'{k} {a} here {b}' for k, (a, b) in changed.items())}); "
            f"resume with the flags it was trained with")
    for name in DATA_ORDER_FLAGS:
        if saved_flags.get(name) != getattr(config, name):
            raise checkpoint.CheckpointError(
                f"{path}: was trained with --{name.replace('_', '-')} {saved_flags.get(name)}, not "
                f"{getattr(config, name)}; the data order would change, so pass the same value")
    weights_path = path / "model.safetensors"
    metadata, layout = checkpoint.read_header(weights_path)
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    if {name: shape for name, (_, shape) in layout.items()} != expected:
        raise checkpoint.CheckpointError(f"{weights_path}: tensor names or shapes do not match the model")
    if artifacts.SPEC_METADATA_KEY not in metadata:
        raise checkpoint.CheckpointError(f"{weights_path}: header has no model spec")
    weights = checkpoint.load_tensors(weights_path)
    optimizer_state = checkpoint.join_tensors(state["optimizer"], checkpoint.load_tensors(path / "optimizer.safetensors"))
    rng_tensors_all = checkpoint.load_tensors(path / "rng.safetensors")
    # Everything is read and checked: only now change the model.
    model.load_state_dict(weights)
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, RuntimeError) as error:
        raise checkpoint.CheckpointError(f"{path}: optimizer state does not fit ({error})") from None
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    prefix = f"rank{process_index}."
    rng_tensors = {key[len(prefix):]: value for key, value in rng_tensors_all.items() if key.startswith(prefix)}
    same_rank_exists = process_index < state.get("world_size", 0) and "torch" in rng_tensors
    return Restored(path, progress, list(state.get("partial_epoch_totals", [0.0, 0.0, 0.0])),
                    rng_tensors if same_rank_exists else None,
                    state["rng"][process_index] if same_rank_exists else None)


def resolve_resume(accelerator: Accelerator, config: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None to start fresh."""
    if config.resume is None:
        return None
    if config.resume != "auto":
        return Path(config.resume)
    latest = checkpoint.find_latest(run_dir / checkpoint.CHECKPOINTS_DIR, say=lambda line: say(accelerator, line))
    if latest is None and any((run_dir / name).exists() for name in (artifacts.CONFIG_NAME, artifacts.METRICS_NAME)):
        raise UsageError(f"--output-dir {run_dir} holds a run but no complete checkpoint to resume; "
                         f"choose a new directory so that run is not overwritten")
    return latest


# ---- Main ------------------------------------------------------------------------------------------

@exits_cleanly_on_stop
def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, prog="accelerate launch vgg_dist/train.py", description=__doc__.splitlines()[0])
    stop = StopRequest()
    stop.install()
    accelerator = make_accelerator(config.dist_timeout, config.report_to, config.ddp_bf16_grads)
    check_layout(accelerator, config.batch_size)
    layout = gather_layout(accelerator)

    with accelerator.main_process_first():  # the main process downloads, the others read its cache
        data = load_dataset(config.dataset, config.data_dir)
    train_split, test_split = data.train.head(config.max_train_samples), data.test.head(config.max_eval_samples)
    if len(train_split) < config.batch_size:
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {len(train_split)} training "
                         f"images; lower it or raise --max-train-samples")
    spec = config.model_spec(in_channels=data.in_channels, num_classes=len(data.class_names))
    model, optimizer, channels_last = build_training(accelerator, config, data.in_channels, len(data.class_names))

    accelerator.wait_for_everyone()  # every process has validated the output dir before it is created
    run_dir = choose_run_dir(accelerator, config)
    checkpoints_dir = run_dir / checkpoint.CHECKPOINTS_DIR
    resume_from = resolve_resume(accelerator, config, run_dir)
    restored = None
    if resume_from is not None:
        restored = load_training_checkpoint(resume_from, model, optimizer, accelerator.scaler, spec, config,
                                            accelerator.process_index)
    accelerator.wait_for_everyone()  # all processes loaded before the main one tidies the directory
    if accelerator.is_main_process:
        for leftover in checkpoint.clean_leftovers(checkpoints_dir):
            say(accelerator, f"removed {leftover}, left by an interrupted save")
    progress = restored.progress if restored else Progress()

    # Whole global batches only: every optimizer step sees exactly --batch-size images on any world size.
    train_sampler = EpochBatchSampler(len(train_split), config.batch_size, shuffle=True, drop_last=True,
                                      seed=config.seed)
    test_sampler = EpochBatchSampler(len(test_split), config.batch_size, shuffle=False, drop_last=False)
    train_loader = make_loader(train_split, train_sampler, accelerator.device)
    test_loader = make_loader(test_split, test_sampler, accelerator.device)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    model = maybe_compile(model, config)
    if restored and restored.rng_tensors is not None:
        set_rng_state(restored.rng_tensors, restored.rng_plain)
    else:
        # A different dropout stream on each process; after a resume on more processes than saved,
        # new ranks get a fresh stream derived from the step they start at.
        set_seed(config.seed + progress.global_step * 7919, device_specific=True)

    run_info = {
        "model": artifacts.spec_dict(spec),
        "class_names": list(data.class_names),
        "dataset": config.dataset,
        "data_source": data.source,
        "source_image_size": list(data.train.images.shape[2:]),  # what predict resizes new images to first
        "train_samples": len(train_split),
        "test_samples": len(test_split),
        "flags": config.to_dict(),
        "launch": {"num_processes": accelerator.num_processes, "device": accelerator.device.type,
                   "nodes": len({entry["node"] for entry in layout}), "mixed_precision": accelerator.mixed_precision,
                   "backend": accelerator.state.backend, "ranks": layout},
        "resumed_from": str(restored.path) if restored else None,
        "final_metrics": None,
    }
    files = RunFiles(run_dir) if accelerator.is_main_process else None
    if files:
        artifacts.write_json(run_dir / artifacts.CONFIG_NAME, run_info)
        files.write_config_file(config_file_values(config), CONFIG_FILE_NAME)
        files.forget_after(progress.epoch, progress.global_step)
    start_trackers(accelerator, config, run_dir)
    say(accelerator, run_header(accelerator, config, spec, model, run_dir, layout))
    if restored:
        say(accelerator, f"resumed from {restored.path}: epoch {progress.epoch + 1}, step "
                          f"{progress.step_in_epoch} of the epoch, global step {progress.global_step}")

    health = Health(accelerator.device, stop)

    def save(totals: torch.Tensor) -> Path:
        path = save_training_checkpoint(accelerator, model, optimizer, spec, config, progress, totals, run_dir)
        if accelerator.is_main_process:
            checkpoint.rotate(checkpoints_dir, config.keep_last)
        return path

    def check(totals: torch.Tensor, checkpoint_due: bool) -> None:
        """All processes agree; then maybe checkpoint, and stop on a signal or a non-finite loss."""
        stop_requested, bad_step = health.agree(accelerator, progress.global_step,
                                                model if (checkpoint_due or stop.requested) else None)
        if bad_step is not None:
            raise Diverged(f"non-finite loss or weights at step {bad_step} (epoch {progress.epoch + 1}); "
                           f"nothing after the last checkpoint was saved; lower --lr or check the data")
        if checkpoint_due or stop_requested:
            path = save(totals)
            if stop_requested:
                say(accelerator, f"stop signal received: checkpoint {path} written")
                if config.requeue and accelerator.is_main_process:
                    say(accelerator, requeue_slurm_job())
                raise Preempted(f"by {stop.signal_name or 'a signal on another process'} at step "
                                f"{progress.global_step}; checkpoint {path}; rerun with --resume auto to continue")

    show_bar = accelerator.is_main_process and (sys.stdout.isatty() if config.progress is None else config.progress)
    steps_per_epoch = train_sampler.full_length()
    curve_every = max(1, steps_per_epoch // 5)  # five train points per epoch, as the chapter plots

    def on_sync(totals: torch.Tensor, checkpoint_due: bool, bar) -> None:
        check(totals, checkpoint_due)
        if files and (bar is not None or progress.step_in_epoch % curve_every < config.sync_every):
            # The processes just synchronised, so reading this process's running sums costs no extra stall.
            loss_sum, correct, samples = totals.tolist()
            point = {"epoch": progress.epoch + progress.step_in_epoch / steps_per_epoch,
                     "global_step": progress.global_step, "train_loss": loss_sum / samples,
                     "train_acc": correct / samples}
            if bar is not None:
                bar.set_postfix(loss=f"{point['train_loss']:.3f}", acc=f"{point['train_acc']:.3f}", refresh=False)
            if progress.step_in_epoch % curve_every < config.sync_every:
                files.add_curve_point(point)

    trained_samples, train_seconds, record, confusion = 0, 0.0, {}, None
    while progress.epoch < config.epochs:
        epoch = progress.epoch
        train_sampler.start_epoch(epoch, skip_batches=progress.step_in_epoch)
        totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, correct, samples
        if restored and accelerator.is_main_process:
            totals += torch.tensor(restored.partial_totals, dtype=torch.float64, device=accelerator.device)
        restored = None
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(accelerator.device)
        bar = tqdm(total=steps_per_epoch, initial=progress.step_in_epoch, desc=f"train epoch {epoch + 1}/{config.epochs}",
                   unit="batch", file=sys.stdout, leave=False, dynamic_ncols=True) if show_bar else None
        started = time.perf_counter()
        train_steps(accelerator, model, optimizer, train_loader, config, channels_last, progress, totals, health,
                    on_sync=lambda due: on_sync(totals, due, bar), bar=bar)
        if bar is not None:
            bar.close()
        loss_sum, correct, samples = accelerator.reduce(totals.clone(), reduction="sum").tolist()
        seconds = time.perf_counter() - started  # `.tolist()` above waited for the device
        check(totals, checkpoint_due=False)  # a non-finite end of epoch is never evaluated or saved
        started = time.perf_counter()
        confusion = evaluate(accelerator, model, test_loader, spec.image_size, spec.num_classes, channels_last)
        test_acc, test_samples = accuracy(confusion)
        eval_seconds = time.perf_counter() - started
        epoch_samples = len(train_sampler) * config.batch_size
        trained_samples += epoch_samples
        train_seconds += seconds
        record = {"epoch": epoch + 1, "train_loss": loss_sum / samples, "train_acc": correct / samples,
                  "train_samples": int(samples), "test_acc": test_acc, "test_samples": test_samples,
                  "examples_per_sec": epoch_samples / seconds, "seconds": seconds, "eval_seconds": eval_seconds,
                  "global_step": progress.global_step,
                  # Per epoch, so a leak shows as growth from one line to the next.
                  "peak_memory_bytes": (torch.cuda.max_memory_allocated(accelerator.device)
                                        if accelerator.device.type == "cuda" else None)}
        say(accelerator, f"epoch {epoch + 1}/{config.epochs}: loss {record['train_loss']:.3f}, "
                          f"train acc {record['train_acc']:.3f}, test acc {test_acc:.3f}, "
                          f"{record['examples_per_sec']:.1f} examples/sec")
        if files:
            files.add_epoch(record)
        accelerator.log({"train/loss": record["train_loss"], "train/acc": record["train_acc"],
                         "test/acc": test_acc, "perf/examples_per_sec": record["examples_per_sec"]}, step=epoch + 1)
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        is_best = progress.best_test_acc is None or test_acc > progress.best_test_acc
        if is_best:
            progress.best_test_acc = test_acc
        if config.checkpoint_epochs:
            path = save(torch.zeros_like(totals))
            if is_best and accelerator.is_main_process:
                checkpoint.mark_best(checkpoints_dir, path, test_acc)

    if not record and files:  # resumed a run that had already finished
        record = files.last_epoch()

    identical = weights_agree(accelerator, model)
    if not identical:
        say(accelerator, f"warning: the {accelerator.num_processes} processes ended with different weights; "
                          f"rank 0's are saved")
    if accelerator.is_main_process:
        weights = plain_state_dict(accelerator, model)
        artifacts.save_weights(run_dir / artifacts.WEIGHTS_NAME, weights, spec)
        run_info["final_metrics"] = record
        run_info["weights_identical_across_ranks"] = identical
        artifacts.write_json(run_dir / artifacts.CONFIG_NAME, run_info)
        if confusion is not None:
            files.write_report(confusion.tolist(), list(data.class_names))
    if record:
        say(accelerator, f"loss {record['train_loss']:.3f}, train acc {record['train_acc']:.3f}, "
                          f"test acc {record['test_acc']:.3f}")
    if train_seconds:
        say(accelerator, f"{trained_samples / train_seconds:.1f} examples/sec on {accelerator.device} "
                          f"({accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def start_trackers(accelerator: Accelerator, config: TrainConfig, run_dir: Path) -> None:
    """TensorBoard / W&B through Accelerate, logging into the run directory."""
    if config.report_to == "none":
        return
    accelerator.project_configuration.logging_dir = str(run_dir / "tensorboard")
    # TensorBoard's hparams take numbers, strings and booleans only.
    flags = {name: (value if isinstance(value, (int, float, str, bool)) else str(value))
             for name, value in config.to_dict().items()}
    accelerator.init_trackers("vgg_dist", config=flags, init_kwargs={"wandb": {"name": run_dir.name, "dir": str(run_dir)}})


def cli() -> None:
    """Console script `vgg-dist-train`: the same as `python vgg_dist/train.py`."""
    exit_process(main())


def exit_process(code: int) -> None:
    """Exit with `code`. After a coordinated stop in a multi-process job every rank gets here at once;
    torchrun SIGTERMs the ranks still alive when it sees the first one leave, so skip the interpreter's
    teardown (which restores default signal handlers) and leave with our code straight away."""
    if code != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
