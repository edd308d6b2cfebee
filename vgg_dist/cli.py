"""What every vgg_dist command line shares: flag spelling, one-line errors, the help format, number checks."""

from __future__ import annotations

import argparse

from vgg_dist.errors import UsageError


def flag(name: str) -> str:
    """The command-line spelling of a field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


class HelpFormatter(argparse.HelpFormatter):
    """Appends each flag's default unless its help already says it, and leaves out "none" defaults.

    Help texts are plain text: a `%` in one is printed as written (argparse would read it as a format).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").replace("%", "%%")
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class FlagParser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError, so every command reports them as one line, exit code 2.

    No abbreviations: `--epoch 3` in a saved command must not silently mean `--epochs 3`.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def check_positive(name: str, value: int | None) -> None:
    """None means "not set"; anything else must be a whole number of at least 1."""
    if value is not None and value < 1:
        raise UsageError(f"{flag(name)} must be a positive integer, got {value}")
