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
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vgg_dist.artifacts import fsync_path, write_json
from vgg_dist.errors import UsageError

MANIFEST = "manifest.json"
STATE = "state.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_POINTER = "best.json"
_NAME = re.compile(r"^step_(\d{7,})$")
_TEMPORARY_PREFIX = ".tmp-"
FORMAT_VERSION = 1


class CheckpointError(UsageError):
    """A checkpoint that must not be loaded; the message names its path and the problem."""


def checkpoint_name(global_step: int) -> str:
    return f"step_{global_step:07d}"


# ---- Nested state <-> (JSON, tensors) ---------------------------------------------------------------

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
    """Inverse of `split_tensors`."""
    (kind, payload), = structure.items()
    if kind == "tensor":
        return tensors[payload]
    if kind == "dict":
        return {key: join_tensors(item, tensors) for key, item in payload}
    if kind == "list":
        return [join_tensors(item, tensors) for item in payload]
    if kind == "tuple":
        return tuple(join_tensors(item, tensors) for item in payload)
    if kind == "value":
        return payload
    raise ValueError(f"unknown node kind {kind!r}")


# ---- Writing ----------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
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


def mark_best(checkpoints_dir: Path, path: Path, metric: float) -> None:
    write_json(checkpoints_dir / BEST_POINTER, {"checkpoint": path.name, "test_acc": metric})


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


# ---- Reading ----------------------------------------------------------------------------------------

def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoint directories by global step, oldest first (complete or not)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in checkpoints_dir.iterdir()
             if path.is_dir() and (match := _NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def verify(path: Path) -> dict:
    """Check a checkpoint against its manifest (file list, sizes, hashes) and that every tensor file is
    valid safetensors; return the manifest. Raises CheckpointError naming the path and the problem."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST})") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path / MANIFEST}: unreadable manifest ({error})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format_version')!r} is not "
                              f"{FORMAT_VERSION}; it was written by another vgg_dist version")
    present = {entry.name for entry in path.iterdir()} - {MANIFEST}
    if present != set(files):
        missing, extra = sorted(set(files) - present), sorted(present - set(files))
        raise CheckpointError(f"{path}: files differ from the manifest (missing {missing or 'none'}, "
                              f"unexpected {extra or 'none'})")
    for name, expected in files.items():
        size = (path / name).stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path / name}: {size} bytes, the manifest says {expected['bytes']} "
                                  f"(truncated or appended to)")
        if _sha256(path / name) != expected["sha256"]:
            raise CheckpointError(f"{path / name}: contents do not match the manifest's SHA-256")
    for name in files:
        if name.endswith(".safetensors"):
            read_header(path / name)
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
    try:
        return json.loads((Path(path) / STATE).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / STATE}: unreadable ({error})") from None


def find_latest(checkpoints_dir: Path, say: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported through `say`."""
    for path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify(path)
            return path
        except CheckpointError as error:
            say(f"skipping {error}")
    return None
