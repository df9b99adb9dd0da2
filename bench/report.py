"""What the search benchmarks share: their progress bar, and their ending (run, then one JSON
object or a rich rendering)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Result = dict[str, Any]


def report(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace, Console], Result],
    render: Callable[[Result, Console], None],
) -> int:
    """Run `run` with progress on a console (stderr with ``--json``, so stdout holds only the
    JSON object), then print the result as JSON or through `render`; the exit code, 0."""
    console = Console(stderr=args.json)
    result = run(args, console)
    if args.json:
        print(json.dumps(result))
    else:
        render(result, console)
    return 0


def progress_bar(console: Console, *, counted: bool = False) -> Progress:
    """The search benchmarks' transient progress bar on `console`: description, bar, (with
    `counted`, done of total,) elapsed time."""
    columns = [TextColumn("{task.description}"), BarColumn()]
    if counted:
        columns.append(MofNCompleteColumn())
    return Progress(*columns, TimeElapsedColumn(), console=console, transient=True)
