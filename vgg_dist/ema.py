"""An exponential moving average of a model's weights, evaluated and saved in place of the raw weights.

After optimizer step t (1-based) every parameter moves as

    ema = d_t * ema + (1 - d_t) * weight,   d_t = min(decay, (1 + t) / (10 + t))

The warm-up term (TensorFlow's `num_updates` rule) keeps the first, random weights from dominating
a short run. Buffers (BatchNorm's running statistics) are copied, not averaged.
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
        """Fold in the weights as they are after optimizer step `step` (1-based)."""
        # The tensors are looked up on every update: wrapping the model for DDP may replace its buffers.
        torch._foreach_lerp_(list(self.module.parameters()), list(self.source.parameters()),
                             1.0 - self.decay_at(step))
        buffers = list(self.module.buffers())
        if buffers:  # BatchNorm's statistics; a model without BatchNorm has none
            torch._foreach_copy_(buffers, list(self.source.buffers()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
