"""Start training from torchvision's ImageNet VGG weights: `--pretrained` (torchvision's weights API) or
`--pretrained PATH` (a torchvision state dict saved as .pth or .safetensors).

torchvision's VGG and vgg_dist's compute the same function once the weights are mapped (docs/pretrained.md):
- names: torchvision's `features.N` / `classifier.N` become vgg_dist's `block.layer` / top-level indices;
- torchvision's convolutions keep a bias before BatchNorm, vgg_dist's do not: the bias moves into
  BatchNorm's running mean, which gives the same output in evaluation and the same in training
  (batch statistics cancel a constant shift);
- torchvision pools the last feature map to 7x7 (AdaptiveAvgPool2d) before the classifier, vgg_dist does
  not: the pooling is linear, so it is folded into the first classifier layer's weights. At 224x224 the
  map is 7x7 already and the weights are unchanged; at any other size the result is exactly torchvision's;
- a 1-channel dataset gets the first convolution summed over RGB (a grey image is R = G = B);
- the last layer stays freshly initialised for the dataset's classes.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vgg_dist.errors import UsageError
from vgg_dist.model import SIZE_STEP, ModelSpec

TORCHVISION = "torchvision"  # the value of a bare --pretrained: torchvision's own weights API
POOLED_SIDE = 7               # torchvision's AdaptiveAvgPool2d((7, 7))
TORCHVISION_HIDDEN = 4096
# The per-channel statistics torchvision's ImageNet weights were trained with (its transforms' Normalize).
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
BATCH_NORM_KEYS = ("weight", "bias", "running_mean", "running_var")


def torchvision_name(spec: ModelSpec) -> str:
    return f"{spec.arch}_bn" if spec.batch_norm else spec.arch


def check_pretrainable(spec: ModelSpec) -> None:
    """Only torchvision's shapes can take its weights: full width, 4096-wide classifier, grey or RGB input."""
    if spec.width_divisor != 1:
        raise UsageError(f"--pretrained needs --width-divisor 1 (torchvision's channel counts), got "
                         f"{spec.width_divisor}")
    if spec.hidden_size != TORCHVISION_HIDDEN:
        raise UsageError(f"--pretrained needs --hidden-size {TORCHVISION_HIDDEN} (torchvision's classifier), got "
                         f"{spec.hidden_size}")
    if spec.in_channels not in (1, 3):
        raise UsageError(f"--pretrained maps RGB weights onto 1- or 3-channel images; this data has "
                         f"{spec.in_channels} channels")


def imagenet_statistics(channels: int) -> tuple[list[float], list[float]]:
    """ImageNet's mean and std for `channels` 3, or for a grey image (1) the average of the three: its one
    channel feeds the first convolution summed over RGB, as if R = G = B."""
    if channels == 1:
        return [round(sum(IMAGENET_MEAN) / 3, 6)], [round(sum(IMAGENET_STD) / 3, 6)]
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def layer_names(spec: ModelSpec) -> list[tuple[str, str, str]]:
    """(torchvision module, vgg_dist module, kind) for every layer with weights, in forward order; the
    last classifier layer is left out (it is re-initialised)."""
    pairs, index = [], 0
    for block, (num_convs, _) in enumerate(spec.conv_arch):
        inner = 0
        for _ in range(num_convs):
            pairs.append((f"features.{index}", f"{block}.{inner}", "conv"))
            if spec.batch_norm:
                pairs.append((f"features.{index + 1}", f"{block}.{inner + 1}", "bn"))
            step = 3 if spec.batch_norm else 2  # conv, (bn), relu
            index, inner = index + step, inner + step
        index += 1  # the block's max-pool
    first_linear = len(spec.conv_arch) + 1  # after the blocks and the Flatten
    pairs += [("classifier.0", str(first_linear), "first_linear"), ("classifier.3", str(first_linear + 3), "linear")]
    return pairs


def expected_shapes(spec: ModelSpec) -> dict[str, list[int]]:
    """torchvision's tensor shapes for `spec`'s architecture (ImageNet: 3 channels, 7x7 pooled map)."""
    shapes, in_channels = {}, 3
    convs = iter(channels for num_convs, channels in spec.conv_arch for _ in range(num_convs))
    for source, _, kind in layer_names(spec):
        if kind == "conv":
            out_channels = next(convs)
            shapes[f"{source}.weight"] = [out_channels, in_channels, 3, 3]
            shapes[f"{source}.bias"] = [out_channels]
            in_channels = out_channels
        elif kind == "bn":
            shapes.update({f"{source}.{key}": [in_channels] for key in BATCH_NORM_KEYS})
        else:
            inputs = in_channels * POOLED_SIDE ** 2 if kind == "first_linear" else TORCHVISION_HIDDEN
            shapes[f"{source}.weight"], shapes[f"{source}.bias"] = [TORCHVISION_HIDDEN, inputs], [TORCHVISION_HIDDEN]
    return shapes


