"""A leaving worker's drain: wait for in-flight requests up to the timeout, abort and count the rest."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest
from eep_agent.worker_pool import WorkerError, WorkerRecord


async def test_requests_still_running_at_the_timeout_are_aborted_and_counted() -> None:
    record = WorkerRecord(inflight=1)
    stuck: concurrent.futures.Future[object] = concurrent.futures.Future()
    record.pending_forwards.add(stuck)
    start = time.monotonic()
    aborted = await record.drain(0.2)
    assert 0.2 <= time.monotonic() - start < 2
    assert aborted == 1 and record.aborted == 1
    assert record.draining and record.state == "draining"
    with pytest.raises(WorkerError, match="left the deployment") as err:
        stuck.result(timeout=0)
    assert err.value.stale  # the caller re-reads the layout and retries elsewhere


async def test_requests_that_finish_in_time_are_not_aborted() -> None:
    record = WorkerRecord(inflight=1)
    done: concurrent.futures.Future[object] = concurrent.futures.Future()
    record.pending_forwards.add(done)

    async def finish_soon() -> None:
        await asyncio.sleep(0.1)
        done.set_result("ok")
        record.pending_forwards.discard(done)
        record.inflight -= 1

    task = asyncio.create_task(finish_soon())
    aborted = await record.drain(5.0)
    await task
    assert aborted == 0 and record.aborted == 0
    assert done.result() == "ok"


async def test_an_idle_worker_drains_at_once() -> None:
    start = time.monotonic()
    assert await WorkerRecord().drain(10.0) == 0
    assert time.monotonic() - start < 0.5
