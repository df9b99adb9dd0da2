"""Stopping tasks that swallow a cancel (the pre-3.12 ``wait_for`` race), and naming stuck ones."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from eep_controller.tasks import ShutdownWatchdog, cancel_and_wait, describe_pending_tasks


async def _swallows_first_cancel(ticks: list[int]) -> None:
    """A service loop that loses one cancellation, as a loop around ``wait_for`` can."""
    swallowed = False
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed = True
        ticks.append(1)


def test_a_task_that_swallows_one_cancel_is_still_stopped() -> None:
    async def main() -> None:
        ticks: list[int] = []
        task = asyncio.create_task(_swallows_first_cancel(ticks), name="stubborn")
        await asyncio.sleep(0.03)
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
        assert not task.done()  # one cancel was not enough
        await asyncio.wait_for(cancel_and_wait(task, recancel_s=0.05), 5)
        assert task.cancelled()

    asyncio.run(main())


def test_the_wait_for_race_cannot_keep_a_loop_alive() -> None:
    """The inner future finishes in the same loop turn as the cancel arrives."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        inner: list[asyncio.Future[int]] = []

        async def service() -> None:
            while True:
                fut: asyncio.Future[int] = loop.create_future()
                inner.append(fut)
                await asyncio.wait_for(fut, 10)

        task = asyncio.create_task(service(), name="service")
        await asyncio.sleep(0.01)
        inner[-1].set_result(1)
        task.cancel()
        await asyncio.wait_for(cancel_and_wait(task, recancel_s=0.05), 5)
        assert task.done()

    asyncio.run(main())


def test_many_tasks_and_a_failed_one_end_without_raising() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        failed = asyncio.create_task(fails())
        sleepers = [asyncio.create_task(asyncio.sleep(30)) for _ in range(3)]
        await asyncio.sleep(0)
        await cancel_and_wait([failed, *sleepers])
        assert all(t.cancelled() for t in sleepers)
        assert isinstance(failed.exception(), RuntimeError)

    asyncio.run(main())


def test_a_cancel_of_the_caller_is_not_swallowed() -> None:
    async def main() -> None:
        ticks: list[int] = []
        stubborn = asyncio.create_task(_swallows_first_cancel(ticks))
        await asyncio.sleep(0.02)
        stopper = asyncio.create_task(cancel_and_wait(stubborn, recancel_s=10))
        await asyncio.sleep(0.05)
        stopper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopper
        stubborn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stubborn

    asyncio.run(main())


def test_pending_tasks_are_described_with_their_await_chain() -> None:
    async def waits_on_a_lock(lock: asyncio.Lock) -> None:
        async with lock:
            pass

    async def main() -> str:
        lock = asyncio.Lock()
        await lock.acquire()
        task = asyncio.create_task(waits_on_a_lock(lock), name="stuck-on-lock")
        await asyncio.sleep(0.01)
        text = describe_pending_tasks()
        lock.release()
        await task
        return text

    text = asyncio.run(main())
    assert "task stuck-on-lock" in text
    assert "in waits_on_a_lock" in text
    assert "in acquire" in text  # the chain goes down to what the task waits on


def test_the_watchdog_stops_hard_even_when_the_loop_is_stuck(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The loop blocks (a synchronous wait inside a callback): the watchdog's own thread
    still logs every thread's stack at half the bound and calls the hard stop at it."""
    stopped = threading.Event()
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR):
            ShutdownWatchdog(loop, 0.4, stopped.set)
            loop.call_soon(stopped.wait, 5.0)  # the loop's only thread is stuck here
            started = time.monotonic()
            loop.run_until_complete(asyncio.sleep(0))
            took = time.monotonic() - started
    finally:
        loop.close()
    assert stopped.is_set() and took < 2.0
    threads = [r.getMessage() for r in caplog.records if "threads:" in r.getMessage()]
    assert threads and "in test_the_watchdog_stops_hard" in threads[0]


def test_a_disarmed_watchdog_does_nothing(caplog: pytest.LogCaptureFixture) -> None:
    stopped = threading.Event()
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR):
            ShutdownWatchdog(loop, 0.2, stopped.set).disarm()
            time.sleep(0.4)
    finally:
        loop.close()
    assert not stopped.is_set()
    assert not [r for r in caplog.records if "shutdown still running" in r.getMessage()]
