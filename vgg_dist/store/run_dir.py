"""The Store: the run directory a run writes into, held by one writer, with its checkpoints and files.

A run writes only into a directory that is new, empty, or its own, and every refusal happens before a
byte is written (docs/checkpoints.md, "Which directory a run writes into").
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path
from typing import Iterator

from accelerate import Accelerator

from vgg_dist.config import TRAIN_CONFIG_NAME, TrainConfig
from vgg_dist.errors import UsageError
from vgg_dist.store import checkpoint
from vgg_dist.store.artifacts import WEIGHTS_NAME, save_weights
from vgg_dist.store.checkpoint import CHECKPOINTS_DIR, RunIdentity
from vgg_dist.store.files import FileError
from vgg_dist.store.lock import LOCK_NAME, RunLock
from vgg_dist.store.run_files import CONFIG_NAME, CURVE_NAME, METRICS_NAME, PICTURES, REPORT_NAME, RunFiles, RunInfo
from vgg_dist.training.dist import on_main, say
from vgg_dist.training.state import TrainState

RUNS_ROOT = Path("runs")
# Everything a run writes at its top level; `--resume auto` refuses a directory holding anything else.
RUN_NAMES = {CONFIG_NAME, TRAIN_CONFIG_NAME, METRICS_NAME, CURVE_NAME, REPORT_NAME, WEIGHTS_NAME, CHECKPOINTS_DIR,
             LOCK_NAME, "tensorboard", *PICTURES}


def _holds_files(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _inside_checkpoints(path: Path) -> Path | None:
    """The run whose checkpoints/ holds `path` (or whose checkpoint `path` is), if any."""
    path = path.resolve()
    for directory in [path, *path.parents]:
        if directory.name == CHECKPOINTS_DIR and (directory.parent / CONFIG_NAME).is_file():
            return directory.parent
    return None


def _compile_cache_entry(path: Path) -> str | None:
    """The entry of `path` that holds $TORCHINDUCTOR_CACHE_DIR, when the user put the compiler's cache in
    the run directory: the compiler creates it, so it belongs there as much as the run's own files."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not cache:
        return None
    inside = Path(cache).absolute().parts[len(path.absolute().parts):]
    return inside[0] if Path(cache).absolute().is_relative_to(path.absolute()) and inside else None


def _not_a_run(path: Path) -> str | None:
    """Why `path` is not a run's own directory (None if it is one, or empty): the first entry no run
    writes, or a run's file without the config.json every run writes first. Temporary files and a lock
    are what an interrupted run leaves, and are its own."""
    entries = [entry.name for entry in sorted(path.iterdir())] if path.is_dir() else []
    runs_own = [name for name in entries if not name.startswith(LOCK_NAME)
                and not (name.startswith(".") and name.endswith(".tmp")) and name != _compile_cache_entry(path)]
    foreign = next((name for name in runs_own if name not in RUN_NAMES), None)
    if foreign is not None:
        return f"holds {foreign!r}, which no vgg_dist run writes"
    if runs_own and CONFIG_NAME not in runs_own:
        return f"holds {runs_own[0]!r} but no {CONFIG_NAME}, which every run writes first"
    return None


def _newer_checkpoints(checkpoint_dir: Path) -> list[str]:
    step = int(match.group(1)) if (match := checkpoint.NAME.match(checkpoint_dir.name)) else -1
    return [path.name for path in checkpoint.list_checkpoints(checkpoint_dir.parent, committed=True)
            if int(path.name.split("_")[1]) > step]


