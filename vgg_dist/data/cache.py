"""Images decoded once: one memory-mapped uint8 [N, C, H, W] .npy per split, beside its labels and a
meta.json (class names, channels, size, the training split's mean and std, each file's size and shape).

An entry lives under `--cache-dir` (default `$XDG_CACHE_HOME/vgg_dist/datasets/`) in a folder named by
a fingerprint of the source (a folder's every file's relative path, size and modification time; a Hub
dataset's own fingerprints, which `datasets` derives from its files) and of the options that change what
is stored. A changed or added file is a new fingerprint, so an entry is never
stale, only unused. An entry is built under a temporary name and renamed into place, under a file lock,
so a reader sees a whole entry or none, and two runs (or two nodes sharing the directory) build it once.

Training indexes the memory-mapped arrays per batch, as it indexes in-memory tensors: the page cache
holds the images after the first epoch, shared by every process on the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vgg_dist.data import decode
from vgg_dist.data.folders import FolderData, Selection, SplitItems, read_folder, walk_files
from vgg_dist.data.sources import DataRecord, ImageData, Split, channel_stats
from vgg_dist.errors import UsageError

CACHE_VERSION = 3  # raise when what an entry holds changes: older entries are then simply not found
META_NAME = "meta.json"
SKIPPED_LISTED = 5  # paths config.json lists of the images --skip-bad-images left out
STATS_CHUNK = 1024  # images per step of a compaction: bounded memory for any dataset


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """The flags that decide how a folder is decoded (TrainConfig's data group)."""

    channels: int | None = None       # None: 1 when every training image is grey, else 3
    data_size: int | None = None      # None: the images' own size when they share one square size
    image_size: int = 224             # the stored size when they do not
    image_column: str | None = None
    label_column: str | None = None
    decode_workers: int | None = None  # None: one per core
    cache_dir: str | None = None
    skip_bad_images: bool = False
    train_split: str = "train"
    test_split: str | None = None     # None: test, else validation (or val)

    @classmethod
    def from_config(cls, config) -> DecodeOptions:
        return cls(**{field.name: getattr(config, field.name) for field in dataclasses.fields(cls)})

    @property
    def selection(self) -> Selection:
        return Selection(self.train_split, self.test_split, self.image_column, self.label_column)


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """Images not yet decoded, as the cache sees them: a folder, or a Hub dataset `datasets` downloaded."""

    name: str                       # the folder, or hf://OWNER/NAME: for messages and config.json
    label: str                      # a readable start for the entry's folder name
    layout: str
    content: str                    # what identifies the source's bytes (see `fingerprint`)
    read: Callable[[], FolderData]  # both splits' undecoded images and the class names


class Damaged(Exception):
    """An entry whose files disagree with its record; the message says how."""


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vgg_dist" / "datasets"


def folder_source(data_dir: Path, layout: str, selection: Selection) -> ImageSource:
    return ImageSource(name=str(data_dir), label=data_dir.resolve().name or "root", layout=layout,
                       content=folder_content(data_dir), read=lambda: read_folder(data_dir, layout, selection))


def folder_content(data_dir: Path) -> str:
    """A hash of every file's relative path, size and modification time: a changed or added file changes it."""
    digest = hashlib.sha256()
    for path in sorted(walk_files(data_dir, hidden=True)):  # through links, as the listing goes
        status = path.stat()
        digest.update(f"{path.relative_to(data_dir)}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def fingerprint(source: ImageSource, options: DecodeOptions) -> str:
    """The entry's name: the source's label (for people) and a hash of everything that decides its contents."""
    stored = {"version": CACHE_VERSION, "layout": source.layout, "channels": options.channels,
              "size": options.data_size or f"own or {options.image_size}", "image_column": options.image_column,
              "label_column": options.label_column, "skip_bad_images": options.skip_bad_images,
              "train_split": options.train_split, "test_split": options.test_split, "content": source.content}
    digest = hashlib.sha256(json.dumps(stored, sort_keys=True).encode())
    return f"{source.label}-{digest.hexdigest()[:20]}"


@contextlib.contextmanager
def locked(path: Path):
    """Holds an exclusive lock on `path` (created if needed): a second holder waits for the first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # said once, so a long wait is not mistaken for a hang
            print(f"waiting for another run that is decoding these images (lock {path})", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_folder(data_dir: Path, layout: str, options: DecodeOptions) -> ImageData:
    """The folder's images from the cache, decoding them first when no whole entry holds them."""
    return load_cached(folder_source(data_dir, layout, options.selection), options)


def load_cached(source: ImageSource, options: DecodeOptions) -> ImageData:
    """The source's images from the cache, decoding them first when no whole entry holds them."""
    root = cache_root(options.cache_dir)
    key = fingerprint(source, options)
    entry = root / key
    try:
        with locked(root / "locks" / f"{key}.lock"):
            hit = _usable(entry)
            if not hit:
                build(source, options, entry)
    except OSError as error:  # the source's files are read through images.py, which names them itself
        raise UsageError(_write_error(root, error)) from None
    return read_entry(entry, source.name, hit)


def _write_error(root: Path, error: OSError) -> str:
    from vgg_dist.store.files import no_space
    if no_space(error):
        return (f"no space left on the device holding the cache {root}; free some space or choose another "
                f"--cache-dir (nothing partial was kept)")
    return f"the cache {root} cannot be written ({error}); choose another --cache-dir"


def _usable(entry: Path) -> bool:
    """Whether `entry` is whole; a damaged one is removed, with one line, so it is built again."""
    if not entry.exists():
        return False
    try:
        _check(entry)
        return True
    except Damaged as damage:
        print(f"note: the cached images in {entry} are damaged ({damage}); decoding them again", flush=True)
        shutil.rmtree(entry)
        return False


def _check(entry: Path) -> dict:
    """The entry's meta.json, after checking every file's size and header against it."""
    try:
        meta = json.loads((entry / META_NAME).read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise Damaged(f"{META_NAME} is unreadable: {error}") from None
    for name, expected in files.items():
        path = entry / name
        size = path.stat().st_size if path.is_file() else None
        if size != expected["bytes"]:
            raise Damaged(f"{name} holds {size} bytes, its record says {expected['bytes']}")
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise Damaged(f"{name}: {error}") from None
        if list(array.shape) != expected["shape"] or str(array.dtype) != expected["dtype"]:
            raise Damaged(f"{name} holds {array.dtype} {list(array.shape)}, its record says "
                          f"{expected['dtype']} {expected['shape']}")
    return meta


def read_entry(entry: Path, source_name: str, hit: bool) -> ImageData:
    """The entry as an ImageData whose images are memory-mapped, copy-on-write: writable tensors (torch
    warns on read-only ones) whose pages stay shared with every other reader until written, never."""
    try:
        meta = _check(entry)
    except Damaged as damage:  # replaced between our build and this read: not something to retry blindly
        raise UsageError(f"the cached images in {entry} changed while being read ({damage}); rerun") from None
    splits = {}
    for split in ("train", "test"):
        images = torch.from_numpy(np.load(entry / f"{split}_images.npy", mmap_mode="c"))
        labels = torch.from_numpy(np.load(entry / f"{split}_labels.npy")).long()
        splits[split] = Split(images, labels)
    record = DataRecord(layout=meta["layout"], fingerprint=entry.name, cache_hit=hit, cache_entry=str(entry),
                        channel_mean=meta["mean"], channel_std=meta["std"], skipped_images=meta["skipped_images"],
                        skipped_paths=meta["skipped_paths"][:SKIPPED_LISTED])
    return ImageData(splits["train"], splits["test"], tuple(meta["class_names"]), source=source_name, record=record)


def build(source: ImageSource, options: DecodeOptions, entry: Path) -> None:
    """Decode the source into `entry`, built under a temporary name and renamed into place whole."""
    folder = source.read()
    folder.splits = {split: shuffled(items) for split, items in folder.splits.items()}
    workers = options.decode_workers or decode.default_workers()
    skipped = []
    channels, size = stored_form(folder.splits["train"], options, workers)
    count = sum(len(items.labels) for items in folder.splits.values())
    print(f"decoding {count:,} images from {source.name} ({source.layout}) at {channels}x{size[0]}x{size[1]} into "
          f"{entry} with {workers} worker{'s' if workers > 1 else ''}", flush=True)
    started = time.perf_counter()
    for abandoned in entry.parent.glob(f".tmp-{entry.name}-*"):  # a killed build's; we hold the lock
        shutil.rmtree(abandoned, ignore_errors=True)
    temporary = entry.parent / f".tmp-{entry.name}-{os.getpid()}"
    try:
        temporary.mkdir(parents=True)
        files = {}
        for split, items in folder.splits.items():
            skipped += _write_split(temporary, split, items, (channels, size, workers, options.skip_bad_images), files)
        meta = _meta(temporary, folder, files, skipped)
        meta.update(channels=channels, size=list(size))
        (temporary / META_NAME).write_text(json.dumps(meta, indent=1))
        os.rename(temporary, entry)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    print(f"decoded {count - len(skipped):,} images in {time.perf_counter() - started:.1f}s", flush=True)


STORED_ORDER_SEED = 0


def shuffled(items: SplitItems) -> SplitItems:
    """The split in one fixed random order, the same for every run and machine. Folders and many datasets
    list their images class by class, and --val-split, --max-train-samples and --max-eval-samples take the
    first or last rows: in class order they would hold one class, in this order a fair mix."""
    order = np.random.default_rng(STORED_ORDER_SEED).permutation(len(items.labels)).tolist()
    return SplitItems([items.names[i] for i in order], [items.blobs[i] for i in order],
                      [items.labels[i] for i in order])


def stored_form(train: SplitItems, options: DecodeOptions, workers: int) -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) every image is stored at: as the flags say, else from the training
    images' headers: 1 channel when all are grey, their own size when they share one square size."""
    if options.channels is not None and options.data_size is not None:
        return options.channels, (options.data_size, options.data_size)
    # An unreadable header is judged when the image is decoded, where --skip-bad-images applies.
    results = decode.probe(train, workers)
    probed = [result for result in results if not isinstance(result, str)]
    if not probed:
        raise UsageError(f"{results[0]}; no training image is readable")
    channels = options.channels or (1 if all(grey for grey, _, _ in probed) else 3)
    sizes = {(height, width) for _, height, width in probed}
    if options.data_size is not None:
        side = options.data_size
    else:
        height, width = next(iter(sizes))
        side = height if len(sizes) == 1 and height == width else options.image_size
    return channels, (side, side)


def _write_split(directory: Path, split: str, items: SplitItems, how: tuple, files: dict) -> list[str]:
    """Decode one split into `directory`; returns the names of the images left out. An unreadable image
    refuses the run, naming it, unless --skip-bad-images is given."""
    channels, size, workers, skip = how
    images_path, labels_path = directory / f"{split}_images.npy", directory / f"{split}_labels.npy"
    shape = (len(items.labels), channels, *size)
    array = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=shape)
    del array  # the workers write through their own maps
    reserve(images_path)
    failures = decode.decode_into(images_path, items, channels, size, workers)
    if failures and not skip:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise UsageError(f"{failures[0][1]}{more}; fix or remove it, or pass --skip-bad-images to leave such "
                         f"files out")
    labels = np.asarray(items.labels, dtype=np.int64)
    if failures:
        labels = _compact(images_path, labels, {index for index, _ in failures})
    if len(labels) == 0:
        raise UsageError(f"the {split} split holds no readable images")
    np.save(labels_path, labels)
    for path in (images_path, labels_path):
        array = np.load(path, mmap_mode="r")
        files[path.name] = {"bytes": path.stat().st_size, "shape": list(array.shape), "dtype": str(array.dtype)}
    return [items.names[index] for index, _ in sorted(failures)]


def reserve(path: Path) -> None:
    """Allocate the file's blocks now. The new array is a sparse file that workers fill through memory
    maps, and a full disk met through a map kills the writer with SIGBUS; met here it is an OSError."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, path.stat().st_size)
    finally:
        os.close(descriptor)


def _compact(images_path: Path, labels: np.ndarray, bad: set[int]) -> np.ndarray:
    """Rewrite the images without the rows in `bad`; returns the labels kept."""
    keep = np.array([index for index in range(len(labels)) if index not in bad], dtype=np.int64)
    source = np.load(images_path, mmap_mode="r")
    kept_path = images_path.with_name(f"kept-{images_path.name}")
    kept = np.lib.format.open_memmap(kept_path, mode="w+", dtype=np.uint8, shape=(len(keep), *source.shape[1:]))
    for start in range(0, len(keep), STATS_CHUNK):
        kept[start:start + STATS_CHUNK] = source[keep[start:start + STATS_CHUNK]]
    kept.flush()
    del kept, source
    os.replace(kept_path, images_path)
    return labels[keep]


def _meta(directory: Path, folder: FolderData, files: dict, skipped: list[str]) -> dict:
    mean, std = channel_stats(np.load(directory / "train_images.npy", mmap_mode="r"))
    return {"version": CACHE_VERSION, "layout": folder.layout, "class_names": list(folder.class_names),
            "mean": mean, "std": std, "skipped_images": len(skipped), "skipped_paths": skipped[:SKIPPED_LISTED],
            "files": files}
