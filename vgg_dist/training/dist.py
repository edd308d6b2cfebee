"""What every vgg_dist command asks of Accelerate: the Accelerator, the process layout, printing once
per job, data loaders, the exact distributed evaluation, and the collectives the trainer agrees with.

Training, evaluation and the benchmark share these, so each runs the same way on one CPU process,
one GPU, or many processes on many nodes. Nothing here knows about checkpoints or run directories.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import (AutocastKwargs, DDPCommunicationHookType, DistributedDataParallelKwargs,
                               InitProcessGroupKwargs, ProjectConfiguration, broadcast_object_list, gather_object)

from vgg_dist.data.batches import BatchIndexedTensors, keep_batch, to_model_input
from vgg_dist.data.sources import Split
from vgg_dist.errors import UsageError
from vgg_dist.model import ModelSpec, log_probabilities

TRACKERS = {"none": None, "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}
NO_STEP = 2 ** 62  # "no step yet" in step-number collectives, where the minimum over processes is taken


def make_accelerator(dist_timeout: int = 600, report_to: str = "none", ddp_bf16_grads: bool = False,
                     cuda_graphs: bool = False, grad_accum_steps: int = 1) -> Accelerator:
    """An Accelerator whose dataloaders take GLOBAL batches and split them across processes.

    Without a GPU it is built with cpu=True: that is what turns `accelerate launch --multi_gpu
    --num_processes N` into one N-process gloo job instead of N independent runs. `dist_timeout`
    bounds every collective, so a dead rank fails the job instead of hanging it for gloo's 30 minutes.
    DDP keeps gradients as views into its all-reduce buckets (no extra copy of the 42M-parameter
    classifier's gradients) and treats the graph as static (the same parameters every step), except
    with gradient accumulation: a static graph's reducer fails (an internal assert) on a backward under
    `no_sync`, which every micro-batch but a step's last runs.
    With `cuda_graphs`, autocast keeps no cache of cast weights, which a CUDA graph recording may not use.
    """
    ddp = DistributedDataParallelKwargs(
        gradient_as_bucket_view=True, static_graph=grad_accum_steps == 1,
        comm_hook=DDPCommunicationHookType.BF16 if ddp_bf16_grads else DDPCommunicationHookType.NO)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        # non_blocking: batches come from pinned memory, so the copy to the GPU need not wait for the
        # previous step's kernels, which a blocking copy on the same stream would.
        dataloader_config=DataLoaderConfiguration(split_batches=True, even_batches=True, non_blocking=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=dist_timeout)), ddp,
                         *([AutocastKwargs(cache_enabled=False)] if cuda_graphs else [])],
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


def on_main(accelerator: Accelerator, work: Callable[[], object]) -> object:
    """Run `work` on the main process and hand its result, or its UsageError, to every process, so that a
    refusal ends every rank in the same way instead of leaving the others waiting in a collective."""
    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("done", work())]
        except UsageError as error:
            outcome = [("refused", str(error))]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind == "refused":
        raise UsageError(value)
    return value


def check_layout(accelerator: Accelerator, batch_size: int, grad_accum_steps: int = 1) -> None:
    processes = accelerator.num_processes
    if grad_accum_steps > 1 and batch_size % (processes * grad_accum_steps):
        raise UsageError(f"--batch-size {batch_size} does not split over {processes} processes x --grad-accum-steps "
                         f"{grad_accum_steps} micro-batches; use a multiple of {processes * grad_accum_steps}")
    if batch_size % processes:
        raise UsageError(f"--batch-size {batch_size} does not split evenly over {processes} processes; "
                         f"use a multiple of {processes}")


def gather_layout(accelerator: Accelerator) -> list[dict]:
    """Where every rank runs: host, node rank, local rank, device; collected on all processes."""
    here = {"rank": accelerator.process_index, "host": socket.gethostname(),
            "node": int(os.environ.get("GROUP_RANK", 0)), "local_rank": accelerator.local_process_index,
            "device": device_label(accelerator.device)}
    return gather_object([here]) if accelerator.num_processes > 1 else [here]


def device_label(device: torch.device) -> str:
    """A device as the run header lists it: a CPU has no index that tells processes apart, so CPU ranks are
    plain "cpu", and a repeated "cuda:0" then always means a misconfigured GPU job."""
    return "cpu" if device.type == "cpu" else str(device)


def node_count(layout: list[dict]) -> int:
    return len({entry["node"] for entry in layout})


def make_loader(split: Split, batch_sampler, device: torch.device) -> torch.utils.data.DataLoader:
    """A loader over in-memory tensors that answers each batch with one index operation.

    The whole dataset is a few tensors in memory, so worker processes would only add inter-process
    copies. The loader's own generator keeps it from drawing on the global RNG, whose stream (dropout)
    a resumed run must continue exactly.
    """
    return torch.utils.data.DataLoader(BatchIndexedTensors(split), batch_sampler=batch_sampler, collate_fn=keep_batch,
                                       pin_memory=device.type == "cuda",  # for non-blocking copies
                                       generator=torch.Generator())


def evaluate(accelerator: Accelerator, model, loader, spec: ModelSpec, channels_last: bool = False,
             tta: bool = False) -> tuple[list[list[int]], float]:
    """(confusion matrix [true][predicted], mean cross-entropy) over every image the loader holds (the
    test or the validation set), on every process.

    `gather_for_metrics` drops the samples Accelerate repeats to even out the last batch, so each test
    image counts exactly once whatever the number of processes. With `tta` the prediction is the mean
    of the class probabilities for the image and for its mirror image.
    """
    num_classes = spec.num_classes
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=accelerator.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    # The model may be one Accelerate did not prepare (an EMA copy): give it the run's autocast too.
    with torch.no_grad(), accelerator.autocast():
        for images, labels in loader:
            scores = log_probabilities(model, to_model_input(images, spec.image_size, channels_last, spec.input_mean, spec.input_std), tta)
            losses = F.nll_loss(scores, labels, reduction="none")
            predictions = scores.argmax(dim=1)
            predictions, labels, losses = accelerator.gather_for_metrics((predictions, labels, losses))
            confusion += torch.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
            loss_sum += losses.double().sum()
    matrix = confusion.view(num_classes, num_classes).tolist()
    count = sum(map(sum, matrix))
    return matrix, (float(loss_sum) / count if count else 0.0)


def unwrapped_state_dict(accelerator: Accelerator, model) -> dict[str, torch.Tensor]:
    """The weights under the bare model's names (`0.0.weight`), whatever wraps it: DDP, autocast,
    torch.compile (whose `_orig_mod.` prefix Accelerate keeps unless told otherwise)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()


@dataclasses.dataclass
class Agreement:
    """What every process learns when they agree: whether any was asked to stop, the earliest step with a
    non-finite loss on any (None if none), and the epoch's running sums of the whole global batch."""

    stop: bool
    bad_step: int | None
    sums: list[float]  # loss sum, correct predictions, samples


def agree(accelerator: Accelerator, stop_requested: bool, first_bad_step: torch.Tensor,
          sums: torch.Tensor) -> Agreement:
    """One small collective. `first_bad_step` is an int64 device scalar holding NO_STEP when this process saw
    nothing wrong (steps are far below 2**53, so float64 carries them exactly); `sums` this process's three."""
    local = torch.cat([torch.stack([torch.tensor(float(stop_requested), dtype=torch.float64, device=sums.device),
                                    first_bad_step.to(torch.float64)]), sums.to(torch.float64)])
    every = accelerator.gather(local.unsqueeze(0)).view(-1, 5).cpu()
    first_bad = int(every[:, 1].min())
    return Agreement(bool(every[:, 0].max()), None if first_bad == NO_STEP else first_bad, every[:, 2:].sum(0).tolist())


def weights_agree(accelerator: Accelerator, model) -> bool:
    """Whether every rank holds the same weights (DDP keeps them in step; this checks it did)."""
    if accelerator.num_processes == 1:
        return True
    with torch.no_grad():
        fingerprint = torch.stack([p.double().sum() for p in model.parameters()]
                                  + [p.double().abs().sum() for p in model.parameters()])
    every = accelerator.gather(fingerprint.unsqueeze(0))
    return bool((every == every[0]).all())


def finish(accelerator: Accelerator) -> None:
    """Leave the process group together: no process tears down gloo while another still uses it."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