def _path_for_checkpoint(config: TrainConfig) -> Path:
    """The run directory of `--resume PATH`: the checkpoint's own run, or a new, empty --output-dir."""
    if (Path(config.resume) / CONFIG_NAME).is_file():
        raise UsageError(f"--resume {config.resume} is a run directory; continue it with --resume auto --output-dir "
                         f"{config.resume}, or pass one of its checkpoints")
    own_run = _inside_checkpoints(Path(config.resume))
    if config.output_dir is None or (own_run is not None and Path(config.output_dir).resolve() == own_run):
        if own_run is None:
            raise UsageError(f"--resume {config.resume}: not inside a run's {CHECKPOINTS_DIR} directory; pass "
                             f"--output-dir NEW for the resumed run")
        newer = _newer_checkpoints(Path(config.resume).resolve())
        if newer:
            raise UsageError(f"--resume {config.resume}: {own_run} has newer checkpoints ({', '.join(newer)}) that "
                             f"continuing from here would discard; continue the newest with --resume auto, or "
                             f"branch from this one into a new --output-dir")
        return own_run
    path = Path(config.output_dir)
    if _holds_files(path):
        raise UsageError(f"--output-dir {path} holds another run; a resumed run continues in its checkpoint's own "
                         f"run directory ({own_run}) or starts a new, empty one")
    return path


def _refuse_inside_checkpoints(path: Path) -> None:
    """A run directory is never inside a run's checkpoints, a checkpoint, or another run."""
    if (run := _inside_checkpoints(path)) is not None:
        raise UsageError(f"--output-dir {path} is inside the checkpoints of run {run}; a run directory never is")
    resolved = path.resolve()
    for directory in [resolved, *resolved.parents]:
        if (directory / checkpoint.MANIFEST).is_file():
            raise UsageError(f"--output-dir {path} is inside the checkpoint {directory}; a run directory never is")
        if directory != resolved and (directory / CONFIG_NAME).is_file() and (directory / CHECKPOINTS_DIR).is_dir():
            raise UsageError(f"--output-dir {path} is inside the run {directory}, which --resume auto would then "
                             f"refuse to continue; choose a directory outside it")


def choose_path(config: TrainConfig) -> Path:
    """Where this run writes, refusing any directory that holds something else than its own run."""
    if config.resume not in (None, "auto"):
        path = _path_for_checkpoint(config)
    elif config.output_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path, suffix = RUNS_ROOT / stamp, 1
        while path.exists():
            path, suffix = RUNS_ROOT / f"{stamp}-{suffix}", suffix + 1
    else:
        path = Path(config.output_dir)
    _refuse_inside_checkpoints(path)
    if config.resume is None and _holds_files(path):
        raise UsageError(f"--output-dir {path} already exists and is not empty; choose a new directory so no "
                         f"earlier run is overwritten, or pass --resume auto to continue it")
    if config.resume == "auto" and (reason := _not_a_run(path)):
        raise UsageError(f"--output-dir {path} {reason}; --resume auto continues only a run's own directory, "
                         f"so choose a new one")
    if (path / CHECKPOINTS_DIR).exists() and not (path / CHECKPOINTS_DIR).is_dir():
        raise UsageError(f"--output-dir {path}: {path / CHECKPOINTS_DIR} is a file; checkpoints need that name")
    return path


def _create(path: Path) -> list[Path]:
    """mkdir -p, returning the directories it created, deepest first."""
    missing = [directory for directory in [path, *path.parents] if not directory.exists()]
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            pass  # another run made it first; the lock decides who writes
        except OSError as error:
            raise UsageError(f"--output-dir {path}: cannot create {directory} ({error.strerror})") from None
    return missing


def _remove_if_empty(created: list[Path]) -> None:
    for directory in created:
        try:
            directory.rmdir()
        except OSError:
            return


