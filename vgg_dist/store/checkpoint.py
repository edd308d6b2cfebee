"""Checkpoints that are complete or absent: safetensors + JSON only, committed by an atomic rename.

`RUN_DIR/checkpoints/step_0000420/` holds model, EMA, optimizer and generator tensors as safetensors,
state.json (progress, the epoch's sums, the optimizer's structure, schedule, spec and flags), and
manifest.json, written last: no manifest, no checkpoint. Nothing here unpickles anything, and reading
checks every field against the run that resumes before anything is changed (docs/checkpoints.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from vgg_dist.cli import flag
from vgg_dist.config import TrainConfig
from vgg_dist.fields import short
from vgg_dist.model import ModelSpec
from vgg_dist.store.files import (FileError, check_weights_header, fsync_path, load_tensors, no_space, read_header,
                                  read_json, read_record, regular_file_size, save_tensors, write_failed, write_json)
from vgg_dist.training.optim import LRSchedule, check_optimizer_state
from vgg_dist.training.state import EpochSums, Progress, rng_state_problem

MANIFEST, STATE, CHECKPOINTS_DIR, BEST_POINTER = "manifest.json", "state.json", "checkpoints", "best.json"
WEIGHTS_FILE, EMA_FILE = "model.safetensors", "ema.safetensors"
OPTIMIZER_FILE, RNG_FILE = "optimizer.safetensors", "rng.safetensors"
SPEC_METADATA_KEY = "vgg_dist.model_spec"
FORMAT_VERSION = 3  # 3: state.json and the manifest as checked dataclasses
NAME = re.compile(r"^step_(\d{7,})$")
TEMPORARY_PREFIX = ".tmp-"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Flags that fix which images each step sees; a checkpoint only continues a run that agrees on them.
DATA_ORDER_FLAGS = ("batch_size", "seed", "dataset", "max_train_samples", "val_split")
# Every flag a resumed run must share with its checkpoint, and what would change midway otherwise.
# The optimizer's own settings are restored with its state, so a flag that said otherwise would be ignored.
OVERRULED = "the optimizer's settings come from the checkpoint, not the flags"
RESUME_MUST_MATCH = {**dict.fromkeys(DATA_ORDER_FLAGS, "the data order would change"),
                     "optimizer": "its optimizer state would not carry over",
                     "weight_decay": OVERRULED,
                     "freeze_features": "which parameters train, and the BatchNorm statistics, would change",
                     "feature_lr_scale": "the convolutions would change learning rate",
                     "model_ema": "the weights' average would start or stop"}
OPTIMIZER_SETTINGS = {"sgd": ("momentum", "nesterov"), "adamw": ("beta1", "beta2")}  # besides weight_decay

CheckpointError = FileError  # a checkpoint that must not be loaded; the message names its path and the problem


@dataclasses.dataclass
class FileEntry:
    bytes: int
    sha256: str


@dataclasses.dataclass
class Manifest:
    format_version: int
    global_step: int
    files: dict[str, FileEntry]


@dataclasses.dataclass
class SavedState:
    """state.json."""

    progress: Progress
    partial_epoch_totals: EpochSums  # all processes' sums together, so any world size can resume them
    world_size: int
    optimizer: object                # the optimizer's state_dict with its tensors replaced by references
    grad_scaler: dict[str, object] | None
    lr_schedule: dict[str, object]
    rng: list[dict[str, object]]     # every rank's Python and NumPy generator state
    model: ModelSpec
    flags: TrainConfig
    saved_at: str


@dataclasses.dataclass(kw_only=True)
class RunIdentity:
    """What a checkpoint must agree with to continue this run."""

    spec: ModelSpec
    config: TrainConfig
    schedule: LRSchedule
    steps_per_epoch: int


def checkpoint_name(global_step: int) -> str:
    return f"step_{global_step:07d}"


def weights_metadata(spec: ModelSpec) -> dict[str, str]:
    """Header entries that let a weights file be checked against a model before loading it."""
    return {"format": "pt", SPEC_METADATA_KEY: json.dumps(spec.to_dict(), sort_keys=True)}


def split_tensors(value, path: str = "state") -> tuple[object, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested dict/list structure by {"tensor": key}; return both halves. This is
    how an optimizer's state_dict is stored without pickle: structure in JSON, tensors in safetensors.
    JSON keys are strings, so a dict is stored as [key, value] pairs (optimizer state is keyed by int)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, at):
        if isinstance(node, torch.Tensor):
            tensors[at] = node
            return {"tensor": at}
        if isinstance(node, dict):
            return {"dict": [[key, walk(item, f"{at}.{key}")] for key, item in node.items()]}
        if isinstance(node, (list, tuple)):
            return {type(node).__name__: [walk(item, f"{at}.{index}") for index, item in enumerate(node)]}
        if node is None or isinstance(node, (bool, int, float, str)):
            return {"value": node}
        raise TypeError(f"cannot store {type(node).__name__} at {at} without pickle")

    return walk(value, path), tensors


def join_tensors(structure, tensors: dict[str, torch.Tensor]):
    """Inverse of `split_tensors`; ValueError for anything `split_tensors` cannot have written."""
    if not isinstance(structure, dict) or len(structure) != 1:
        raise ValueError(f"expected one {{kind: payload}} node, got {short(structure)}")
    (kind, payload), = structure.items()
    if kind == "tensor" and isinstance(payload, str) and payload in tensors:
        return tensors[payload]
    if kind == "dict" and isinstance(payload, list) and all(
            isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int)) for pair in payload):
        return {key: join_tensors(item, tensors) for key, item in payload}
    if kind in ("list", "tuple") and isinstance(payload, list):
        items = [join_tensors(item, tensors) for item in payload]
        return items if kind == "list" else tuple(items)
    if kind == "value" and (payload is None or isinstance(payload, (bool, int, float, str))):
        return payload
    raise ValueError(f"malformed {short(kind)} node")


def _sha256(path: Path, limit: int) -> str:
    """SHA-256 of the file's first `limit` bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while limit > 0 and (block := handle.read(min(1 << 20, limit))):
            digest.update(block)
            limit -= len(block)
    return digest.hexdigest()


