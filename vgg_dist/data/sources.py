"""Where a dataset comes from, as uint8 tensors with its class names: Fashion-MNIST or MNIST read whole
from Zalando's IDX files or the Hugging Face Hub; any other Hub dataset or folder of images through the
decode-once cache (cache.py, hub_images.py).

Images stay at their stored size, uint8, until a whole batch is on the training device;
`batches.to_model_input` then resizes and scales them there, far cheaper than resizing each image with PIL
in a DataLoader worker.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import re
import socket
import struct
import sys
import urllib.parse
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vgg_dist.errors import UsageError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    hub_id: str
    download_hint: str
    class_names: tuple[str, ...] = ()  # for IDX files, which carry none; a Hub dataset's features name its own
    whole_arrays: bool = False         # 28x28 grey: read whole into memory every run, no cache needed
    image_column: str | None = None    # the default --image-column and --label-column
    label_column: str | None = None


DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        hub_id="zalando-datasets/fashion_mnist",
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        download_hint="https://github.com/zalandoresearch/fashion-mnist#get-the-data", whole_arrays=True,
    ),
    "mnist": DatasetInfo(
        hub_id="ylecun/mnist",
        class_names=tuple(str(digit) for digit in range(10)),
        download_hint="https://yann.lecun.com/exdb/mnist/ (or any mirror of its four files)", whole_arrays=True,
    ),
    "cifar10": DatasetInfo(hub_id="uoft-cs/cifar10", image_column="img", label_column="label",
                           download_hint="https://huggingface.co/datasets/uoft-cs/cifar10"),
    # CIFAR-100's images carry a fine label (100 classes) and a coarse one (20 superclasses).
    "cifar100": DatasetInfo(hub_id="uoft-cs/cifar100", image_column="img", label_column="fine_label",
                            download_hint="https://huggingface.co/datasets/uoft-cs/cifar100"),
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def check_dataset_name(name: str) -> None:
    """A built-in name or a Hub id (OWNER/NAME); anything else is refused in one line."""
    if name not in DATASETS and not HUB_ID.fullmatch(name):
        raise UsageError(f"--dataset {name!r}: not a built-in dataset ({', '.join(DATASETS)}) nor a Hub dataset id "
                         f"(OWNER/NAME, such as uoft-cs/cifar10)")

# Both datasets ship the same four file names.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_IDX_UBYTE = 0x08


@dataclasses.dataclass
class Split:
    """One split: images uint8 [N, C, H, W] (in memory, or memory-mapped from the cache) and labels int64 [N]."""

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
class DataRecord:
    """What config.json says about images decoded into the cache (folders, save_to_disk, parquet)."""

    layout: str
    fingerprint: str                      # the cache key: the files' paths, sizes and times, and the options
    cache_hit: bool                       # whether this run found the images already decoded
    cache_entry: str
    channel_mean: list[float]             # the training split's, per channel, on a 0-1 scale
    channel_std: list[float]
    skipped_images: int = 0               # left out by --skip-bad-images
    skipped_paths: list[str] = dataclasses.field(default_factory=list)  # the first few of them


@dataclasses.dataclass
class ImageData:
    """A dataset's two splits and what they mean."""

    train: Split
    test: Split
    class_names: tuple[str, ...]
    source: str  # where it came from, for the run's config
    record: DataRecord | None = None  # None for IDX files and the Hub, which are read whole every run

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    def channel_statistics(self) -> tuple[list[float], list[float]]:
        """The whole training split's per-channel (mean, std) on a 0-1 scale: the cache's record, or
        computed here for data read whole (a fraction of a second for Fashion-MNIST's 60,000 images)."""
        if self.record is not None:
            return self.record.channel_mean, self.record.channel_std
        return channel_stats(self.train.images.numpy())


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
                         f"named; is it the right file, or does --class-names list too few names?")
    return Split(images.unsqueeze(1), labels.long())


def load_from_dir(data_dir: Path, class_names: tuple[str, ...]) -> ImageData:
    if not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir}: not a directory")
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


def hub_dataset(hub_id: str, no_data: Callable[[str], str], prepare: Callable = lambda loaded: loaded):
    """`prepare(datasets.load_dataset(hub_id))`: downloaded, or reused from `datasets`' cache. `datasets` is
    imported only here, so the rest of vgg_dist works on machines without it. Any failure is a UsageError
    whose message `no_data(reason)` writes.

    When the Hub cannot be reached, `datasets` is put in offline mode before it is imported, so a cached
    copy still loads and a missing one fails at once, not after half a minute of retries.
    """
    offline = os.environ.get(HUB_OFFLINE_VARIABLE, "").upper() in ("1", "ON", "YES", "TRUE")
    if not offline and "datasets" not in sys.modules and not hub_reachable():
        os.environ[HUB_OFFLINE_VARIABLE] = "1"  # read by `datasets` when it is imported, just below
        offline = True
    try:
        import datasets
        return prepare(datasets.load_dataset(hub_id))
    except ImportError:
        raise UsageError(no_data("the `datasets` package is not installed")) from None
    except Exception as error:  # offline, hub down, cache corrupt: all end the same way for the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        local = Path(hub_id).is_dir()  # `datasets` reads a folder of that name in the working directory
        where = (f"the Hub is not reachable ({HUB_OFFLINE_VARIABLE}=1) and {hub_id} is not in the local cache"
                 if offline and not local else f"{hub_id} could not be loaded")
        raise UsageError(no_data(f"{where} ({reason})")) from None


