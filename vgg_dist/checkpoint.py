"""Checkpoints that are complete or absent: safetensors + JSON only, committed by an atomic rename.

Layout of one checkpoint, `RUN_DIR/checkpoints/step_0000420/`:

    model.safetensors      unwrapped weights (model spec in the header)
    optimizer.safetensors  optimizer tensors; their structure is in state.json
    rng.safetensors        every rank's torch (and CUDA) generator state
    state.json             progress (epoch, step, global step, sampler), optimizer structure, grad
                           scaler, Python/NumPy RNG, partial epoch metrics, the resolved config
    manifest.json          written last: every file with its size and SHA-256. No manifest, no checkpoint.

The directory is written under a temporary name and renamed into place only when complete, so a crash
at any moment leaves either the previous checkpoints untouched or a leftover `.tmp-*` directory that is
ignored and later cleaned. Nothing here unpickles anything: loading cannot run code from a checkpoint.
This module is plain file I/O; deciding when and on which rank to save is the trainer's job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vgg_dist.atomic import fsync_path, write_json
from vgg_dist.errors import UsageError

MANIFEST = "manifest.json"
STATE = "state.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_POINTER = "best.json"
_NAME = re.compile(r"^step_(\d{7,})$")
_TEMPORARY_PREFIX = ".tmp-"
FORMAT_VERSION = 2  # 2: best_acc, the learning-rate schedule and EMA weights
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_MANIFEST_BYTES = 1 << 20


class CheckpointError(UsageError):
    """A checkpoint that must not be loaded; the message names its path and the problem."""


def checkpoint_name(global_step: int) -> str:
    return f"step_{global_step:07d}"


def split_tensors(value, prefix: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested dict/list structure by {"tensor": key}; return both halves.

    This is how an optimizer's state_dict is stored without pickle: numbers and structure in JSON,
    tensors in safetensors.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().to("cpu").contiguous()
            return {"tensor": path}
        if isinstance(node, dict):
            for key in node:
                if not isinstance(key, (str, int)):
                    raise TypeError(f"cannot store key {key!r} of type {type(key).__name__} at {path}")
            # JSON keys are strings; remember which were integers (optimizer state is keyed by int).
            return {"dict": [[key, walk(item, f"{path}.{key}")] for key, item in node.items()]}
        if isinstance(node, (list, tuple)):
            return {"tuple" if isinstance(node, tuple) else "list":
                    [walk(item, f"{path}.{index}") for index, item in enumerate(node)]}
        if node is None or isinstance(node, (bool, int, float, str)):
            return {"value": node}
        raise TypeError(f"cannot store {type(node).__name__} at {path} without pickle")

    return walk(value, prefix or "state"), tensors


def join_tensors(structure, tensors: dict[str, torch.Tensor]):
    """Inverse of `split_tensors`; ValueError for anything `split_tensors` cannot have written."""
    if not isinstance(structure, dict) or len(structure) != 1:
        raise ValueError(f"expected one {{kind: payload}} node, got {str(structure)[:60]}")
    (kind, payload), = structure.items()
    if kind == "tensor":
        if not isinstance(payload, str) or payload not in tensors:
            raise ValueError(f"refers to a missing tensor {str(payload)[:60]}")
        return tensors[payload]
    if kind == "dict" and isinstance(payload, list) and all(
            isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int)) for pair in payload):
        return {key: join_tensors(item, tensors) for key, item in payload}
    if kind in ("list", "tuple") and isinstance(payload, list):
        items = [join_tensors(item, tensors) for item in payload]
        return items if kind == "list" else tuple(items)
    if kind == "value" and (payload is None or isinstance(payload, (bool, int, float, str))):
        return payload
    raise ValueError(f"malformed {kind!r} node")


def _sha256(path: Path, limit: int | None = None) -> str:
    """SHA-256 of the file's first `limit` bytes (all of it when None)."""
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as handle:
        while remaining is None or remaining > 0:
            block = handle.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()


