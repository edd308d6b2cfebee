"""Batches: a whole batch gathered with one tensor index, the same order on every rank, and the
resize-and-scale step that turns stored uint8 images into model input on the training device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vgg_dist.data.sources import Split


class BatchIndexedTensors(torch.utils.data.Dataset):
    """A dataset that answers a whole batch of indices with one tensor index, not a Python loop.

    DataLoader calls `__getitems__` with the batch sampler's index list; pair it with `keep_batch`
    as collate_fn, since the batch arrives already stacked.
    """

    def __init__(self, split: Split):
        self.images, self.labels = split.images, split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], self.labels[index]


def keep_batch(batch):
    return batch


# Spreads (seed, epoch) pairs apart: a prime above any epoch count, so no two pairs share a generator seed.
SEED_STRIDE = 1_000_003


class EpochBatchSampler:
    """Global batches of indices: a fresh permutation per epoch drawn from (seed, epoch) alone.

    Because the order depends on nothing but the seed and the epoch, every rank computes the same
    batches without communicating, and a resumed run can recompute any epoch's order. Batches are
    Python lists because Accelerate's batch splitter concatenates them with `+`.
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch = 0
        self.skip_batches = 0

    def start_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the epoch's permutation; `skip_batches` leaves out batches a resumed run already took.

        Deliberately not named `set_epoch`: Accelerate calls that with its own iteration counter.
        """
        self.epoch, self.skip_batches = epoch, skip_batches

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self):
        order = self.order().tolist()
        for batch_index in range(self.skip_batches, len(self) + self.skip_batches):
            yield order[batch_index * self.batch_size:(batch_index + 1) * self.batch_size]

    def full_length(self) -> int:
        """Batches in a whole epoch, skipped ones included."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __len__(self) -> int:
        return self.full_length() - self.skip_batches


def to_model_input(images: torch.Tensor, image_size: int, channels_last: bool = False,
                   mean: list[float] | None = None, std: list[float] | None = None) -> torch.Tensor:
    """uint8 [B, C, h, w] on any device -> float [B, C, S, S], resized bilinearly, in [0, 1], or
    standardised per channel as (x - mean) / std when `mean` and `std` (on the 0-1 scale) are given.

    For the 28 -> 224 upsampling this is the same filter as the chapter's PIL bilinear `Resize`; PIL
    only rounds its output to 8 bits, so the two differ by at most one grey level (1/255).
    """
    x = images.float()
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=image_size < images.shape[-1])
    x = x.mul_(1.0 / 255.0)
    if mean is not None and std is not None:
        # Python numbers, one channel at a time: no tensor is made from them on the device, which a CUDA
        # graph capture would not allow, and a chapter run (no mean) keeps exactly its old arithmetic.
        for channel, (shift, scale) in enumerate(zip(mean, std)):
            x[:, channel].sub_(shift).div_(scale)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        if x.shape[1] == 1:
            # One channel: NCHW and NHWC are the same bytes, and `contiguous` keeps NCHW's strides, which
            # read as NCHW to whoever infers the layout from them (cuDNN's first convolution converted its
            # input every step on an H200: nchwToNhwcKernel, 4% of GPU time). NHWC's strides, same memory.
            height, width = x.shape[2:]
            x = x.as_strided(x.shape, (height * width, 1, width, 1))
    return x
