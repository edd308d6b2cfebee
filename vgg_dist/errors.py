"""The ways a run ends early on purpose, each with its exit code, and one way to report them."""

from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Callable

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
            if is_launcher_rank_zero():
                label = "error" if isinstance(stop, (UsageError, Diverged)) else "stopped"
                print(f"{label}: {stop}", file=sys.stderr, flush=True)
            return stop.exit_code

    return wrapper


def exit_process(code: int) -> None:
    """Exit with `code`. After a coordinated stop in a multi-process job every rank gets here at once;
    torchrun SIGTERMs the ranks still alive when it sees the first one leave, so skip the interpreter's
    teardown (which restores default signal handlers) and leave with our code straight away."""
    if code != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