def _files(state: dict, identity: RunIdentity) -> tuple[dict, SavedState]:
    """A TrainState's state dict as tensor files ({name: (tensors, metadata)}) and state.json."""
    structure, optimizer_tensors = split_tensors(state["optimizer"], "optimizer")
    rng = {f"rank{rank}.{kind}": tensor for rank, (tensors, _) in enumerate(state["rng"])
           for kind, tensor in tensors.items()}
    tensor_files = {WEIGHTS_FILE: (state["model"], weights_metadata(identity.spec)),
                    OPTIMIZER_FILE: (optimizer_tensors, {}), RNG_FILE: (rng, {})}
    if state["ema"] is not None:
        tensor_files[EMA_FILE] = (state["ema"], weights_metadata(identity.spec))
    saved = SavedState(progress=state["progress"], partial_epoch_totals=state["sums"], world_size=len(state["rng"]),
                       optimizer=structure, grad_scaler=state["scaler"], lr_schedule=identity.schedule.describe(),
                       rng=[json_state for _, json_state in state["rng"]], model=identity.spec,
                       flags=identity.config, saved_at=datetime.datetime.now(datetime.timezone.utc).isoformat())
    return tensor_files, saved


def write(checkpoints_dir: Path, state: dict, identity: RunIdentity) -> Path:
    """Write a complete checkpoint of a TrainState's state dict and commit it by renaming; return its path.
    A full disk is one line (WriteFailed) and leaves the committed checkpoints as they were."""
    tensor_files, saved = _files(state, identity)
    step = saved.progress.global_step
    checkpoints_dir.mkdir(exist_ok=True)
    final = checkpoints_dir / checkpoint_name(step)
    temporary = checkpoints_dir / f"{TEMPORARY_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir()
        for name, (tensors, metadata) in tensor_files.items():
            save_tensors(temporary / name, tensors, metadata)
        write_json(temporary / STATE, dataclasses.asdict(saved))
        entries = {path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path, path.stat().st_size)}
                   for path in sorted(temporary.iterdir())}
        write_json(temporary / MANIFEST, {"format_version": FORMAT_VERSION, "global_step": step, "files": entries})
        fsync_path(temporary)
    except Exception as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if no_space(error):
            needed = sum(t.numel() * t.element_size() for tensors, _ in tensor_files.values() for t in tensors.values())
            raise write_failed(checkpoints_dir, needed, f"checkpoint {final.name}") from None
        raise
    stale = checkpoints_dir / f"{TEMPORARY_PREFIX}stale-{final.name}-{os.getpid()}"
    if final.exists():  # an earlier attempt at this very step, e.g. before a requeue: replace it whole
        os.replace(final, stale)
    os.replace(temporary, final)
    shutil.rmtree(stale, ignore_errors=True)
    fsync_path(checkpoints_dir)
    return final


def list_checkpoints(checkpoints_dir: Path, committed: bool = False) -> list[Path]:
    """Checkpoint directories by global step, oldest first; with `committed`, only those with a manifest."""
    if not checkpoints_dir.is_dir():
        return []
    # A link is not the run's own checkpoint: never resumed from, never rotated away.
    found = sorted((int(match.group(1)), path) for path in checkpoints_dir.iterdir()
                   if (match := NAME.match(path.name)) and path.is_dir() and not path.is_symlink())
    return [path for _, path in found if not committed or (path / MANIFEST).is_file()]