class Store:
    """One run directory: where checkpoints are saved and found, and where the run's files go."""

    def __init__(self, accelerator: Accelerator, run_dir: Path):
        self.accelerator, self.run_dir = accelerator, Path(run_dir)
        self.checkpoints_dir = self.run_dir / CHECKPOINTS_DIR
        self.files = RunFiles(self.run_dir, say=print) if accelerator.is_main_process else None
        self.identity: RunIdentity | None = None

    @classmethod
    @contextlib.contextmanager
    def open(cls, accelerator: Accelerator, config: TrainConfig) -> Iterator[Store]:
        """Choose, create and lock the run directory for the rest of the run. A run refused before it
        wrote anything takes back what this created: the lock, and the directories if still empty."""
        lock, created = None, []

        def take() -> str:
            nonlocal lock, created
            path = choose_path(config)
            created = _create(path)
            try:
                lock = RunLock(path)
                lock.acquire()
            except UsageError:
                lock = None
                _remove_if_empty(created)
                raise
            except OSError as error:
                lock = None
                _remove_if_empty(created)
                raise UsageError(f"--output-dir {path}: cannot take its lock ({error})") from None
            return str(path)

        store = cls(accelerator, Path(on_main(accelerator, take)))
        try:
            yield store
        finally:
            if lock is not None:
                lock.release()
                _remove_if_empty(created)  # only what is still empty: a refused run leaves nothing behind

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; newer ones that do not are named as they are skipped."""
        return checkpoint.find_latest(self.checkpoints_dir, say=lambda line: say(self.accelerator, line))

    def _checkpoint_to_resume(self, config: TrainConfig) -> Path | None:
        if config.resume is None:
            return None
        if config.resume != "auto":
            return Path(config.resume)
        latest = self.latest()
        if latest is None and any((self.run_dir / name).exists() for name in (CONFIG_NAME, METRICS_NAME)):
            raise UsageError(f"--output-dir {self.run_dir} holds a run but no complete checkpoint to resume; choose "
                             f"a new directory so that run is not overwritten")
        return latest

    def restore_or_start(self, state: TrainState, identity: RunIdentity, info: RunInfo) -> TrainState:
        """Continue `state` from the checkpoint --resume names (every check first, on every process), or
        start it fresh; then bring the run's files in line and describe the run in config.json."""
        self.identity = identity
        # Decided once, by the main process, for all: another rank that looked for itself could find the
        # config.json the main process has just written for a fresh run and refuse it as a run without
        # a checkpoint (every rank shares the directory, on several nodes too).
        path = on_main(self.accelerator, lambda: self._checkpoint_to_resume(identity.config))
        if path is None:
            state.seed_fresh_streams()
        else:
            model = self.accelerator.unwrap_model(state.model, keep_torch_compile=False)
            state.load_state_dict(checkpoint.read(path, identity, model, state.optimizer))
        progress = state.progress

        def tidy() -> None:
            kept = self.files.records_to_keep(progress.epoch, progress.global_step)  # all read before any write
            problem = checkpoint.best_pointer_problem(self.checkpoints_dir)
            if problem:  # rotation would not know which checkpoint to spare
                raise FileError(problem)
            for leftover in checkpoint.clean_leftovers(self.checkpoints_dir):
                print(f"removed {leftover}, left by an interrupted save", flush=True)
            self.files.keep(kept)
            info.resumed_from = str(path) if path else None
            self.files.write_info(info)
            self.files.write_train_config(identity.config)

        on_main(self.accelerator, tidy)
        if path is not None:
            say(self.accelerator, f"resumed from {path}: epoch {progress.epoch + 1}, step {progress.step_in_epoch} "
                                  f"of the epoch, global step {progress.global_step}")
        return state

    def save(self, state: TrainState) -> Path:
        """Checkpoint `state` (a collective): every process contributes; the main process writes, commits and
        rotates; all return once the checkpoint exists."""
        state_dict = state.state_dict()
        path = self.checkpoints_dir / checkpoint.checkpoint_name(state.progress.global_step)
        if self.accelerator.is_main_process:
            path = checkpoint.write(self.checkpoints_dir, state_dict, self.identity)
            checkpoint.rotate(self.checkpoints_dir, self.identity.config.keep_last)
        self.accelerator.wait_for_everyone()  # nobody goes on (or exits) before the checkpoint is committed
        return path

    def mark_best(self, path: Path, metric: str, value: float) -> None:
        if self.accelerator.is_main_process:
            checkpoint.mark_best(self.checkpoints_dir, path, metric, value)

    def save_model(self, weights: dict, info: RunInfo) -> None:
        """The run's result: its final weights and config.json with the final metrics (main process)."""
        save_weights(self.run_dir / WEIGHTS_NAME, weights, info.model)
        self.files.write_info(info)
