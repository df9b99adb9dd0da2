"""Log set-up: checked levels and formats, and JSON lines a log collector can read."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest

from eep_controller.logs import JsonFormatter, format_name, level_name, setup_logging


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_levels_and_formats_are_checked_by_name() -> None:
    assert level_name("debug") == "DEBUG" and level_name(" Warning ") == "WARNING"
    with pytest.raises(ValueError, match="unknown log level 'bogus': one of DEBUG, INFO"):
        level_name("bogus")
    assert format_name("JSON") == "json"
    with pytest.raises(ValueError, match="unknown log format 'yaml': one of text, json"):
        format_name("yaml")


def test_a_json_line_carries_the_record_and_its_exception() -> None:
    logger = logging.getLogger("eep.test")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logger.makeRecord(
            "eep.test", logging.ERROR, __file__, 1, "lost %s", ("n3",), exc_info=sys.exc_info()
        )
    line = JsonFormatter(worker="moe/cpu:1").format(record)
    entry = json.loads(line)
    assert "\n" not in line  # one line per record, the traceback inside the string
    assert entry["level"] == "ERROR" and entry["logger"] == "eep.test"
    assert entry["message"] == "lost n3" and entry["worker"] == "moe/cpu:1"
    assert entry["time"].endswith("+00:00") and isinstance(entry["pid"], int)
    assert "RuntimeError: boom" in entry["exception"]


def test_setup_logging_replaces_the_handlers_and_sets_the_level(
    restore_root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("info", "json", node="n1")
    setup_logging("warning", "json", node="n1")  # a second call does not double the lines
    logging.getLogger("eep.test").info("not shown")
    logging.getLogger("eep.test").warning("shown %d", 1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert json.loads(lines[0])["message"] == "shown 1" and json.loads(lines[0])["node"] == "n1"
    setup_logging("INFO", "text")
    logging.getLogger("eep.test").info("plain")
    assert " INFO eep.test: plain" in capsys.readouterr().err
