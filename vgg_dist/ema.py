"""An exponential moving average of a model's weights, evaluated and saved in place of the raw weights.

After optimizer step t (1-based) every parameter, and every floating-point buffer (BatchNorm's
running mean and variance), moves as

    ema = d_t * ema + (1 - d_t) * value,   d_t = min(decay, (1 + t) / (10 + t))

The warm-up term (TensorFlow's `num_updates` rule) keeps the first, random weights from dominating
a short run. BatchNorm's statistics are averaged with the weights they normalise, as torchvision's
reference scripts (use_buffers=True) and timm do: copying the raw model's statistics instead pairs the
averaged weights with another model's statistics, which cost 0.010 validation accuracy on Fashion-MNIST
(README, Recipes). Integer buffers (BatchNorm's batch count) are copied.
"""

from __future__ import annotations

import copy

import torch


class ModelEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        """`model` is the bare module being trained (not wrapped by DDP or torch.compile)."""
        self.decay = decay
        self.source = model
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights and statistics as they are after optimizer step `step` (1-based)."""
        # Looked up on every update: wrapping the model for DDP may replace its buffers.
        averaged, copied = [], []
        for mine, source in zip([*self.module.parameters(), *self.module.buffers()],
                                [*self.source.parameters(), *self.source.buffers()]):
            (averaged if mine.is_floating_point() else copied).append((mine, source))
        torch._foreach_lerp_([mine for mine, _ in averaged], [source for _, source in averaged],
                             1.0 - self.decay_at(step))
        if copied:
            torch._foreach_copy_([mine for mine, _ in copied], [source for _, source in copied])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