def load_from_hub(dataset: str, class_names: tuple[str, ...]) -> ImageData:
    """Fashion-MNIST or MNIST from the Hub, both splits read whole as arrays."""
    info = DATASETS[dataset]
    columns = hub_dataset(info.hub_id, lambda reason: no_data_message(dataset, reason),
                          lambda loaded: {name: loaded.with_format("numpy")[name][:] for name in ("train", "test")})
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
        in_range = len(labels) > 0 and 0 <= int(labels.min()) and int(labels.max()) < len(class_names)
        if len(labels) != len(images) or not in_range:
            raise UsageError(f"{info.hub_id} ({name}): labels must be one per image, from 0 to "
                             f"{len(class_names) - 1}")
        splits[name] = Split(images.unsqueeze(1), labels)
    return ImageData(splits["train"], splits["test"], class_names, source=f"hf://{info.hub_id}")


def no_data_message(dataset: str, reason: str) -> str:
    info = DATASETS[dataset]
    files = " ".join(n for pair in SPLIT_FILES.values() for n in pair)
    return (f"no {dataset} data: {reason}. Download the four files ({files}) from {info.download_hint} "
            f"into a directory and pass --data-dir DIR")


def load_dataset(dataset: str, data_dir: str | os.PathLike | None,
                 class_names: tuple[str, ...] | None = None, options=None) -> ImageData:
    """The dataset's two splits, named by `class_names` when given (a --class-names file), else by the
    dataset's own names. Anything but IDX files and the Hub's Fashion-MNIST and MNIST is decoded once into
    the cache, as `options` (a cache.DecodeOptions) say; its class names are its own."""
    from vgg_dist.data.cache import DecodeOptions, load_folder  # the cache needs this module's Split
    from vgg_dist.data.folders import IDX, detect_layout
    from vgg_dist.data.hub_images import load_hub_images
    check_dataset_name(dataset)
    info = DATASETS.get(dataset)
    options = options or DecodeOptions()
    if info is not None:  # the dataset's own columns, unless the flags name others
        options = dataclasses.replace(options, image_column=options.image_column or info.image_column,
                                      label_column=options.label_column or info.label_column)
    names = class_names or (info.class_names if info else ())
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise UsageError(f"--data-dir {data_dir}: not a directory")
        layout = detect_layout(Path(data_dir), options.train_split)
        if layout != IDX:
            return load_folder(Path(data_dir), layout, options)
        if not names:
            raise UsageError(f"--data-dir {data_dir}: IDX files carry no class names and --dataset {dataset} names "
                             f"none; give them with --class-names FILE")
        return load_from_dir(Path(data_dir), names)
    if info is not None and info.whole_arrays:
        return load_from_hub(dataset, names)
    return load_hub_images(dataset, info.hub_id if info else dataset, options)


CLASS_NAMES_LIMIT = 1 << 20  # bytes; a list of names, not a dataset


def read_class_names(path: Path) -> tuple[str, ...]:
    """One class name per line, for data whose labels are not the dataset's own (digits in Fashion-MNIST's
    files, say). Blank lines around the names are ignored; blank or repeated names are refused."""
    flag = f"--class-names {path}"
    try:
        if not path.is_file():
            raise UsageError(f"{flag}: not a regular file; give a text file with one class name per line")
        if path.stat().st_size > CLASS_NAMES_LIMIT:
            raise UsageError(f"{flag}: over {CLASS_NAMES_LIMIT // 1024} KiB; give one class name per line")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{flag}: not UTF-8 text; give one class name per line") from None
    except OSError as error:
        raise UsageError(f"{flag}: cannot be read ({error.strerror})") from None
    names = tuple(line.strip() for line in text.strip().splitlines())
    if len(names) < 2 or not all(names):
        raise UsageError(f"{flag}: needs at least two names, one per line, with no blank lines between them")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"{flag}: names repeat ({', '.join(repeated[:3])}); each class needs its own name")
    return names


BORDER_SAMPLE = 1000  # images; the background is a property of the dataset, a sample tells it


def border_mean(images: torch.Tensor) -> float:
    """The mean grey level (0-255) of the outermost pixels of uint8 images [N, C, H, W]: the background
    colour the images share, which tells a light-on-dark dataset from a dark-on-light one."""
    sample = images[:BORDER_SAMPLE].float()
    edges = torch.cat([sample[..., 0, :], sample[..., -1, :], sample[..., 1:-1, 0], sample[..., 1:-1, -1]], dim=-1)
    return round(edges.mean().item(), 2)


STATS_CHUNK = 1024  # images per step of the mean/std pass: bounded memory for any dataset


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 [N, C, H, W] images, on a 0-1 scale."""
    sums = np.zeros(images.shape[1], dtype=np.float64)
    squares = np.zeros(images.shape[1], dtype=np.float64)
    for start in range(0, len(images), STATS_CHUNK):
        chunk = images[start:start + STATS_CHUNK].astype(np.float64) / 255.0
        sums += chunk.sum(axis=(0, 2, 3))
        squares += np.square(chunk).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    return [round(float(value), 6) for value in mean], [round(float(value), 6) for value in std]
