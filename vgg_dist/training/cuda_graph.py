"""--cuda-graphs: a training step's device work, recorded once as a CUDA graph and replayed for every batch.

At 32x32 the `fast` recipe's model does a few hundred microseconds of GPU work per step, while an eager
step launches hundreds of kernels one by one from Python, so the GPU mostly waits for the host. A graph
launches them all at once. What changes from one step to the next reaches the graph through tensors it
reads in place: the batch, its labels, the augmentation's random numbers and the learning rate. Dropout
draws from PyTorch's default CUDA generator, which a replay advances by itself.

Nothing here knows what a step does: `update(images, labels, draws) -> (loss, logits, ...)` is the trainer's.
It must not wait for the host, and must set the gradients to None before its backward, so that the
recorded backward writes them afresh (into the graph's own memory) on every replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

Update = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None], tuple[torch.Tensor, ...]]

# Eager steps before recording: cuDNN picks its algorithms, torch.compile compiles, the optimizer creates its
# momentum buffers and the allocator settles, none of which may happen inside a recording.
EAGER_STEPS = 3


def record_cuda_graph(step: Callable[[], None]) -> Callable[[], None]:
    """Record `step`'s kernels (without running them) and return what replays them."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread (a DataLoader's pinning thread, a tracker) may use CUDA meanwhile.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        step()
    return graph.replay


class GraphedUpdate:
    """Calls `update` like `update(images, labels, draws)`: eagerly for the first EAGER_STEPS calls, then
    by replaying one recording of it. Every call is a real training step; the loss and logits returned
    after recording are the same tensors every time, overwritten by each replay.

    `record` is `record_cuda_graph`; the tests give one that replays by calling `step` again, which runs
    the very same code on a CPU.
    """

    def __init__(self, update: Update, optimizer: torch.optim.Optimizer, device: torch.device,
                 record: Callable[[Callable[[], None]], Callable[[], None]] = record_cuda_graph):
        self.update, self.optimizer, self.device, self.record = update, optimizer, device, record
        self.eager_steps_left = EAGER_STEPS
        self.replay: Callable[[], None] | None = None
        # The optimizer reads its learning rates from here inside the recording (float32, as fused SGD wants):
        # one per parameter group, since --feature-lr-scale gives the convolutions' groups their own.
        self.lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in optimizer.param_groups]
        self.inputs: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None] | None = None
        self.outputs: tuple[torch.Tensor, ...] | None = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 draws: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        if self.eager_steps_left:
            self.eager_steps_left -= 1
            outputs = self._eager(images, labels, draws)
            self.outputs = tuple(torch.empty_like(output) for output in outputs)
            return outputs
        if self.replay is None:
            self.inputs = (images.clone(), labels.clone(),
                           None if draws is None else {name: values.clone() for name, values in draws.items()})
            self.replay = self.record(self._recorded_step)
        else:
            static_images, static_labels, static_draws = self.inputs
            static_images.copy_(images, non_blocking=True)
            static_labels.copy_(labels, non_blocking=True)
            for name, values in (draws or {}).items():
                static_draws[name].copy_(values, non_blocking=True)
        for lr, group in zip(self.lrs, self.optimizer.param_groups):  # set_learning_rate's per-group values
            lr.fill_(group["lr"])
        self.replay()
        return self.outputs

    def _recorded_step(self) -> None:
        with learning_rate_from(self.optimizer, self.lrs):
            outputs = self.update(*self.inputs)
        for static, output in zip(self.outputs, outputs):
            static.copy_(output)

    def _eager(self, images, labels, draws) -> tuple[torch.Tensor, ...]:
        if self.device.type != "cuda":
            return self.update(images, labels, draws)
        # On a side stream, as PyTorch's CUDA graph notes ask of the steps before a recording.
        current, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            outputs = self.update(images, labels, draws)
        current.wait_stream(side)
        return outputs


@contextlib.contextmanager
def learning_rate_from(optimizer: torch.optim.Optimizer, lrs: list[torch.Tensor]) -> Iterator[None]:
    """Inside the block each parameter group reads its learning rate from its tensor in `lrs`, so a recorded
    step reads them at every replay; outside it the groups hold plain numbers again (for checkpoints)."""
    saved = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    try:
        yield
    finally:
        for group, value in zip(optimizer.param_groups, saved):
            group["lr"] = value
