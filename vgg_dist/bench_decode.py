"""The comparison `python -m vgg_dist.bench --data-dir FOLDER` adds for an ImageFolder tree: what reading
the user's own images costs with vgg_dist's decode-once cache, and with torchvision's usual way.

  first decode     every image of the folder decoded into a new cache entry, by one worker per core
                   (and again by a single worker, to show the workers really run in parallel)
  cached epoch     one epoch of the training images from that entry, in batches, resized and scaled on
                   the training device, as every later epoch, process and run reads them
  torchvision      `datasets.ImageFolder` with `DataLoader(num_workers=cores)`: PIL decode, Resize,
                   CenterCrop and ToTensor at the same size, over the same training files, every epoch

Each is images per second over the whole pass, so the three compare directly.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

import torch

from vgg_dist.data import decode
from vgg_dist.data.batches import EpochBatchSampler, to_model_input
from vgg_dist.data.cache import DecodeOptions, load_folder
from vgg_dist.data.folders import IMAGE_FOLDER
from vgg_dist.data.sources import Split
from vgg_dist.training.dist import make_loader


def compare_folder_loading(data_dir: Path, image_size: int, batch_size: int, device: torch.device) -> dict:
    """The three measurements (see the module's docstring) as `folder_loader`'s JSON."""
    cores = decode.default_workers()
    with tempfile.TemporaryDirectory(prefix="vgg_dist-bench-cache-") as cache:
        single = time_first_decode(data_dir, image_size, Path(cache) / "one_worker", workers=1)
        parallel = time_first_decode(data_dir, image_size, Path(cache) / "all_workers", workers=cores)
        cached = time_cached_epoch(parallel.pop("train"), image_size, batch_size, device)
    single.pop("train")
    torchvision = time_torchvision(data_dir / "train", image_size, batch_size, cores)
    return {"data_dir": str(data_dir), "image_size": image_size, "workers": cores,
            "torchvision_images_per_sec": torchvision["images_per_sec"],
            "first_decode_images_per_sec": parallel["images_per_sec"],
            "first_decode_one_worker_images_per_sec": single["images_per_sec"],
            "cached_images_per_sec": cached["images_per_sec"],
            "cached_vs_torchvision": cached["images_per_sec"] / torchvision["images_per_sec"],
            "first_decode_vs_torchvision": parallel["images_per_sec"] / torchvision["images_per_sec"],
            "decode_workers_speedup": parallel["images_per_sec"] / single["images_per_sec"],
            "details": {"torchvision": torchvision, "first_decode": parallel, "first_decode_one_worker": single,
                        "cached": cached}}


def time_first_decode(data_dir: Path, image_size: int, cache_dir: Path, workers: int) -> dict:
    """Decode the whole folder into an empty cache; the training split comes back under "train"."""
    options = DecodeOptions(data_size=image_size, decode_workers=workers, cache_dir=str(cache_dir))
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the cache's progress lines are not the benchmark's
        data = load_folder(data_dir, IMAGE_FOLDER, options)
    seconds = time.perf_counter() - started
    images = len(data.train) + len(data.test)
    return {"images_per_sec": images / seconds, "seconds": seconds, "images": images, "workers": workers,
            "train": data.train}


def time_cached_epoch(split: Split, image_size: int, batch_size: int, device: torch.device) -> dict:
    """One shuffled epoch of uint8 batches from the memory-mapped cache, onto `device` and resized there."""
    sampler = EpochBatchSampler(len(split), batch_size, shuffle=True, drop_last=False)
    started, seen = time.perf_counter(), 0
    for images, labels in make_loader(split, sampler, device):
        batch = to_model_input(images.to(device, non_blocking=True), image_size)
        seen += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    del batch
    return {"images_per_sec": seen / seconds, "seconds": seconds, "images": seen}


def time_torchvision(train_dir: Path, image_size: int, batch_size: int, workers: int) -> dict:
    """One epoch of torchvision's ImageFolder pipeline over the training files, decoded afresh as every
    epoch of it decodes them."""
    from torchvision import datasets, transforms
    transform = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                    transforms.ToTensor()])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(train_dir), transform=transform),
                                         batch_size=batch_size, shuffle=True, num_workers=workers)
    started, seen = time.perf_counter(), 0
    for images, labels in loader:
        seen += len(labels)
    seconds = time.perf_counter() - started
    return {"images_per_sec": seen / seconds, "seconds": seconds, "images": seen, "workers": workers}


def format_folder_table(result: dict) -> str:
    rows = [("torchvision ImageFolder", result["torchvision_images_per_sec"]),
            (f"first decode ({result['workers']} workers)", result["first_decode_images_per_sec"]),
            ("first decode (1 worker)", result["first_decode_one_worker_images_per_sec"]),
            ("cached epoch", result["cached_images_per_sec"])]
    lines = [f"images of {result['data_dir']} at {result['image_size']}x{result['image_size']}",
             f"{'measurement':<32}{'images/s':>12}"]
    lines += [f"{name:<32}{value:>12.1f}" for name, value in rows]
    lines.append(f"cached / torchvision {result['cached_vs_torchvision']:.1f}x, first decode / torchvision "
                 f"{result['first_decode_vs_torchvision']:.2f}x, {result['workers']} workers / 1: "
                 f"{result['decode_workers_speedup']:.2f}x")
    return "\n".join(lines)
