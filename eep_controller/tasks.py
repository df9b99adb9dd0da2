"""Stopping asyncio tasks for certain, and showing the ones that will not stop.

One ``task.cancel()`` is not always enough. Before Python 3.12, ``asyncio.wait_for``
returns the inner result when the cancellation arrives just as the inner awaitable
finishes, so a ``while True`` loop that awaits it (an etcd call with a deadline, a wake-up
with a timeout) can swallow the cancel and run on; whoever then awaits the task waits
forever. ``cancel_and_wait`` cancels again until the task has ended.

A shutdown must end even when something does not: ``arm_shutdown_watchdog`` logs where it
is stuck (every thread, every task's await chain) at half its bound and stops the process
hard at the bound.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
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


def arm_shutdown_watchdog(
    loop: asyncio.AbstractEventLoop,
    bound_s: float,
    hard_stop: Callable[[], None],
    logger: logging.Logger = log,
) -> None:
    """Bound a shutdown that has just begun: at ``bound_s / 2`` dump every thread's stack
    (faulthandler, to stderr) and log every task's await chain; at ``bound_s`` call
    ``hard_stop`` (which ends the process). ``disarm_shutdown_watchdog`` stops the dump
    once the shutdown has finished; the process is gone by then, so the calls scheduled
    on the loop never run."""
    half = bound_s / 2
    faulthandler.dump_traceback_later(half, exit=False)

    def log_tasks() -> None:
        logger.error("shutdown still running after %ss; tasks:\n%s", half, describe_pending_tasks())

    loop.call_later(half, log_tasks)
    loop.call_later(bound_s, hard_stop)


def disarm_shutdown_watchdog() -> None:
    faulthandler.cancel_dump_traceback_later()
