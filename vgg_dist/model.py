"""VGG as built in d2l's VGG chapter, for grey or colour images. Plain PyTorch, no distributed code.

Print the chapter's per-block shape table for any configuration:

    python -m vgg_dist.model --arch vgg11 --width-divisor 1 --image-size 224
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from vgg_dist.cli import FlagParser, flag
from vgg_dist.errors import UsageError, exit_process, exits_cleanly_on_stop
from vgg_dist.fields import from_dict

# (number of 3x3 convs, output channels) per block; each block ends in a 2x2 max-pool.
# vgg11 is the chapter's conv_arch; the others are Simonyan & Zisserman's configurations B, D and E.
ARCHITECTURES: dict[str, tuple[tuple[int, int], ...]] = {
    "vgg11": ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)),
    "vgg13": ((2, 64), (2, 128), (2, 256), (2, 512), (2, 512)),
    "vgg16": ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)),
    "vgg19": ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512)),
}

# Five 2x2 pools halve the image five times, so the flatten size is channels * (size/32)^2.
SIZE_STEP = 2 ** 5


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that decides the model's parameter shapes and forward pass."""

    arch: str = "vgg11"
    width_divisor: int = 4  # the chapter's `ratio`: conv channels are divided by it
    batch_norm: bool = False
    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 224
    hidden_size: int = 4096  # width of the two hidden fully connected layers
    dropout: float = 0.5
    # Per-channel mean and std (0-1 scale) the input is standardised with before the first convolution:
    # the training images' (--normalize dataset) or ImageNet's; None leaves it in [0, 1], as the chapter.
    input_mean: list[float] | None = None
    input_std: list[float] | None = None

    def problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong and what is allowed) for each reason this spec cannot build a model."""
        found = []
        if self.arch not in ARCHITECTURES:
            found.append(("arch", f"{self.arch!r} is unknown; choose one of {', '.join(ARCHITECTURES)}"))
        else:
            narrowest = min(channels for _, channels in ARCHITECTURES[self.arch])
            if not 1 <= self.width_divisor <= narrowest:
                found.append(("width_divisor", f"must be between 1 and {narrowest} for {self.arch}, "
                                               f"got {self.width_divisor}"))
        if self.image_size < SIZE_STEP or self.image_size % SIZE_STEP:
            found.append(("image_size", f"must be a multiple of {SIZE_STEP} and at least {SIZE_STEP} "
                                        f"(the model halves it five times), got {self.image_size}"))
        for name in ("in_channels", "num_classes", "hidden_size"):
            if getattr(self, name) < 1:
                found.append((name, f"must be at least 1, got {getattr(self, name)}"))
        if not 0.0 <= self.dropout < 1.0:
            found.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if (self.input_mean is None) != (self.input_std is None):
            found.append(("normalize", "needs both a mean and a std, or neither"))
        elif self.input_mean is not None:
            if not len(self.input_mean) == len(self.input_std) == self.in_channels:
                found.append(("normalize", f"needs one mean and one std per input channel ({self.in_channels})"))
            elif not all(value > 0 for value in self.input_std):
                found.append(("normalize", "needs every channel's std above 0 (a channel of one constant value "
                                           "cannot be standardised)"))
        return found

    def check(self) -> None:
        """Raise UsageError naming the flag behind the first reason this spec cannot build a model."""
        for name, message in self.problems():
            raise UsageError(f"{flag(name)} {message}")

    @property
    def conv_arch(self) -> tuple[tuple[int, int], ...]:
        return tuple((convs, channels // self.width_divisor) for convs, channels in ARCHITECTURES[self.arch])

    def parameter_count(self) -> int:
        """Parameters of the model this spec builds, counted without building it (a typo such as
        --hidden-size 1000000000000 must not allocate anything)."""
        count, in_channels = 0, self.in_channels
        for num_convs, out_channels in self.conv_arch:
            for _ in range(num_convs):
                # 3x3 kernel; then either a conv bias or BatchNorm's scale and shift (and no conv bias)
                count += 9 * in_channels * out_channels + out_channels * (2 if self.batch_norm else 1)
                in_channels = out_channels
        flat = in_channels * (self.image_size // SIZE_STEP) ** 2
        hidden = self.hidden_size
        return count + (flat + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * self.num_classes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values, path: str = "model") -> ModelSpec:
        """A spec read back from JSON; FieldError (a ValueError) for unknown fields or wrong types."""
        return from_dict(cls, values, path)


class MaxPool2x2(nn.Module):
    """nn.MaxPool2d(2) written as a reshape and a max over each 2x2 window, for torch.compile.

    The compiler fuses it with the ReLU before it (and both backwards) into one pass over the largest
    activations, where MaxPool2d stays a separate kernel. The forward output is identical to
    MaxPool2d's. Gradients are too wherever a window has one maximum; in a window of tied maxima
    (a flat background) MaxPool2d sends the whole gradient to the first one and this splits it evenly,
    which is an equally valid gradient of the same function.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if x.is_contiguous(memory_format=torch.channels_last):  # stay NHWC for the next convolution
            windows = x.permute(0, 2, 3, 1).reshape(batch, height // 2, 2, width // 2, 2, channels)
            return windows.amax(dim=(2, 4)).permute(0, 3, 1, 2)
        return x.reshape(batch, channels, height // 2, 2, width // 2, 2).amax(dim=(3, 5))


def vgg_block(num_convs: int, in_channels: int, out_channels: int, batch_norm: bool = False,
              fusable_pool: bool = False) -> nn.Sequential:
    """`num_convs` 3x3 same-padding convolutions with ReLU, then a 2x2 max-pool that halves the image."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        # A conv followed by BatchNorm needs no bias: BatchNorm's shift replaces it.
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        in_channels = out_channels
    layers.append(MaxPool2x2() if fusable_pool else nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def build_model(spec: ModelSpec, fusable_pool: bool = False) -> nn.Sequential:
    """The chapter's `vgg(conv_arch)`: conv blocks, then three fully connected layers, Xavier-initialised.

    A flat Sequential like the chapter's, so its parameter names (`0.0.weight`, ... `11.bias`) and the
    shape table below match the book.
    """
    problems = spec.problems()
    if problems:
        raise ValueError("; ".join(f"{name} {message}" for name, message in problems))
    blocks = []
    in_channels = spec.in_channels
    for num_convs, out_channels in spec.conv_arch:
        blocks.append(vgg_block(num_convs, in_channels, out_channels, spec.batch_norm, fusable_pool))
        in_channels = out_channels
    side = spec.image_size // SIZE_STEP
    model = nn.Sequential(
        *blocks,
        nn.Flatten(),
        nn.Linear(in_channels * side * side, spec.hidden_size), nn.ReLU(), nn.Dropout(spec.dropout),
        nn.Linear(spec.hidden_size, spec.hidden_size), nn.ReLU(), nn.Dropout(spec.dropout),
        nn.Linear(spec.hidden_size, spec.num_classes),
    )
    model.apply(_xavier_init)
    return model


def feature_layers(model: nn.Sequential) -> nn.Sequential:
    """The convolutional blocks of a model `build_model` made (everything before the Flatten), sharing its
    modules: what --freeze-features freezes and --feature-lr-scale scales."""
    flatten = next(index for index, layer in enumerate(model) if isinstance(layer, nn.Flatten))
    return model[:flatten]


def _xavier_init(module: nn.Module) -> None:
    # As the chapter: Xavier-uniform weights for conv and linear layers, PyTorch's default biases.
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(module.weight)


def log_probabilities(model: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Class log-probabilities [N, classes] for a batch the model takes; with `tta`, those of the mean
    of the probabilities for each image and its mirror image (flip test-time augmentation)."""
    result = torch.log_softmax(model(x).float(), dim=1)
    if tta:
        mirrored = torch.log_softmax(model(x.flip(-1)).float(), dim=1)
        result = torch.logsumexp(torch.stack([result, mirrored]), dim=0) - math.log(2)
    return result


def shape_table(model: nn.Sequential, spec: ModelSpec) -> list[tuple[str, list[int]]]:
    """(layer class name, output shape) for each top-level layer on one blank image, as the chapter prints."""
    x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
    rows = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            rows.append((type(layer).__name__, list(x.shape)))
    model.train(was_training)
    return rows


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@exits_cleanly_on_stop
def main(argv: list[str] | None = None) -> int:
    defaults = ModelSpec()
    parser = FlagParser(prog="python -m vgg_dist.model", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=defaults.arch, choices=sorted(ARCHITECTURES), help="VGG depth")
    parser.add_argument("--width-divisor", type=int, default=defaults.width_divisor,
                        help="divide every conv's channel count by this (the chapter's ratio)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="input side, a multiple of 32")
    parser.add_argument("--batch-norm", action="store_true", help="BatchNorm after every conv")
    parser.add_argument("--in-channels", type=int, default=defaults.in_channels, help="image channels")
    parser.add_argument("--num-classes", type=int, default=defaults.num_classes, help="classifier outputs")
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size,
                        help="width of the two hidden fully connected layers")
    args = parser.parse_args(argv)
    spec = ModelSpec(arch=args.arch, width_divisor=args.width_divisor, batch_norm=args.batch_norm,
                     in_channels=args.in_channels, num_classes=args.num_classes, image_size=args.image_size,
                     hidden_size=args.hidden_size)
    spec.check()
    model = build_model(spec)
    for name, shape in shape_table(model, spec):
        print(f"{name} output shape:\t {shape}")
    print(f"{count_parameters(model):,} parameters")
    return 0


if __name__ == "__main__":
    exit_process(main())
