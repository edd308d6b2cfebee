"""Fashion-MNIST (or MNIST) as uint8 tensors, from Zalando's IDX files or the Hugging Face Hub.

Images stay 28x28 uint8 until a whole batch is on the training device; `to_model_input` then resizes
and scales them there, which is far cheaper than resizing each image with PIL in a DataLoader worker.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import socket
import struct
import sys
import urllib.parse
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vgg_dist.errors import UsageError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    hub_id: str
    class_names: tuple[str, ...]
    download_hint: str


DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        hub_id="zalando-datasets/fashion_mnist",
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        download_hint="https://github.com/zalandoresearch/fashion-mnist#get-the-data",
    ),
    "mnist": DatasetInfo(
        hub_id="ylecun/mnist",
        class_names=tuple(str(digit) for digit in range(10)),
        download_hint="https://yann.lecun.com/exdb/mnist/ (or any mirror of its four files)",
    ),
}

# Both datasets ship the same four file names.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_IDX_UBYTE = 0x08


@dataclasses.dataclass
class Split:
    """One split: images uint8 [N, 1, H, W] and labels int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, count: int | None) -> Split:
        """The first `count` examples (all of them when `count` is None)."""
        if count is None or count >= len(self):
            return self
        return Split(self.images[:count], self.labels[:count])

    def split_off(self, fraction: float) -> tuple[Split, Split]:
        """(the first images, the last `fraction` of them): a held-out set that is the same for every seed."""
        held_out = round(len(self) * fraction)
        kept = len(self) - held_out
        return Split(self.images[:kept], self.labels[:kept]), Split(self.images[kept:], self.labels[kept:])


@dataclasses.dataclass
class ImageData:
    """A dataset's two splits and what they mean (Fashion-MNIST or MNIST)."""

    train: Split
    test: Split
    class_names: tuple[str, ...]
    source: str  # where it came from, for the run's config

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]


