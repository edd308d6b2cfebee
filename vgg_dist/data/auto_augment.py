"""RandAugment and TrivialAugment on the training device: a whole uint8 batch at once, each image with its
own operations and magnitudes, drawn on the host from the step's generator (vgg_dist/data/augment.py).

The operations, their order, magnitude ranges and arithmetic are torchvision.transforms.v2's (RandAugment,
TrivialAugmentWide; nearest interpolation, fill 0), written for per-image parameters. Every operation
runs on the whole batch and each image keeps the result of its own (torch.where): no grouping by
operation, which would need the group sizes on the host, so that the step stays free of host
synchronisation and can be recorded as a CUDA graph. On 28x28 images the extra work is a few small
kernels per operation.

RandAugment is written as timm spells it, `rand-m9-n2`: N operations per image, each at magnitude bin M
of torchvision's 31 (0..30; timm's own scale tops at 10, so timm's m9 is a stronger setting).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from vgg_dist.errors import UsageError

# torchvision's order; shear_x .. sharpness take a random sign. color (saturation) leaves 1-channel
# images as they are, as torchvision's does.
OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
       "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
SIGNED = (OPS.index("shear_x"), OPS.index("sharpness"))  # the first and last signed operation
GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
NUM_BINS = 31
MAX_MAGNITUDE = NUM_BINS - 1
MAX_NUM_OPS = 10
SYNTAX = f"write rand-mM-nN (M: magnitude 0..{MAX_MAGNITUDE}, N: 1..{MAX_NUM_OPS} operations per image, " \
         f"e.g. rand-m9-n2), trivial, or none"


@dataclasses.dataclass(frozen=True)
class AutoAugment:
    policy: str                   # "rand" or "trivial"
    num_ops: int = 1              # operations per image, one after the other
    magnitude: int | None = None  # RandAugment's bin for every operation; TrivialAugment draws one per image

    def draw(self, generator: torch.Generator, global_batch: int) -> torch.Tensor:
        """(B, N, 3) integers per image and operation: which operation, its magnitude bin, and whether a
        signed one is negated (torchvision's `torch.rand(()) <= 0.5`)."""
        shape = (global_batch, self.num_ops)
        op = torch.randint(len(OPS), shape, generator=generator)
        if self.magnitude is None:
            bins = torch.randint(NUM_BINS, shape, generator=generator)
        else:
            bins = torch.full(shape, self.magnitude)
        negate = torch.rand(shape, generator=generator) <= 0.5
        return torch.stack([op, bins, negate.long()], dim=-1)

    def levels(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(len(OPS), NUM_BINS) float32: each operation's magnitude per bin, as torchvision computes them
        (0 for the operations that take none). Built on the device: no host copy inside a step."""
        rand = self.policy == "rand"

        def ramp(end: float) -> torch.Tensor:
            return torch.linspace(0.0, end, NUM_BINS, device=device)

        strength = ramp(0.9 if rand else 0.99)
        bits = 8 - torch.arange(NUM_BINS, device=device) / ((NUM_BINS - 1) / (4 if rand else 6))
        rows = {"shear_x": ramp(0.3 if rand else 0.99), "shear_y": ramp(0.3 if rand else 0.99),
                "translate_x": ramp(150.0 / 331.0 * width if rand else 32.0),
                "translate_y": ramp(150.0 / 331.0 * height if rand else 32.0),
                "rotate": ramp(30.0 if rand else 135.0), "brightness": strength, "color": strength,
                "contrast": strength, "sharpness": strength, "posterize": bits.round(),
                "solarize": torch.linspace(1.0, 0.0, NUM_BINS, device=device)}
        zeros = torch.zeros(NUM_BINS, device=device)
        return torch.stack([rows.get(name, zeros) for name in OPS])

    def apply(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Each image of a (B, C, H, W) uint8 batch through its N operations; `draws` are its rows of draw's."""
        levels = self.levels(images.shape[-2], images.shape[-1], images.device)
        for index in range(self.num_ops):
            op, bins, negate = draws[:, index].unbind(dim=1)
            magnitude = levels[op, bins]
            signed = (op >= SIGNED[0]) & (op <= SIGNED[1])
            magnitude = torch.where(signed & negate.bool(), -magnitude, magnitude)
            images = apply_ops(images, op, magnitude)
        return images


def parse_policy(text: str | None) -> AutoAugment | None:
    """--auto-augment's value as an AutoAugment (None: off); a UsageError in one line if it is not one."""
    if text is None or text == "none":
        return None
    if text == "trivial":
        return AutoAugment("trivial")
    name, *parts = text.split("-")
    if name != "rand":
        raise UsageError(f"--auto-augment {text!r} is unknown; {SYNTAX}")
    values = {"m": 9, "n": 2}  # timm's and torchvision's defaults
    for part in parts:
        if part[:1] not in values or not part[1:].isdigit():
            raise UsageError(f"--auto-augment {text!r}: cannot read {part!r}; {SYNTAX}")
        values[part[0]] = int(part[1:])
    if not (0 <= values["m"] <= MAX_MAGNITUDE and 1 <= values["n"] <= MAX_NUM_OPS):
        raise UsageError(f"--auto-augment {text!r}: out of range; {SYNTAX}")
    return AutoAugment("rand", num_ops=values["n"], magnitude=values["m"])


def _rows(values: torch.Tensor) -> torch.Tensor:
    """Per-image values (B,) shaped to broadcast over (B, C, H, W)."""
    return values[:, None, None, None]


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    return values.clamp_(0, 255).to(torch.uint8)  # truncates, as torchvision's kernels do


def apply_ops(images: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Image i through operation OPS[op[i]] at magnitude[i] (torchvision's value, signed)."""
    magnitude = magnitude.double()  # torchvision derives factors from Python floats
    factor = 1.0 + magnitude
    results = {"identity": images, "brightness": _to_uint8(images.float() * _rows(factor.float())),
               "color": _color(images, factor), "contrast": _contrast(images, factor),
               "sharpness": _sharpness(images, factor), "posterize": _posterize(images, magnitude),
               "solarize": _solarize(images, magnitude), "autocontrast": _autocontrast(images),
               "equalize": equalize(images)}
    moved = _geometric(images, op, magnitude)
    output = images
    for index, name in enumerate(OPS):
        output = torch.where(_rows(op == index), results.get(name, moved), output)
    return output


def _blend(images: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend with a factor per image: images x factor + degenerate x (1 - factor)."""
    blended = images.float() * _rows(factor.float()) + degenerate * _rows((1.0 - factor).float())
    return _to_uint8(blended)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """Float luma, floored, as torchvision's colour operations take it from 3-channel uint8 images."""
    if images.shape[1] == 1:
        return images.float()
    red, green, blue = images.float().unbind(dim=1)
    return (red * 0.2989 + green * 0.587 + blue * 0.114).floor_()[:, None]


def _color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images if images.shape[1] == 1 else _blend(images, _grayscale(images), factor)


def _contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def _sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """A blend with a 3x3 smoothing (1s around a 5, / 13, rounded) inside a 1-pixel border kept as is."""
    channels, height, width = images.shape[1:]
    if height <= 2 or width <= 2:
        return images
    kernel = torch.full((channels, 1, 3, 3), 1.0 / 13.0, device=images.device)
    kernel[:, :, 1, 1] = 5.0 / 13.0
    output = images.float()
    blurred = F.conv2d(output, kernel, groups=channels).round_()
    inside = output[..., 1:-1, 1:-1]
    inside.add_((blurred - inside) * _rows((1.0 - factor).float()))
    return _to_uint8(output)


def _posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits of each value: a mask of 256 - 2^(8 - bits)."""
    mask = 256 - torch.pow(2, 8 - bits.long())
    return images & _rows(mask.to(torch.uint8))


def _solarize(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    threshold = (255.0 * magnitude).float()  # compared in float32, as torchvision's `image >= threshold`
    return torch.where(images.float() >= _rows(threshold), 255 - images, images)


def _autocontrast(images: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to 0..255; a flat channel stays as it is."""
    values = images.float()
    low = values.amin(dim=(-2, -1), keepdim=True)
    high = values.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255))
    return _to_uint8((values - torch.where(flat, 0.0, low)) / scale)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Histogram equalization per image and channel, by PIL's look-up table as torchvision computes it;
    a channel with fewer than 255 pixels outside its top value stays as it is."""
    flat = images.flatten(start_dim=-2).long()
    hist = torch.zeros(*flat.shape[:-1], 256, dtype=torch.int64, device=images.device)
    hist.scatter_add_(-1, flat, torch.ones_like(flat))
    cumulative = hist.cumsum(dim=-1)
    top = cumulative.argmax(dim=-1, keepdim=True)  # the first bin holding every pixel: the top value's
    step = torch.div(flat.shape[-1] - hist.gather(-1, top), 255, rounding_mode="floor")
    lut = torch.div(cumulative[..., :-1] + step // 2, step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[..., :1]), lut], dim=-1)
    equalized = lut.gather(-1, flat).to(torch.uint8).view_as(images)
    return torch.where((step != 0)[..., None], equalized, images)


def _geometric(images: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Shear, translate or rotate each image by its magnitude (an identity for the other operations):
    one grid_sample with per-image inverse matrices, nearest, fill 0, on torchvision's pixel grid."""
    batch, _, height, width = images.shape
    none = torch.zeros_like(magnitude)

    def only(name: str, values: torch.Tensor) -> torch.Tensor:
        return torch.where(op == OPS.index(name), values, none)

    shear = torch.deg2rad(torch.rad2deg(torch.atan(magnitude)))  # F.affine(shear=degrees(atan(m)))
    sheared = (op == OPS.index("shear_x")) | (op == OPS.index("shear_y"))
    theta = inverse_affine(rotation=torch.deg2rad(-torch.remainder(only("rotate", magnitude), 360.0)),
                           shear=(only("shear_x", shear), only("shear_y", shear)),
                           center=(torch.where(sheared, -0.5 * width, none), torch.where(sheared, -0.5 * height, none)),
                           translate=(only("translate_x", magnitude.trunc()), only("translate_y", magnitude.trunc())))
    x = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=images.device)
    y = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=images.device)
    base = torch.stack([x.expand(height, width), y[:, None].expand(height, width),
                        torch.ones(height, width, device=images.device)], dim=-1).view(1, height * width, 3)
    rescaled = theta.float().transpose(1, 2)
    rescaled = torch.stack([rescaled[..., 0] / (0.5 * width), rescaled[..., 1] / (0.5 * height)], dim=-1)
    grid = base.expand(batch, -1, -1).bmm(rescaled).view(batch, height, width, 2)
    moved = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return moved.round_().to(torch.uint8)


def inverse_affine(rotation: torch.Tensor, shear: tuple[torch.Tensor, torch.Tensor],
                   center: tuple[torch.Tensor, torch.Tensor],
                   translate: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(B, 2, 3) output-to-input matrices, torchvision's _get_inverse_affine_matrix at scale 1 per image
    (radians; center and translation in pixels from the image centre)."""
    (shear_x, shear_y), (cx, cy), (tx, ty) = shear, center, translate
    tan_x = torch.tan(shear_x)
    a = torch.cos(rotation - shear_y) / torch.cos(shear_y)
    b = -(a * tan_x + torch.sin(rotation))
    c = torch.sin(rotation - shear_y) / torch.cos(shear_y)
    d = torch.cos(rotation) - c * tan_x
    # Inverse of rotate-shear is [[d, -b], [-c, a]] (determinant 1); then undo the translation around the centre.
    row_x = torch.stack([d, -b, cx - d * (cx + tx) + b * (cy + ty)], dim=-1)
    row_y = torch.stack([-c, a, cy + c * (cx + tx) - a * (cy + ty)], dim=-1)
    return torch.stack([row_x, row_y], dim=1)
