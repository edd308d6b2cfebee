"""Learnable stand-in data in Fashion-MNIST's exact format, for tests and benchmarks without a download."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from vgg_dist.data.sources import SPLIT_FILES, write_idx


def make_images(count: int, num_classes: int = 10, side: int = 28, seed: int = 0,
                noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [count, side, side] and labels [count]: each class is a blurred random template
    plus per-image noise (its share of the pixel is `noise`) and a small random shift, so a model has
    to learn it but can."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, 1, 7, 7, generator=generator)
    templates = F.interpolate(templates, size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    labels = torch.randint(num_classes, (count,), generator=generator)
    pixel_noise = torch.rand(count, side, side, generator=generator)
    images = (1 - noise) * templates[labels] + noise * pixel_noise
    shifts = torch.randint(-2, 3, (count, 2), generator=generator)
    for index, (dy, dx) in enumerate(shifts.tolist()):
        images[index] = torch.roll(images[index], shifts=(dy, dx), dims=(0, 1))
    return (images * 255).round().clamp(0, 255).to(torch.uint8), labels.to(torch.uint8)


def write_dataset(directory: Path, train: int, test: int, seed: int = 0, noise: float = 0.3) -> Path:
    """Write the four IDX files of a synthetic dataset into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images, labels = make_images(train + test, seed=seed, noise=noise)
    for (images_name, labels_name), part in zip(SPLIT_FILES.values(), (slice(0, train), slice(train, None))):
        write_idx(directory / images_name, images[part])
        write_idx(directory / labels_name, labels[part])
    return directory