def mark_best(checkpoints_dir: Path, path: Path, metric: str, value: float) -> None:
    write_json(checkpoints_dir / BEST_POINTER, {"checkpoint": path.name, metric: value})


def best_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The checkpoint best.json names; only a step_N directory inside `checkpoints_dir` is taken."""
    try:
        name = read_json(checkpoints_dir / BEST_POINTER)["checkpoint"]
    except (FileError, KeyError, TypeError):
        return None
    return checkpoints_dir / name if isinstance(name, str) and NAME.match(name) else None


def best_pointer_problem(checkpoints_dir: Path) -> str | None:
    """Why best.json cannot be used, when it is there; None when it is absent or names a step_N here."""
    pointer = checkpoints_dir / BEST_POINTER
    if not os.path.lexists(pointer) or best_checkpoint(checkpoints_dir) is not None:
        return None
    return (f"{pointer}: does not name a step_N checkpoint in {checkpoints_dir}; restore it, or remove it and "
            f"the next epochs choose the best again")


def rotate(checkpoints_dir: Path, keep_last: int) -> None:
    """Delete committed checkpoints beyond the newest `keep_last`, never the best one. Call only after
    the newest checkpoint is committed, so a crash here cannot leave fewer than `keep_last`. While a
    best.json is there that names no checkpoint, nothing is deleted: the best one is not known."""
    best = best_checkpoint(checkpoints_dir)
    if keep_last <= 0 or (best is None and os.path.lexists(checkpoints_dir / BEST_POINTER)):
        return
    for path in list_checkpoints(checkpoints_dir, committed=True)[:-keep_last]:
        if path != best:
            shutil.rmtree(path)


def clean_leftovers(checkpoints_dir: Path) -> list[Path]:
    """Remove temporary directories that a crashed save left behind."""
    leftovers = list(checkpoints_dir.glob(f"{TEMPORARY_PREFIX}*")) if checkpoints_dir.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def verify(path: Path) -> Manifest:
    """Check a checkpoint against its manifest (file list, sizes, hashes) and that every tensor file is
    valid safetensors. Only regular files are read, and no more of each than the manifest's size: a file
    swapped for a link to /dev/zero or a FIFO is refused instead of read forever."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not (path / MANIFEST).exists():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST})")
    manifest = read_record(path / MANIFEST, Manifest)
    if manifest.format_version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.format_version} is not {FORMAT_VERSION}; it "
                              f"was written by another vgg_dist version")
    if (named := NAME.match(path.name)) and int(named.group(1)) != manifest.global_step:
        raise CheckpointError(f"{path}: its manifest is of global step {manifest.global_step}; a checkpoint keeps "
                              f"the name {checkpoint_name(manifest.global_step)} it was saved under")
    present = {entry.name for entry in path.iterdir()} - {MANIFEST}
    if present != set(manifest.files):
        missing, extra = sorted(set(manifest.files) - present), sorted(present - set(manifest.files))
        raise CheckpointError(f"{path}: files differ from the manifest (missing {missing or 'none'}, "
                              f"unexpected {extra or 'none'})")
    for name, entry in manifest.files.items():
        if entry.bytes < 0 or not _SHA256.match(entry.sha256):
            raise CheckpointError(f"{path / MANIFEST}: entry {short(name)} needs a byte count and a SHA-256")
        if (size := regular_file_size(path / name)) != entry.bytes:
            raise CheckpointError(f"{path / name}: {size} bytes, the manifest says {entry.bytes} "
                                  f"(truncated or appended to)")
        if _sha256(path / name, size) != entry.sha256:
            raise CheckpointError(f"{path / name}: contents do not match the manifest's SHA-256")
        if name.endswith(".safetensors"):
            read_header(path / name)
    return manifest