def save_checkpoint(checkpoints_dir: Path, global_step: int,
                    tensor_files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]],
                    state: dict) -> Path:
    """Write a complete checkpoint and commit it by renaming; return its final path.

    `tensor_files` maps a file name to (tensors, header metadata); `state` goes to state.json.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / checkpoint_name(global_step)
    temporary = checkpoints_dir / f"{_TEMPORARY_PREFIX}{final.name}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    for name, (tensors, metadata) in tensor_files.items():
        # Never an empty metadata dict: safetensors 0.8 writes an unreadable header for {} with no tensors
        # (plain SGD has no optimizer tensors).
        save_file({key: value.detach().to("cpu").contiguous() for key, value in tensors.items()},
                  temporary / name, metadata={"vgg_dist.file": name, **metadata})
    (temporary / STATE).write_text(json.dumps(state, indent=1) + "\n")
    files = sorted(path.name for path in temporary.iterdir())
    for name in files:
        fsync_path(temporary / name)
    manifest = {"format_version": FORMAT_VERSION, "global_step": global_step,
                "files": {name: {"bytes": (temporary / name).stat().st_size, "sha256": _sha256(temporary / name)}
                          for name in files}}
    (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    fsync_path(temporary / MANIFEST)
    fsync_path(temporary)
    if final.exists():  # an earlier attempt at this very step, e.g. before a requeue: replace it whole
        stale = checkpoints_dir / f"{_TEMPORARY_PREFIX}stale-{final.name}-{os.getpid()}"
        os.replace(final, stale)
        os.replace(temporary, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(temporary, final)
    fsync_path(checkpoints_dir)
    return final


def mark_best(checkpoints_dir: Path, path: Path, metric: str, value: float) -> None:
    write_json(checkpoints_dir / BEST_POINTER, {"checkpoint": path.name, metric: value})


def best_checkpoint(checkpoints_dir: Path) -> str | None:
    try:
        return json.loads((checkpoints_dir / BEST_POINTER).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def rotate(checkpoints_dir: Path, keep_last: int) -> list[Path]:
    """Delete committed checkpoints beyond the newest `keep_last`, never the best one. Call only after
    the newest checkpoint is committed, so a crash here cannot leave fewer than `keep_last`."""
    best = best_checkpoint(checkpoints_dir)
    committed = [path for path in list_checkpoints(checkpoints_dir) if (path / MANIFEST).is_file()]
    removed = []
    for path in committed[:-keep_last] if keep_last > 0 else []:
        if path.name != best:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def clean_leftovers(checkpoints_dir: Path) -> list[Path]:
    """Remove temporary directories that a crashed save left behind."""
    leftovers = [path for path in checkpoints_dir.glob(f"{_TEMPORARY_PREFIX}*")] if checkpoints_dir.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoint directories by global step, oldest first (complete or not)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in checkpoints_dir.iterdir()
             if path.is_dir() and (match := _NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def verify(path: Path) -> dict:
    """Check a checkpoint against its manifest (file list, sizes, hashes) and that every tensor file is
    valid safetensors; return the manifest. Raises CheckpointError naming the path and the problem.

    Only regular files are read, and no more of each than the manifest's size: a file swapped for a
    link to /dev/zero or a FIFO is refused instead of read forever.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    manifest = _read_manifest(path)
    files = manifest["files"]
    present = {entry.name for entry in path.iterdir()} - {MANIFEST}
    if present != set(files):
        missing, extra = sorted(set(files) - present), sorted(present - set(files))
        raise CheckpointError(f"{path}: files differ from the manifest (missing {missing or 'none'}, "
                              f"unexpected {extra or 'none'})")
    for name, expected in files.items():
        size = _regular_file_size(path / name)
        if size != expected["bytes"]:
            raise CheckpointError(f"{path / name}: {size} bytes, the manifest says {expected['bytes']} "
                                  f"(truncated or appended to)")
        if _sha256(path / name, limit=size) != expected["sha256"]:
            raise CheckpointError(f"{path / name}: contents do not match the manifest's SHA-256")
    for name in files:
        if name.endswith(".safetensors"):
            read_header(path / name)
    return manifest


def _regular_file_size(path: Path) -> int:
    """The size of a plain file; a link, device, FIFO or directory is refused."""
    mode = path.lstat().st_mode
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a link, device or pipe has no place in a checkpoint)")
    return path.lstat().st_size


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    try:
        size = _regular_file_size(manifest_path)
        if size > _MAX_MANIFEST_BYTES:
            raise CheckpointError(f"{manifest_path}: {size} bytes is too large for a manifest")
        manifest = json.loads(manifest_path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST})") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path}: unreadable manifest (not a JSON object)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format_version')!r} is not "
                              f"{FORMAT_VERSION}; it was written by another vgg_dist version")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{manifest_path}: 'files' must map file names to their size and SHA-256")
    for name, entry in files.items():
        if not isinstance(entry, dict) or Path(name).name != name or name in (".", "..", MANIFEST):
            raise CheckpointError(f"{manifest_path}: bad entry {name!r}")
        size, digest = entry.get("bytes"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CheckpointError(f"{manifest_path}: entry {name!r} needs a byte count")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise CheckpointError(f"{manifest_path}: entry {name!r} needs a SHA-256 hex digest")
    return manifest


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    """(metadata, {tensor name: (dtype, shape)}) from a safetensors header, loading no tensor data."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            layout = {}
            for key in handle.keys():
                sliced = handle.get_slice(key)
                layout[key] = (sliced.get_dtype(), list(sliced.get_shape()))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(error).splitlines()[0]})") from None
    return metadata, layout


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(error).splitlines()[0]})") from None


def read_state(path: Path) -> dict:
    """state.json of a checkpoint that `verify` accepted."""
    try:
        state = json.loads((Path(path) / STATE).read_bytes())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / STATE}: unreadable ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE}: not a JSON object")
    return state


def find_latest(checkpoints_dir: Path, say: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported through `say`."""
    for path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify(path)
            return path
        except CheckpointError as error:
            say(f"skipping {error}")
    return None
