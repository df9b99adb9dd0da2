"""Rich consoles for the command-line tools, and how they show a time."""

from __future__ import annotations

import time
from typing import Any

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


def byte_size(n: float) -> str:
    """Bytes in decimal units: "512 B", "3.7 MB", "1.1 TB"."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def duration(seconds: float) -> str:
    """A span of time in the unit that suits it: 4.0 ms, 2.35 s, 3 min 5 s."""
    if round(seconds * 1000, 1) < 1000:
        return f"{seconds * 1000:.1f} ms"
    if round(seconds, 2) < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def balance_change(plan: dict[str, Any], digits: int = 3) -> str:
    """A plan's balancedness before -> after; before is "-" when no rank served: a bring-up,
    or a recover after every rank was lost (its plan says 0.0, which no served layout has:
    a layout without load balances 1.0)."""
    after = f"{plan.get('balancedness_after', 0):.{digits}f}"
    if not plan.get("from_dp") or not plan.get("balancedness_before"):
        return f"- -> {after}"
    return f"{plan.get('balancedness_before', 0):.{digits}f} -> {after}"
