"""BatchNorm statistics over the GLOBAL batch, so 1 and N processes take the same steps with --batch-norm.

On GPUs this is PyTorch's SyncBatchNorm. PyTorch's version refuses CPU tensors, so CPU process groups
(gloo) get `GlobalBatchNorm2d`: the same arithmetic written with differentiable all-reduces.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over all processes, differentiable: every process's output depends on every process's input,
    so the gradient of an input is the sum of the output gradients on all processes. (PyTorch's own
    differentiable collectives moved between modules across versions; this is the whole of it.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        total = gradient.clone()
        dist.all_reduce(total)
        return total


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics (mean, variance, running averages) cover every process's
    rows; gradients flow through the all-reduces, as they do through SyncBatchNorm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        values = x.float()
        local_count = torch.tensor([values.numel() // values.shape[1]], dtype=torch.float64, device=x.device)
        count = _all_reduce(local_count).detach().float()
        mean = _all_reduce(values.sum(dim=(0, 2, 3))) / count
        centred = values - mean[None, :, None, None]
        variance = _all_reduce(centred.square().sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                unbiased = variance * count / (count - 1).clamp(min=1)
                # momentum None means a cumulative average, as in BatchNorm2d.
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(unbiased.detach(), factor)
        normalised = centred * torch.rsqrt(variance + self.eps)[None, :, None, None]
        if self.affine:
            normalised = normalised * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return normalised.to(x.dtype)


def synchronise(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with every BatchNorm2d computing its statistics over all processes (same parameter and
    buffer names, so checkpoints and saved weights are unchanged)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement)
        else:
            synchronise(child, device)
    return model
