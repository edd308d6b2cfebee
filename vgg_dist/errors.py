"""One kind of error for everything a user can fix, and one way to report it."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

# Exit code for a bad flag, file or checkpoint: the user's to fix, nothing to retry.
EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the user's input; its message is one line that names the flag or file and the fix."""


def is_launcher_rank_zero() -> bool:
    """True on the process that should speak for the job; works before any process group exists."""
    return os.environ.get("RANK", "0") == "0"


def exits_cleanly_on_usage_error(main: Callable[..., int]) -> Callable[..., int]:
    """Turn a UsageError escaping `main` into one line on stderr (once per job) and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UsageError as error:
            if is_launcher_rank_zero():
                print(f"error: {error}", file=sys.stderr, flush=True)
            return EXIT_USAGE

    return wrapper
