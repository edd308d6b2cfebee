"""MixUp and CutMix on the training device, as timm's `Mixup` does them in its default "batch" mode: one
mixing weight (and one CutMix box) per step, each image mixed with a partner image of the same step.

Partners are drawn from the whole GLOBAL batch, so an image may be mixed with one another process holds:
each process gathers the step's augmented source images (uint8, 28x28: under a kilobyte each) and labels
from all processes. The draws come from a generator seeded by (seed, epoch, step in the epoch), like the
other augmentation's, so 1 and N processes mix identically and a resumed run mixes as the uninterrupted
one did.

The targets are soft: lam x one-hot(label) + (1 - lam) x one-hot(partner's label). Cross-entropy on them
with label smoothing s smooths the mixture, (1 - s) x target + s / classes, which is timm's `mixup_target`
followed by `SoftTargetCrossEntropy`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

# Columns of the "mix" draw: the Beta-drawn weight (1 when the step is not mixed), 1 for CutMix and 0 for
# MixUp, and the CutMix box's centre as fractions of the height and width.
LAM, CUTMIX, CENTRE_Y, CENTRE_X = range(4)


@dataclasses.dataclass(frozen=True)
class Mixing:
    mixup: float = 0.0        # MixUp's Beta(alpha, alpha); 0: off
    cutmix: float = 0.0       # CutMix's Beta(alpha, alpha); 0: off
    prob: float = 1.0         # probability that a step is mixed at all
    switch_prob: float = 0.5  # with both on, probability that a mixed step uses CutMix rather than MixUp

    def __bool__(self) -> bool:
        return bool(self.mixup or self.cutmix)

    def draw(self, rng: np.random.Generator, global_batch: int) -> dict[str, torch.Tensor]:
        """One step's mixing: `mix` (4,) as the columns above, the same on every process, and `partner` (B,),
        each image's partner in the global batch (a random permutation)."""
        mixed = rng.random() < self.prob
        cutmix = bool(self.cutmix) and (not self.mixup or rng.random() < self.switch_prob)
        alpha = self.cutmix if cutmix else self.mixup
        lam = float(rng.beta(alpha, alpha)) if mixed else 1.0
        centre = rng.random(2)
        partner = torch.from_numpy(rng.permutation(global_batch))
        return {"mix": torch.tensor([lam, float(cutmix and mixed), *centre], dtype=torch.float64),
                "partner": partner}


def cutmix_box(mix: torch.Tensor, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pasted box as a (height, width) mask, and the share of the image left outside it (timm's
    rand_bbox and corrected lam: a box clipped at the border pastes less than 1 - lam)."""
    ratio = torch.sqrt(1.0 - mix[LAM])
    cut_h, cut_w = (height * ratio).floor(), (width * ratio).floor()
    centre_y, centre_x = (mix[CENTRE_Y] * height).floor(), (mix[CENTRE_X] * width).floor()
    top, bottom = (centre_y - cut_h // 2).clamp(0, height), (centre_y + cut_h // 2).clamp(0, height)
    left, right = (centre_x - cut_w // 2).clamp(0, width), (centre_x + cut_w // 2).clamp(0, width)
    y = torch.arange(height, device=device, dtype=mix.dtype)[:, None]
    x = torch.arange(width, device=device, dtype=mix.dtype)[None, :]
    inside = (y >= top) & (y < bottom) & (x >= left) & (x < right)
    return inside, 1.0 - (bottom - top) * (right - left) / (height * width)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, draws: dict[str, torch.Tensor], num_classes: int,
              gather: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's rows mixed with their partners: (images as floats in the uint8 range, soft targets
    (B, classes), dominant labels). `gather` collects every process's rows in rank order (None on one
    process). The dominant label is the one weighted at least half, which train accuracy is judged by."""
    every_image, every_label = (images, labels) if gather is None else (gather(images), gather(labels))
    partner_images, partner_labels = every_image[draws["partner"]], every_label[draws["partner"]]
    mix = draws["mix"]
    inside, kept = cutmix_box(mix, images.shape[-2], images.shape[-1], images.device)
    cutmix = mix[CUTMIX] > 0.5
    lam = torch.where(cutmix, kept, mix[LAM]).float()
    blended = lam * images.float() + (1.0 - lam) * partner_images.float()
    pasted = torch.where(inside, partner_images, images).float()
    mixed = torch.where(cutmix, pasted, blended)
    targets = (lam * F.one_hot(labels, num_classes).float()
               + (1.0 - lam) * F.one_hot(partner_labels, num_classes).float())
    return mixed, targets, torch.where(lam >= 0.5, labels, partner_labels)