def find_latest(checkpoints_dir: Path, say: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported through `say`."""
    for path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify(path)
            return path
        except FileError as error:
            say(f"skipping {error}")
    return None


def read(path: Path, identity: RunIdentity, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A checkpoint as a TrainState state dict, verified in full and checked to continue this run (the same
    model, data order, schedule, EMA; every field's type and range; every rank's generator states);
    CheckpointError otherwise. Changes nothing."""
    manifest = verify(path)
    saved = read_record(path / STATE, SavedState)
    _check_same_run(path, saved, identity)
    if problem := _progress_problem(saved, identity, manifest.global_step):
        raise CheckpointError(f"{path / STATE}: {problem}")
    try:
        optimizer_state = join_tensors(saved.optimizer, load_tensors(path / OPTIMIZER_FILE))
        check_optimizer_state(optimizer_state, optimizer)
    except (ValueError, TypeError, KeyError, RecursionError) as error:
        raise CheckpointError(f"{path / STATE}: optimizer state does not fit this optimizer ({error})") from None
    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    weights = {}
    for name in (WEIGHTS_FILE, EMA_FILE) if identity.config.model_ema else (WEIGHTS_FILE,):
        check_weights_header(path / name, shapes, SPEC_METADATA_KEY, "the model")
        weights[name] = load_tensors(path / name)
    return {"progress": saved.progress, "sums": saved.partial_epoch_totals, "model": weights[WEIGHTS_FILE],
            "ema": weights.get(EMA_FILE), "optimizer": optimizer_state, "scaler": saved.grad_scaler,
            "rng": _read_every_rank_rng(path, saved)}


def _check_same_run(path: Path, saved: SavedState, identity: RunIdentity) -> None:
    spec, config = identity.spec, identity.config
    if saved.model != spec:
        changed = [f"{key} {value} here {getattr(spec, key)}" for key, value in saved.model.to_dict().items()
                   if getattr(spec, key) != value]
        raise CheckpointError(f"{path}: holds a different model ({', '.join(changed)}); resume with the flags "
                              f"it was trained with")
    settings = dict.fromkeys(OPTIMIZER_SETTINGS.get(config.optimizer, ()), OVERRULED)
    for name, otherwise in {**RESUME_MUST_MATCH, **settings}.items():
        was, now = getattr(saved.flags, name), getattr(config, name)
        if was != now and isinstance(was, bool):
            had = "with" if was else "without"
            raise CheckpointError(f"{path}: was trained {had} {flag(name)}; resume {had} it: otherwise {otherwise}")
        if was != now:
            raise CheckpointError(f"{path}: was trained with {flag(name)} {_shown(was)}, not {_shown(now)}; "
                                  f"{otherwise}, so pass the same value")
    if saved.lr_schedule != identity.schedule.describe():
        raise CheckpointError(f"{path}: follows the learning-rate schedule {short(saved.lr_schedule)}, this run "
                              f"{identity.schedule.describe()}; pass the same --lr, --lr-schedule, --warmup-epochs "
                              f"and --epochs so the resumed run continues the same curve")


def _shown(value) -> str:
    return value if isinstance(value, str) and len(value) <= 60 else short(value)


def _progress_problem(saved: SavedState, identity: RunIdentity, manifest_step: int) -> str | None:
    """What is wrong with the saved progress, sums and world size, judged against this run's data and length."""
    progress, sums, steps = saved.progress, saved.partial_epoch_totals, identity.steps_per_epoch
    epochs, samples = identity.config.epochs, progress.step_in_epoch * identity.config.batch_size
    negative = [name for name in ("epoch", "step_in_epoch", "global_step") if getattr(progress, name) < 0]
    if negative:
        return f"progress.{negative[0]} must be a whole number of at least 0, got {getattr(progress, negative[0])}"
    if progress.best_acc is not None and not 0 <= progress.best_acc <= 1:
        return f"progress.best_acc must be null or in [0, 1], got {progress.best_acc}"
    if progress.step_in_epoch > steps:
        return f"progress.step_in_epoch {progress.step_in_epoch} is beyond the {steps} steps an epoch has on this data"
    if progress.global_step != progress.epoch * steps + progress.step_in_epoch:
        return (f"progress.global_step {progress.global_step} is not epoch {progress.epoch} x {steps} steps + "
                f"{progress.step_in_epoch}; was it trained on other data?")
    needed = progress.epoch + (progress.step_in_epoch > 0)  # the epoch in progress, or the last one finished
    if needed > epochs:
        return (f"the checkpoint has reached epoch {needed}, past the end of a {epochs}-epoch run; pass --epochs "
                f"{needed} or more")
    if sums.samples != samples:
        return f"partial_epoch_totals count {sums.samples:g} samples where the progress implies {samples}"
    if min(sums.loss, sums.correct) < 0 or sums.correct > sums.samples:
        return "partial_epoch_totals need a loss and a correct count of at least 0, and no more correct than samples"
    if saved.world_size < 1 or len(saved.rng) != saved.world_size:
        return f"world_size must be a positive integer with one 'rng' entry per rank, got {saved.world_size}"
    if progress.global_step != manifest_step:
        return f"progress.global_step {progress.global_step} is not the manifest's {manifest_step}"
    return None


def _read_every_rank_rng(path: Path, saved: SavedState) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """Every saved rank's generator states, each one checked: a resume that could not continue every
    stream exactly is refused."""
    tensors, every_rank = load_tensors(path / RNG_FILE), []
    for rank, json_state in enumerate(saved.rng):
        mine = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.startswith(f"rank{rank}.")}
        if problem := rng_state_problem(mine, json_state):
            raise CheckpointError(f"{path}: random generator state of rank {rank} is unusable ({problem}); "
                                  f"resuming would not continue the run exactly")
        every_rank.append((mine, json_state))
    return every_rank
