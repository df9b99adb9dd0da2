"""Log set-up shared by the controller, the agents and their workers: a checked level, and
lines as text or as one JSON object each (for log collectors)."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def level_name(value: str) -> str:
    """`value` as a level name (any case); ValueError naming the levels otherwise."""
    name = value.strip().upper()
    if name not in LEVELS:
        raise ValueError(f"unknown log level {value!r}: one of {', '.join(LEVELS)}")
    return name


def format_name(value: str) -> str:
    """`value` as a log format; ValueError naming the formats otherwise."""
    name = value.strip().lower()
    if name not in FORMATS:
        raise ValueError(f"unknown log format {value!r}: one of {', '.join(FORMATS)}")
    return name


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, pid, and
    the exception with its traceback when there is one; `fields` are added to each."""

    def __init__(self, **fields: str) -> None:
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": os.getpid(),
            **self.fields,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def setup_logging(
    level: str, fmt: str = "text", *, text_format: str = TEXT_FORMAT, **fields: str
) -> None:
    """Root logging at `level` to stderr, as text (`text_format`) or JSON (`fields` added to
    every line). Replaces the handlers set before, so a second call does not double lines."""
    handler = logging.StreamHandler()
    if format_name(fmt) == "json":
        handler.setFormatter(JsonFormatter(**fields))
    else:
        handler.setFormatter(logging.Formatter(text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_name(level))


def level_option(value: str) -> str:
    """A typer callback for a `--log-level` option: the level name, or a usage error."""
    import typer

    try:
        return level_name(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def format_option(value: str) -> str:
    """A typer callback for a `--log-format` option: the format, or a usage error."""
    import typer

    try:
        return format_name(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
