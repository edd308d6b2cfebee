"""Decoding a split's images in worker processes, each writing straight into the memory-mapped array
the cache keeps, so no decoded image travels back through a pipe.

Workers are forked, as DataLoader's are: they start at once with torch already imported, where spawned
ones would each import torch and the launching script again. Each runs torch on one thread, so no
thread pool inherited from the parent is ever used.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import torch

from vgg_dist.data.folders import SplitItems
from vgg_dist.data.images import ImageError, decode, probe_image

TASKS_PER_WORKER = 4  # small enough tasks that one slow image does not leave the other workers idle
MAX_TASK = 256


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _tasks(count: int, workers: int) -> list[range]:
    step = max(1, min(MAX_TASK, -(-count // (workers * TASKS_PER_WORKER))))
    return [range(start, min(start + step, count)) for start in range(0, count, step)]


def _map(function, tasks: list, workers: int) -> list:
    """`function` over `tasks`, in order: in this process when one worker is asked for (or one task)."""
    if workers <= 1 or len(tasks) <= 1:
        return [function(task) for task in tasks]
    context = multiprocessing.get_context("fork")
    with context.Pool(min(workers, len(tasks)), initializer=_start_worker) as pool:
        results = pool.map(function, tasks, chunksize=1)
        pool.close()  # let the workers leave on their own rather than be terminated
        pool.join()
    return results


def _start_worker() -> None:
    """A forked worker inherits the run's stop-signal handlers, which note a SIGTERM and carry on: the
    pool's own SIGTERM would then never end it. It dies of SIGTERM again, and leaves Ctrl-C to the run."""
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)  # the parallelism is the workers'; threads inside each only fight over cores


def _probe_task(task: tuple[list[str], list[bytes | None]]) -> list:
    results = []
    for name, blob in zip(*task):
        try:
            results.append(probe_image(Path(name), blob))
        except ImageError as error:
            results.append(str(error))
    return results


def probe(items: SplitItems, workers: int) -> list[tuple[bool, int, int] | str]:
    """Each image's (grey, height, width) from its header, or the one-line reason it cannot be read."""
    tasks = [(items.names[part.start:part.stop], items.blobs[part.start:part.stop])
             for part in _tasks(len(items.names), workers)]
    return [result for results in _map(_probe_task, tasks, workers) for result in results]


def _decode_task(task: tuple[str, int, list[str], list[bytes | None], int, tuple[int, int]]) -> list[tuple[int, str]]:
    array_path, start, names, blobs, channels, size = task
    array = np.load(array_path, mmap_mode="r+")
    bad = []
    for offset, (name, blob) in enumerate(zip(names, blobs)):
        try:
            array[start + offset] = decode(Path(name), channels, size, blob).numpy()
        except ImageError as error:
            bad.append((start + offset, str(error)))
    array.flush()
    return bad


def decode_into(array_path: Path, items: SplitItems, channels: int, size: tuple[int, int],
                workers: int) -> list[tuple[int, str]]:
    """Decode every image into the uint8 [N, channels, *size] .npy at `array_path` (already created);
    returns (index, reason) for each image that could not be decoded, its row left as zeros."""
    tasks = [(str(array_path), part.start, items.names[part.start:part.stop], items.blobs[part.start:part.stop],
              channels, size) for part in _tasks(len(items.names), workers)]
    return [failure for failures in _map(_decode_task, tasks, workers) for failure in failures]
