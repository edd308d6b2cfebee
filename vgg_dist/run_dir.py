"""The run directory: which one a run writes into, held by one writer, and which checkpoint a resume
continues from.

A run writes only into a directory that is new or empty, or that is its own run's: `--resume auto`
continues the run in --output-dir, and `--resume RUN/checkpoints/step_N` continues RUN (or starts
a new, empty --output-dir from that checkpoint). Anything else is refused before a byte is written.
"""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path
from typing import Iterator

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from vgg_dist import checkpoint
from vgg_dist.accelerated import say
from vgg_dist.artifacts import CONFIG_NAME
from vgg_dist.config import TrainConfig
from vgg_dist.errors import UsageError
from vgg_dist.run_files import METRICS_NAME
from vgg_dist.run_lock import RunLock

RUNS_ROOT = Path("runs")


def _holds_files(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def choose_path(config: TrainConfig) -> Path:
    """Where this run writes, refusing any directory that holds another run."""
    if config.resume not in (None, "auto"):
        checkpoint_dir = Path(config.resume).resolve()
        own_run = checkpoint_dir.parent.parent
        is_in_a_run = checkpoint_dir.parent.name == checkpoint.CHECKPOINTS_DIR and (own_run / CONFIG_NAME).is_file()
        if config.output_dir is None:
            if not is_in_a_run:
                raise UsageError(f"--resume {config.resume}: not inside a run's {checkpoint.CHECKPOINTS_DIR} "
                                 f"directory; pass --output-dir NEW for the resumed run")
            return own_run
        path = Path(config.output_dir)
        if _holds_files(path) and not (is_in_a_run and path.resolve() == own_run):
            raise UsageError(f"--output-dir {path} holds another run; a resumed run continues in its checkpoint's "
                             f"own run directory ({own_run}) or starts a new, empty one")
        return path
    if config.output_dir is not None:
        return Path(config.output_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, suffix = RUNS_ROOT / stamp, 1
    while path.exists():
        path, suffix = RUNS_ROOT / f"{stamp}-{suffix}", suffix + 1
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
    """Undo `_create` as far as the directories are still empty."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def hold_run_dir(accelerator: Accelerator, config: TrainConfig) -> Iterator[Path]:
    """Choose, create and lock the run directory for the rest of the run; every process gets its path.

    If the run is refused before it writes anything (a bad checkpoint, say), what this created is
    removed again: the lock, and the directories if they are still empty.
    """
    outcome, lock, created = [None], None, []
    if accelerator.is_main_process:
        try:
            path = choose_path(config)
            if (path / checkpoint.CHECKPOINTS_DIR).exists() and not (path / checkpoint.CHECKPOINTS_DIR).is_dir():
                raise UsageError(f"--output-dir {path}: {path / checkpoint.CHECKPOINTS_DIR} is a file; checkpoints "
                                 f"need that name for a directory")
            created = _create(path)
            lock = RunLock(path)
            try:
                lock.acquire()
            except OSError as error:
                raise UsageError(f"--output-dir {path}: cannot take its lock ({error})") from None
            outcome = [("path", str(path))]
        except UsageError as error:
            lock = None
            _remove_if_empty(created)
            outcome = [("error", str(error))]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind == "error":
        raise UsageError(value)
    try:
        yield Path(value)
    except BaseException:
        if lock is not None:
            lock.release()
            lock = None
            _remove_if_empty(created)
        raise
    finally:
        if lock is not None:
            lock.release()


def resolve_resume(accelerator: Accelerator, config: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None to start fresh."""
    if config.resume is None:
        return None
    if config.resume != "auto":
        return Path(config.resume)
    latest = checkpoint.find_latest(run_dir / checkpoint.CHECKPOINTS_DIR, say=lambda line: say(accelerator, line))
    if latest is None and any((run_dir / name).exists() for name in (CONFIG_NAME, METRICS_NAME)):
        raise UsageError(f"--output-dir {run_dir} holds a run but no complete checkpoint to resume; "
                         f"choose a new directory so that run is not overwritten")
    return latest
