"""A failure that repeats is logged once, then at most once per interval, then its end."""

from __future__ import annotations

import logging

import pytest

from eep_controller.store import RepeatedFailure


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _messages(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records]


def test_one_line_per_interval_with_the_count_then_one_when_it_works_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    failures = RepeatedFailure(logging.getLogger("t"), "etcd call", every_s=30, clock=clock)
    caplog.set_level(logging.INFO, logger="t")
    failures.ok()  # nothing failed: nothing to say
    assert caplog.records == [] and not failures.failing
    for _ in range(60):  # every half second for 30 s
        failures.failed("unreachable")
        clock.now += 0.5
    failures.failed("still unreachable")  # at 30 s: the second line
    for _ in range(10):
        clock.now += 0.5
        failures.failed("unreachable")
    assert failures.failing
    failures.ok()
    failures.ok()
    assert _messages(caplog) == [
        (logging.WARNING, "etcd call: unreachable"),
        (
            logging.WARNING,
            "etcd call: still unreachable (failing for 30 s; 60 more failure(s) since the last "
            "report)",
        ),
        (logging.INFO, "etcd call: working again after 35 s"),
    ]
    assert not failures.failing


def test_a_new_outage_is_told_at_once_at_the_level_given(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    failures = RepeatedFailure(
        logging.getLogger("t"), "watch", level=logging.INFO, every_s=30, clock=clock
    )
    caplog.set_level(logging.INFO, logger="t")
    failures.failed("a")
    failures.ok()
    clock.now += 1
    failures.failed("b")  # within 30 s of the last line, but a new outage
    assert _messages(caplog) == [
        (logging.INFO, "watch: a"),
        (logging.INFO, "watch: working again after 0 s"),
        (logging.INFO, "watch: b"),
    ]
