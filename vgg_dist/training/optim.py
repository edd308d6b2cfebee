"""SGD and AdamW as torchvision's and timm's reference scripts set them up, the learning rate at every step, and an
exponential moving average (EMA) of the weights.

The learning rate is a pure function of the global step (nanoGPT's `get_lr`), so a resumed run
continues the same curve from its saved step: there is no scheduler object whose state could drift.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from vgg_dist.fields import short
from vgg_dist.model import feature_layers

SCHEDULES = ("constant", "cosine", "onecycle")
OPTIMIZERS = ("sgd", "adamw")


def parameter_groups(model: torch.nn.Module, weight_decay: float, feature_lr_scale: float = 1.0) -> list[dict]:
    """The model's trainable parameters, with weight decay only on weights, none on biases or BatchNorm
    (one-dimensional parameters), as the reference recipes do for SGD and AdamW alike.

    With a `feature_lr_scale` other than 1 the convolutional blocks get groups of their own, whose
    "lr_scale" `set_learning_rate` multiplies the schedule's rate by. At 1 the groups are exactly those of
    runs from before the option, so their checkpoints' optimizer state still lines up parameter by parameter."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if feature_lr_scale == 1.0:
        return _decay_groups(trainable, weight_decay)
    in_features = {id(parameter) for parameter in feature_layers(model).parameters()}
    features = [parameter for parameter in trainable if id(parameter) in in_features]
    classifier = [parameter for parameter in trainable if id(parameter) not in in_features]
    return [{**group, "lr_scale": scale}
            for parameters, scale in ((features, feature_lr_scale), (classifier, 1.0)) if parameters
            for group in _decay_groups(parameters, weight_decay)]


def _decay_groups(parameters: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    if not weight_decay:
        return [{"params": parameters}]
    return [{"params": [p for p in parameters if p.dim() > 1], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.dim() <= 1], "weight_decay": 0.0}]


def _groups(model: torch.nn.Module | list[dict], weight_decay: float) -> list[dict]:
    """A model's `parameter_groups`, or groups already made (with a feature learning-rate scale)."""
    return model if isinstance(model, list) else parameter_groups(model, weight_decay)


def make_sgd(model: torch.nn.Module | list[dict], lr: float, momentum: float, nesterov: bool, weight_decay: float,
             fused: bool) -> torch.optim.SGD:
    """SGD over the model's parameters (or over `parameter_groups` already made), weight decay as an L2 term
    in the gradient. `fused`: one kernel for the whole update on a GPU instead of one per parameter."""
    return torch.optim.SGD(_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov,
                           **({"fused": True} if fused else {"foreach": True}))


def make_adamw(model: torch.nn.Module | list[dict], lr: float, betas: tuple[float, float], weight_decay: float,
               fused: bool) -> torch.optim.AdamW:
    """AdamW (Loshchilov and Hutter) over the model's parameters (or `parameter_groups` already made):
    weight decay decoupled from the gradient's moments, each step multiplying the weights by
    1 - lr x weight_decay, as PyTorch's AdamW and timm define it; none on biases or BatchNorm."""
    return torch.optim.AdamW(_groups(model, weight_decay), lr=lr, betas=betas, weight_decay=weight_decay,
                             **({"fused": True} if fused else {"foreach": True}))


# The settings of a parameter group that its flags fix (the learning rate follows the schedule instead, and
# foreach/fused only choose an implementation, which may differ between machines).
HYPERPARAMETERS = ("momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "amsgrad", "maximize",
                   "lr_scale")


def check_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer) -> None:
    """A state dict read back from a file has this optimizer's groups and per-parameter tensor shapes;
    ValueError otherwise (torch's own load_state_dict checks the group sizes, not the tensors)."""
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"} or not isinstance(saved["state"], dict):
        raise ValueError("expected 'state' and 'param_groups'")
    groups, own_groups = saved["param_groups"], optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or [g.get("params") if isinstance(g, dict) else None for g in groups] != \
            [group["params"] for group in own_groups]:
        raise ValueError("parameter groups differ")
    for index, (group, own) in enumerate(zip(groups, own_groups)):
        changed = next((key for key in HYPERPARAMETERS if key in own and group.get(key) != own[key]), None)
        if changed is not None:
            raise ValueError(f"group {index} has {changed} {short(group.get(changed))}, this run {short(own[changed])}")
    shapes = dict(enumerate(p.shape for group in optimizer.param_groups for p in group["params"]))
    for index, entry in saved["state"].items():
        if index not in shapes or not isinstance(entry, dict):
            raise ValueError(f"state for unknown parameter {short(index)}")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shapes[index]:
                raise ValueError(f"{name} of parameter {index} has shape {list(value.shape)}, the parameter "
                                 f"{list(shapes[index])}")


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """The learning rate of each optimizer step.

    constant   `peak` throughout (the chapter)
    cosine     from `peak` down to 0 along half a cosine
    onecycle   from `peak` straight down to 0 (Smith's one-cycle, its rising half being the warm-up)
    Any of them may start with `warmup_steps` of linear rise from 0 to `peak`.
    """

    kind: str
    peak: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        """The learning rate for the step with 0-based index `step`."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.peak
        done = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        if self.kind == "cosine":
            return self.peak * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
        return self.peak * max(0.0, 1.0 - done)

    def describe(self) -> dict:
        """What fixes the curve, for checkpoints: a resumed run must follow the same one. A constant
        rate does not depend on the run's length, so `total_steps` is left out for it."""
        described = dataclasses.asdict(self)
        if self.kind == "constant":
            del described["total_steps"]
        return described


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's `lr` times each group's "lr_scale" (--feature-lr-scale; groups without one, as in
    checkpoints from before it, are at 1). Plain Python numbers: with --cuda-graphs, GraphedUpdate copies
    each group's value into the tensor its recording reads, so nothing here runs inside a capture."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class ModelEMA:
    """An exponential moving average of a model's weights, evaluated and saved in place of the raw weights.

    After optimizer step t (1-based) every parameter, and every floating-point buffer (BatchNorm's
    running mean and variance), moves as

        ema = d_t * ema + (1 - d_t) * value,   d_t = min(decay, (1 + t) / (10 + t))

    The warm-up term (TensorFlow's `num_updates` rule) keeps the first, random weights from dominating
    a short run. BatchNorm's statistics are averaged with the weights they normalise, as torchvision's
    reference scripts (use_buffers=True) and timm do: copying the raw model's statistics instead pairs the
    averaged weights with another model's statistics, which cost 0.010 validation accuracy on Fashion-MNIST
    (docs/recipes.md). Integer buffers (BatchNorm's batch count) are copied.
    """

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
