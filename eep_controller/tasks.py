"""Stopping asyncio tasks for certain, and showing the ones that will not stop.

One ``task.cancel()`` is not always enough. Before Python 3.12, ``asyncio.wait_for``
returns the inner result when the cancellation arrives just as the inner awaitable
finishes, so a ``while True`` loop that awaits it (an etcd call with a deadline, a wake-up
with a timeout) can swallow the cancel and run on; whoever then awaits the task waits
forever. ``cancel_and_wait`` cancels again until the task has ended.

A shutdown must end even when something does not: a ``ShutdownWatchdog`` logs where it
is stuck (every thread's stack, every task's await chain) at half its bound and stops the
process hard at the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

RECANCEL_S = 0.5


async def cancel_and_wait(
    tasks: asyncio.Future[Any] | Iterable[asyncio.Future[Any]], *, recancel_s: float = RECANCEL_S
) -> None:
    """Cancel every task and return once all have ended, cancelling again every ``recancel_s``.

    A task's own exception (other than its cancellation) is logged, not raised: the caller
    is shutting it down either way.
    """
    every = [tasks] if isinstance(tasks, asyncio.Future) else list(tasks)
    pending = set(every)
    rounds = 0
    while pending:
        for task in pending:
            task.cancel()
        if rounds == 1:
            log.warning(
                "%d task(s) ignored a cancel; cancelling again: %s",
                len(pending),
                ", ".join(_name(t) for t in pending),
            )
        rounds += 1
        _, pending = await asyncio.wait(pending, timeout=recancel_s)
    for task in every:
        if not task.cancelled() and task.exception() is not None:
            log.debug("task %s ended with %r", _name(task), task.exception())


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)


def describe_pending_tasks(limit: int = 20) -> str:
    """The await chain of this loop's unfinished tasks, for a log line when a shutdown is stuck."""
    current = asyncio.current_task()
    lines: list[str] = []
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        if task is current:
            continue
        lines.append(f"task {task.get_name()}:")
        for frame in _await_chain(task.get_coro(), limit):
            code = frame.f_code
            lines.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}")
    return "\n".join(lines) if lines else "(no other tasks)"


def _await_chain(obj: Any, limit: int) -> list[FrameType]:
    """The frames from a coroutine down what it awaits (coroutines, generators, async
    generators), outermost first; ``Task.get_stack`` shows only the outermost."""
    frames: list[FrameType] = []
    while obj is not None and len(frames) < limit:
        frame = next(
            (f for a in ("cr_frame", "gi_frame", "ag_frame") if (f := getattr(obj, a, None))), None
        )
        if frame is not None:
            frames.append(frame)
        obj = next(
            (o for a in ("cr_await", "gi_yieldfrom", "ag_await") if (o := getattr(obj, a, None))),
            None,
        )
    return frames


class ShutdownWatchdog:
    """Bounds a shutdown that has just begun, from a thread of its own: at half the bound
    it logs every thread's stack and (on the loop) every task's await chain; at the bound
    it calls ``hard_stop``, which ends the process. Being a thread, it fires even when the
    loop itself is stuck. ``disarm`` once the shutdown has finished.

    The stacks come from ``sys._current_frames`` under the GIL: faulthandler's timed dump
    reads other threads' frames without it and can crash the process it is meant to
    diagnose (it did, with SIGSEGV, on a controller stuck in shutdown)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        bound_s: float,
        hard_stop: Callable[[], None],
        logger: logging.Logger = log,
    ) -> None:
        self._loop = loop
        self._bound_s = bound_s
        self._hard_stop = hard_stop
        self._log = logger
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eep-shutdown-watchdog", daemon=True)
        self._thread.start()

    def disarm(self) -> None:
        self._done.set()

    def _run(self) -> None:
        half = self._bound_s / 2
        if self._done.wait(half):
            return
        self._log.error("shutdown still running after %ss; threads:\n%s", half, describe_threads())
        with contextlib.suppress(RuntimeError):  # the loop is closed: no tasks to show
            self._loop.call_soon_threadsafe(self._log_tasks, half)
        if self._done.wait(self._bound_s - half):
            return
        self._hard_stop()

    def _log_tasks(self, after_s: float) -> None:
        self._log.error(
            "shutdown still running after %ss; tasks:\n%s", after_s, describe_pending_tasks()
        )


def describe_threads() -> str:
    """Every other thread's stack, innermost call last, for a log line when a shutdown is
    stuck."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    lines: list[str] = []
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        lines.append(f"thread {names.get(ident, ident)}:")
        lines.extend(
            f"  {entry.filename}:{entry.lineno} in {entry.name}"
            for entry in traceback.extract_stack(frame)
        )
    return "\n".join(lines) if lines else "(no other threads)"