def read_idx(path: Path, expected_dims: int) -> torch.Tensor:
    """Read one gzip-compressed (or plain) IDX file of unsigned bytes, checking every header field.

    Checks are explicit `if`s rather than asserts so that `python -O` keeps them.
    """
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as error:
        raise UsageError(f"{path}: not a readable gzip file ({error}); download it again") from None
    if len(raw) < 4:
        raise UsageError(f"{path}: {len(raw)} bytes is too short for an IDX header; download it again")
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _IDX_UBYTE or dims != expected_dims:
        raise UsageError(f"{path}: wrong magic number 0x{raw[:4].hex()} (expected 0x0000080{expected_dims}, "
                         f"an IDX file of {expected_dims}-D unsigned bytes); is it the right file?")
    header_size = 4 + 4 * dims
    if len(raw) < header_size:
        raise UsageError(f"{path}: header is truncated; download it again")
    shape = struct.unpack(f">{dims}I", raw[4:header_size])
    expected_bytes = header_size + math.prod(shape)
    if len(raw) != expected_bytes:
        raise UsageError(f"{path}: header promises shape {list(shape)} ({expected_bytes} bytes) but the file "
                         f"holds {len(raw)} bytes; download it again")
    if expected_bytes == header_size:  # a count of zero; frombuffer refuses an empty buffer
        return torch.zeros(shape, dtype=torch.uint8)
    data = torch.frombuffer(bytearray(raw[header_size:]), dtype=torch.uint8)
    return data.reshape(shape)


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor as a gzip IDX file (used by tests and by anyone making their own data)."""
    array = array.to(torch.uint8).contiguous()
    header = struct.pack(">HBB", 0, _IDX_UBYTE, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.numpy().tobytes())


def _find_file(data_dir: Path, name: str) -> Path:
    """The `.gz` file as Zalando ships it, or the same file already decompressed."""
    for candidate in (data_dir / name, data_dir / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise UsageError(f"--data-dir {data_dir}: missing {name}; it needs Zalando's four files "
                     f"({', '.join(n for pair in SPLIT_FILES.values() for n in pair)})")


def read_split(data_dir: Path, split: str, num_classes: int) -> Split:
    images_name, labels_name = SPLIT_FILES[split]
    images_path, labels_path = _find_file(data_dir, images_name), _find_file(data_dir, labels_name)
    images = read_idx(images_path, expected_dims=3)
    labels = read_idx(labels_path, expected_dims=1)
    if len(images) != len(labels):
        raise UsageError(f"{labels_path}: holds {len(labels)} labels but {images_path.name} holds "
                         f"{len(images)} images; the two files do not belong together")
    if len(labels) == 0:
        raise UsageError(f"{images_path}: holds no images")
    if int(labels.max()) >= num_classes:
        raise UsageError(f"{labels_path}: label {int(labels.max())} is not below the {num_classes} classes "
                         f"of this dataset; is it the right file?")
    return Split(images.unsqueeze(1), labels.long())


def load_from_dir(data_dir: Path, dataset: str) -> ImageData:
    if not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir}: not a directory")
    class_names = DATASETS[dataset].class_names
    train = read_split(data_dir, "train", len(class_names))
    test = read_split(data_dir, "test", len(class_names))
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UsageError(f"--data-dir {data_dir}: train images are {list(train.images.shape[2:])} but test "
                         f"images are {list(test.images.shape[2:])}")
    return ImageData(train, test, class_names, source=str(data_dir))


HUB_ENDPOINT_VARIABLE, HUB_OFFLINE_VARIABLE = "HF_ENDPOINT", "HF_HUB_OFFLINE"
HUB_PROBE_SECONDS = 5


def hub_reachable() -> bool:
    """Whether the Hub's host accepts a connection within a few seconds. Without this check an offline
    machine spends half a minute in `datasets`' retries before it fails."""
    endpoint = urllib.parse.urlparse(os.environ.get(HUB_ENDPOINT_VARIABLE, "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        return False
    return True


def load_from_hub(dataset: str) -> ImageData:
    """Download (or reuse the cached) dataset through `datasets`; import it only here so the rest of
    vgg_dist works on machines without it.

    When the Hub cannot be reached, `datasets` is put in offline mode before it is imported, so a
    cached copy still loads and a missing one fails at once.
    """
    info = DATASETS[dataset]
    offline = os.environ.get(HUB_OFFLINE_VARIABLE, "").upper() in ("1", "ON", "YES", "TRUE")
    if not offline and "datasets" not in sys.modules and not hub_reachable():
        os.environ[HUB_OFFLINE_VARIABLE] = "1"  # read by `datasets` when it is imported, just below
        offline = True
    try:
        import datasets
        loaded = datasets.load_dataset(info.hub_id).with_format("numpy")
        columns = {name: loaded[name][:] for name in ("train", "test")}  # whole splits as arrays
    except ImportError:
        raise UsageError(no_data_message(dataset, "the `datasets` package is not installed")) from None
    except Exception as error:  # offline, hub down, cache corrupt: all end the same way for the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        where = (f"the Hub is not reachable ({HUB_OFFLINE_VARIABLE}=1) and {info.hub_id} is not in the local cache"
                 if offline else f"{info.hub_id} could not be loaded")
        raise UsageError(no_data_message(dataset, f"{where} ({reason})")) from None
    splits = {}
    for name, column in columns.items():
        if "image" not in column or "label" not in column:
            raise UsageError(f"{info.hub_id} ({name}): expected columns 'image' and 'label', found "
                             f"{', '.join(column)}")
        images = torch.from_numpy(np.asarray(column["image"]).astype("uint8"))
        if images.dim() != 3:
            raise UsageError(f"{info.hub_id} ({name}): expected grayscale images, got array shape "
                             f"{list(images.shape)}")
        labels = torch.from_numpy(np.asarray(column["label"])).long()
        in_range = len(labels) > 0 and 0 <= int(labels.min()) and int(labels.max()) < len(info.class_names)
        if len(labels) != len(images) or not in_range:
            raise UsageError(f"{info.hub_id} ({name}): labels must be one per image, from 0 to "
                             f"{len(info.class_names) - 1}")
        splits[name] = Split(images.unsqueeze(1), labels)
    return ImageData(splits["train"], splits["test"], info.class_names, source=f"hf://{info.hub_id}")


def no_data_message(dataset: str, reason: str) -> str:
    info = DATASETS[dataset]
    files = " ".join(n for pair in SPLIT_FILES.values() for n in pair)
    return (f"no {dataset} data: {reason}. Download the four files ({files}) from {info.download_hint} "
            f"into a directory and pass --data-dir DIR")


def load_dataset(dataset: str, data_dir: str | os.PathLike | None) -> ImageData:
    if dataset not in DATASETS:
        raise UsageError(f"--dataset {dataset!r} is unknown; choose one of {', '.join(DATASETS)}")
    if data_dir is not None:
        return load_from_dir(Path(data_dir), dataset)
    return load_from_hub(dataset)


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


def to_model_input(images: torch.Tensor, image_size: int, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, C, h, w] on any device -> float [B, C, S, S] in [0, 1], resized bilinearly.

    For the 28 -> 224 upsampling this is the same filter as the chapter's PIL bilinear `Resize`; PIL
    only rounds its output to 8 bits, so the two differ by at most one grey level (1/255).
    """
    x = images.float()
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=image_size < images.shape[-1])
    x = x.mul_(1.0 / 255.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        if x.shape[1] == 1:
            # One channel: NCHW and NHWC are the same bytes, and `contiguous` keeps NCHW's strides, which
            # read as NCHW to whoever infers the layout from them (cuDNN's first convolution converted its
            # input every step on an H200: nchwToNhwcKernel, 4% of GPU time). NHWC's strides, same memory.
            height, width = x.shape[2:]
            x = x.as_strided(x.shape, (height * width, 1, width, 1))
    return x
