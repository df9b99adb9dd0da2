"""Logging a failure that repeats (etcd down, say) without a line per retry."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# While a failure lasts, it is logged again at most this often, with a count.
REPEAT_EVERY_S = 30.0


class RepeatedFailure:
    """The first failure is logged at once; while failures go on, one line per `every_s`
    says for how long and how many were held back; the first success after them logs that
    it recovered. A loop that retries every half second while etcd is down for ten minutes
    writes about 21 lines, not 1,200."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        level: int = logging.WARNING,
        every_s: float = REPEAT_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._level = level
        self._every_s = every_s
        self._clock = clock
        self._since: float | None = None  # when the failures began
        self._told = 0.0  # when they were last logged
        self._held = 0  # failures since then, not logged

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(self, error: object) -> None:
        now = self._clock()
        if self._since is None:
            self._since = self._told = now
            self._held = 0
            self._log.log(self._level, "%s: %s", self._what, error)
        elif now - self._told >= self._every_s:
            self._log.log(
                self._level,
                "%s: %s (failing for %.0f s; %d more failure(s) since the last report)",
                self._what,
                error,
                now - self._since,
                self._held + 1,
            )
            self._told = now
            self._held = 0
        else:
            self._held += 1

    def ok(self) -> None:
        if self._since is None:
            return
        self._log.info("%s: working again after %.0f s", self._what, self._clock() - self._since)
        self._since = None
