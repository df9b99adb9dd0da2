"""Rich consoles for the command-line tools, and how they show a time."""

from __future__ import annotations

import time

from rich.console import Console

# Columns for output that is not a terminal (a pipe, a file, a CI log): rich's default there
# is 80, which folds every table cell; a table takes only the width it needs, up to this.
PIPE_WIDTH = 400


def make_console(*, stderr: bool = False) -> Console:
    """A console that keeps a terminal's own width and gives a pipe PIPE_WIDTH columns."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)


def local_time(epoch_s: float) -> str:
    """A point in time as a local date and time, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_s))