def check_fits(state: dict[str, torch.Tensor], spec: ModelSpec, origin: str) -> None:
    """One line naming the first tensor that is missing or of the wrong shape, with both shapes."""
    arch = torchvision_name(spec)
    for name, shape in expected_shapes(spec).items():
        if name not in state:
            raise UsageError(f"--pretrained {origin}: has no tensor {name} (torchvision's {arch} has it, shape "
                             f"{shape}); is it a {arch} state dict?")
        if list(state[name].shape) != shape:
            raise UsageError(f"--pretrained {origin}: tensor {name} has shape {list(state[name].shape)}, but "
                             f"torchvision's {arch} has {shape} there; is it a {arch} state dict?")
    known = set(expected_shapes(spec)) | {"classifier.6.weight", "classifier.6.bias"}
    unknown = sorted(name for name in state if name not in known and not name.endswith("num_batches_tracked"))
    if unknown:
        raise UsageError(f"--pretrained {origin}: tensor {unknown[0]} is not in torchvision's {arch} "
                         f"(of {len(unknown)} such tensors); is it a state dict of another architecture?")


def fold_pool(weight: torch.Tensor, channels: int, side: int) -> torch.Tensor:
    """The first classifier layer's weight for a `side` x `side` feature map without the adaptive pool:
    pooling is linear, so W @ pool equals a layer whose weight is W with the pool applied backwards."""
    if side == POOLED_SIDE:
        return weight
    # How each input position of the side x side map reaches each of the 7x7 pooled positions.
    basis = torch.eye(side * side, dtype=torch.float64).reshape(side * side, 1, side, side)
    pooling = F.adaptive_avg_pool2d(basis, POOLED_SIDE).reshape(side * side, POOLED_SIDE ** 2)
    grouped = weight.double().reshape(weight.shape[0], channels, POOLED_SIDE ** 2)
    return torch.einsum("ocp,sp->ocs", grouped, pooling).reshape(weight.shape[0], -1).to(weight.dtype)


def mapped_state(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """torchvision's tensors under vgg_dist's names and shapes (all but the last layer's)."""
    mapped, channels = {}, 3
    for source, target, kind in layer_names(spec):
        weight, bias = state[f"{source}.weight"].float(), state[f"{source}.bias"].float()
        if kind == "conv":
            if channels == 3 and spec.in_channels == 1 and weight.shape[1] == 3:
                weight = weight.sum(dim=1, keepdim=True)  # grey R = G = B: one channel does the three's work
            channels = weight.shape[0]
            mapped[f"{target}.weight"] = weight
            if spec.batch_norm:
                conv_bias = bias  # BatchNorm follows: its running mean absorbs the conv's bias
            else:
                mapped[f"{target}.bias"] = bias
        elif kind == "bn":
            for key in BATCH_NORM_KEYS:
                mapped[f"{target}.{key}"] = state[f"{source}.{key}"].float()
            mapped[f"{target}.running_mean"] = mapped[f"{target}.running_mean"] - conv_bias
        else:
            if kind == "first_linear":
                weight = fold_pool(weight, channels, spec.image_size // SIZE_STEP)
            mapped[f"{target}.weight"], mapped[f"{target}.bias"] = weight, bias
    return mapped


def read_state(source: str, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """A state dict from a file, or through torchvision's weights API into $TORCH_HOME."""
    if source == TORCHVISION:
        return download_state(spec)
    path = Path(source)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: no code runs from it
    except Exception as error:  # unreadable, truncated, pickled code: the same news for the user
        raise UsageError(f"--pretrained {path}: not a readable state dict "
                         f"({(str(error).strip().splitlines() or [type(error).__name__])[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UsageError(f"--pretrained {path}: holds no state dict of tensors (save `model.state_dict()`)")
    return state


def download_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    import torchvision
    name = torchvision_name(spec)
    notes = io.StringIO()  # torch.hub's "Downloading: ..." is news only if the download works
    try:
        with contextlib.redirect_stderr(notes):
            weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
            state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # no network, a proxy, a full disk: the way out is the same
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"--pretrained: torchvision's {name} ImageNet weights are not cached and could not be "
                         f"downloaded ({reason}); fetch them where there is a network and pass "
                         f"--pretrained PATH (a .pth state dict or .safetensors)") from None
    sys.stderr.write(notes.getvalue())
    return state


def load_pretrained(model: nn.Module, spec: ModelSpec, source: str, main_first=contextlib.nullcontext) -> None:
    """Copy torchvision's weights into a freshly built model; its last layer keeps its own initialisation.
    `main_first`: a context in which the main process downloads before the others read its cache."""
    check_pretrainable(spec)
    with main_first():
        state = read_state(source, spec)
    check_fits(state, spec, source)
    missing, unexpected = model.load_state_dict(mapped_state(state, spec), strict=False)
    last = str(len(model) - 1)
    left = [name for name in missing if not name.startswith(f"{last}.") and not name.endswith("num_batches_tracked")]
    if left or unexpected:  # the mapping and the model disagree: a bug here, not the user's file
        raise RuntimeError(f"pretrained mapping left {left} unset and {unexpected} unused")
