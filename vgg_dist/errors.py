"""The ways a run ends early on purpose, each with its exit code, and one way to report them."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from typing import Callable

# The signals that ask a run to checkpoint and stop (SLURM sends USR1 before a time limit).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

EXIT_USAGE = 2       # a bad flag, file or checkpoint: the user's to fix, nothing to retry
EXIT_DIVERGED = 3    # the loss became non-finite; no checkpoint holds the non-finite state
EXIT_PREEMPTED = 75  # stopped by a signal after writing a checkpoint: resubmit with --resume auto (EX_TEMPFAIL)


class StopRun(Exception):
    """Ends the run with `exit_code` and a one-line message."""

    exit_code = 1


class UsageError(StopRun):
    """A problem with the user's input; its message names the flag or file and the fix."""

    exit_code = EXIT_USAGE


class Diverged(StopRun):
    exit_code = EXIT_DIVERGED


class Preempted(StopRun):
    exit_code = EXIT_PREEMPTED


def is_launcher_rank_zero() -> bool:
    """True on the process that should speak for the job; works before any process group exists."""
    return os.environ.get("RANK", "0") == "0"


def exits_cleanly_on_stop(main: Callable[..., int]) -> Callable[..., int]:
    """Turn a StopRun escaping `main` into one line on stderr (once per job) and its exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except StopRun as stop:
            label = "error" if isinstance(stop, (UsageError, Diverged)) else "stopped"
            if is_launcher_rank_zero():
                print(f"{label}: {stop}", file=sys.stderr, flush=True)
            record_for_torchrun(f"{label}: {stop}")
            return stop.exit_code

    return wrapper


def record_for_torchrun(message: str) -> None:
    """Under torchrun (accelerate launch with several processes), leave the one-line message in the
    worker's error file: torchrun then prints it as the "Root Cause" at the end of its failure report,
    instead of the line being lost near the top of a long dump."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as handle:
            json.dump({"message": message, "timestamp": int(time.time())}, handle)
    except OSError:
        pass  # the report is a courtesy; the exit code and the printed line still say what happened


def exit_process(code: int) -> None:
    """Exit with `code`, whatever arrives now: a stop signal after the run's last line is ignored, since
    the interpreter's teardown would restore the default handlers and die of it (exit -15 for a run that
    finished). After a coordinated stop in a multi-process job every rank gets here at once and torchrun
    SIGTERMs the ranks still alive when it sees the first one leave, so those leave straight away."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    if code != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
