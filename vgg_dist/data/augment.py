"""Data augmentation on the training device, applied to a batch of uint8 source images (28x28) before
they are resized, so it costs a few small kernels per batch instead of per-image work on the host.

Every random number of a step comes from a generator seeded by (seed, epoch, step in the epoch), and
is drawn for the whole GLOBAL batch, of which each process keeps its own rows. So a resumed run draws
exactly what the uninterrupted run drew, and 1 and N processes augment the global batch identically.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vgg_dist.data.auto_augment import AutoAugment
from vgg_dist.data.mix import Mixing, mix_batch

# Random erasing draws the erased area and aspect ratio as torchvision's RandomErasing does by default.
ERASE_AREA = (0.02, 0.33)
ERASE_ASPECT = (0.3, 3.3)
MIX_STREAM = 1  # the mixing generator's seed is (seed, epoch, step, MIX_STREAM)


def step_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (seed, epoch, step, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot([1 << 31, 1]))


@dataclasses.dataclass(frozen=True)
class Augmentation:
    crop_padding: int = 0   # random translation by up to this many pixels (zero padding, then a crop)
    hflip: float = 0.0      # probability of a horizontal flip
    erase: float = 0.0      # probability of erasing one random rectangle (set to 0, the background)
    mix: Mixing = Mixing()  # MixUp / CutMix, after the rest (vgg_dist/data/mix.py)
    auto_augment: AutoAugment | None = None  # RandAugment / TrivialAugment (vgg_dist/data/auto_augment.py)

    def __bool__(self) -> bool:
        return bool(self.crop_padding or self.hflip or self.erase or self.mix or self.auto_augment)

    def draw(self, generator: torch.Generator, global_batch: int) -> dict[str, torch.Tensor]:
        """The random numbers of one step, one row per image of the global batch: `shift` (B, 2) pixel
        offsets, `flip` (B,) and `erase` (B, 5) uniforms, `auto_augment` (B, N, 3) integers. Drawn on the host, so that a CUDA graph can
        take them as an input (--cuda-graphs); a few kilobytes per step."""
        draws = {}
        if self.crop_padding:
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (2, global_batch), generator=generator)
            draws["shift"] = offsets.T  # drawn as all dy, then all dx
        if self.hflip:
            draws["flip"] = torch.rand(global_batch, generator=generator)
        if self.erase:
            draws["erase"] = torch.rand(global_batch, 5, generator=generator)
        if self.auto_augment:  # drawn last: without it, a run draws exactly what it drew before it existed
            draws["auto_augment"] = self.auto_augment.draw(generator, global_batch)
        return draws

    def apply(self, images: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment a batch of images with `draws` for its rows (on the images' device). Device work
        only: no host synchronisation, nothing random, so it can be captured in a CUDA graph."""
        batch, _, height, width = images.shape
        device = images.device
        if self.crop_padding:
            pad = self.crop_padding
            dy, dx = draws["shift"].unbind(dim=1)
            padded = F.pad(images, (pad, pad, pad, pad))
            y = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
            x = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :]
            sample = torch.arange(batch, device=device)[:, None, None, None]
            channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
            images = padded[sample, channel, y, x]
        if self.hflip:
            flip = draws["flip"] < self.hflip
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.auto_augment:
            # torchvision's usual order (its classification references): crop and flip, then the policy, then
            # erasing last, so that the policy sees the framed image and the erased box stays 0 rather than
            # being brightened, solarized or moved.
            images = self.auto_augment.apply(images, draws["auto_augment"])
        if self.erase:
            erase, area, aspect, top, left = draws["erase"].unbind(dim=1)
            area = height * width * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * area)
            log_low, log_high = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
            aspect = torch.exp(log_low + (log_high - log_low) * aspect)
            tall = torch.sqrt(area * aspect).round().clamp(1, height)
            wide = torch.sqrt(area / aspect).round().clamp(1, width)
            top = (top * (height - tall + 1)).floor()
            left = (left * (width - wide + 1)).floor()
            y = torch.arange(height, device=device)[None, :, None]
            x = torch.arange(width, device=device)[None, None, :]
            inside = ((y >= top[:, None, None]) & (y < (top + tall)[:, None, None])
                      & (x >= left[:, None, None]) & (x < (left + wide)[:, None, None]))
            images = images.masked_fill((inside & (erase < self.erase)[:, None, None])[:, None], 0)
        return images


class BatchAugmenter:
    """An Augmentation bound to this process: its rows of the global batch, and a host generator that
    each step reseeds from (seed, epoch, step in the epoch)."""

    def __init__(self, augmentation: Augmentation, device: torch.device, seed: int, process_index: int,
                 num_processes: int, global_batch: int):
        self.augmentation, self.device, self.seed, self.global_batch = augmentation, device, seed, global_batch
        rows_per_process = global_batch // num_processes
        self.rows = slice(process_index * rows_per_process, (process_index + 1) * rows_per_process)
        self.generator = torch.Generator()

    def draw(self, epoch: int, step_in_epoch: int) -> dict[str, torch.Tensor]:
        """This process's rows of the step's random numbers, and the step's mixing, on its device."""
        self.generator.manual_seed(step_seed(self.seed, epoch, step_in_epoch))
        draws = {name: values[self.rows] for name, values in
                 self.augmentation.draw(self.generator, self.global_batch).items()}
        if self.augmentation.mix:
            # A stream of its own (NumPy's, for Beta draws), so that the other draws are what they were.
            rng = np.random.default_rng(step_seed(self.seed, epoch, step_in_epoch, MIX_STREAM))
            mixing = self.augmentation.mix.draw(rng, self.global_batch)
            draws.update(mix=mixing["mix"], partner=mixing["partner"][self.rows])
        return {name: values.to(self.device, non_blocking=True) for name, values in draws.items()}

    def apply(self, images: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.augmentation.apply(images, draws)

    def mix(self, images: torch.Tensor, labels: torch.Tensor, draws: dict[str, torch.Tensor], num_classes: int,
            gather: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        """MixUp / CutMix of the augmented batch: (images, soft targets, dominant labels); see mix_batch."""
        return mix_batch(images, labels, draws, num_classes, gather)
