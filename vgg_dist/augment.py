"""Data augmentation on the training device, applied to a batch of uint8 source images (28x28) before
they are resized, so it costs a few small kernels per batch instead of per-image work on the host.

Every random number of a step comes from a generator seeded by (seed, epoch, step in the epoch), and
is drawn for the whole GLOBAL batch, of which each process keeps its own rows. So a resumed run draws
exactly what the uninterrupted run drew, and 1 and N processes augment the global batch identically.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

# Random erasing draws the erased area and aspect ratio as torchvision's RandomErasing does by default.
ERASE_AREA = (0.02, 0.33)
ERASE_ASPECT = (0.3, 3.3)


def step_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (seed, epoch, step, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot([1 << 31, 1]))


@dataclasses.dataclass(frozen=True)
class Augmentation:
    crop_padding: int = 0   # random translation by up to this many pixels (zero padding, then a crop)
    hflip: float = 0.0      # probability of a horizontal flip
    erase: float = 0.0      # probability of erasing one random rectangle (set to 0, the background)

    def __bool__(self) -> bool:
        return bool(self.crop_padding or self.hflip or self.erase)

    def __call__(self, images: torch.Tensor, generator: torch.Generator, global_batch: int,
                 first_row: int) -> torch.Tensor:
        """Augment this process's rows [first_row, first_row + len(images)) of a global batch.

        `generator` lives on the images' device and is already seeded for this step.
        """
        batch, _, height, width = images.shape
        rows = slice(first_row, first_row + batch)
        device = images.device

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(global_batch, *shape, generator=generator, device=device)[rows]

        if self.crop_padding:
            pad = self.crop_padding
            dy, dx = (torch.randint(0, 2 * pad + 1, (2, global_batch), generator=generator, device=device)[:, rows])
            padded = F.pad(images, (pad, pad, pad, pad))
            y = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
            x = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :]
            sample = torch.arange(batch, device=device)[:, None, None, None]
            channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
            images = padded[sample, channel, y, x]
        if self.hflip:
            flip = uniform() < self.hflip
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.erase:
            erase, area, aspect, top, left = uniform(5).unbind(dim=1)
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
    """An Augmentation bound to this process: its rows of the global batch, and a generator on its
    device that each step reseeds from (seed, epoch, step in the epoch)."""

    def __init__(self, augmentation: Augmentation, device: torch.device, seed: int, process_index: int,
                 num_processes: int, global_batch: int):
        self.augmentation, self.seed, self.global_batch = augmentation, seed, global_batch
        self.first_row = process_index * (global_batch // num_processes)
        self.generator = torch.Generator(device=device)

    def __call__(self, images: torch.Tensor, epoch: int, step_in_epoch: int) -> torch.Tensor:
        self.generator.manual_seed(step_seed(self.seed, epoch, step_in_epoch))
        return self.augmentation(images, self.generator, self.global_batch, self.first_row)
