"""Prefix watches that survive an etcd restart and compaction."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aetcd import exceptions as etcd_errors

from eep_controller.store.client import EtcdStore
from eep_controller.store.outage import RepeatedFailure
from eep_controller.tasks import cancel_and_wait

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchEvent:
    """One change under the watched prefix. ``value`` is None for a delete."""

    key: str
    value: bytes | None
    mod_revision: int

    @property
    def deleted(self) -> bool:
        return self.value is None


@dataclass(frozen=True)
class Resync:
    """The watch lost history (compaction): ``snapshot`` is everything under the prefix now."""

    revision: int
    snapshot: dict[str, tuple[bytes, int]]


class PrefixWatch:
    """Lists a prefix, then streams its changes, reconnecting from the last seen revision.

    Iterate to get a :class:`Resync` first (the initial listing), then :class:`WatchEvent`s;
    after a compaction another :class:`Resync` arrives. An etcd restart is invisible to the
    consumer except as a pause.
    """

    def __init__(
        self, store: EtcdStore, prefix: str, *, retry_s: float = 0.5, resume_from: int | None = None
    ) -> None:
        """``resume_from``: the consumer already holds the state at that revision; skip the listing."""
        self.store = store
        self.prefix = prefix
        self.retry_s = retry_s
        self.revision = resume_from or 0
        self._need_list = resume_from is None
        self.restarts = 0
        self._cancel: asyncio.Event = asyncio.Event()
        self._failures = RepeatedFailure(log, f"watch on {prefix} broke", level=logging.INFO)

    def close(self) -> None:
        self._cancel.set()

    async def __aiter__(self) -> AsyncIterator[WatchEvent | Resync]:
        while not self._cancel.is_set():
            try:
                if self._need_list:
                    rev, snap = await self.store.snapshot(self.prefix)
                    self.revision = rev
                    self._need_list = False
                    yield Resync(rev, snap)
                async for ev in self._stream():
                    yield ev
            except etcd_errors.RevisionCompactedError:
                log.info("watch on %s: history compacted, re-listing", self.prefix)
                self._need_list = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.restarts += 1
                self._failures.failed(f"{exc}; re-watching from {self.revision + 1}")
                with contextlib.suppress(Exception):
                    await self.store._rotate()
                await self._sleep(self.retry_s)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._cancel.wait(), seconds)

    async def _stream(self) -> AsyncIterator[WatchEvent]:
        client = await self.store.client()
        watch = await asyncio.wait_for(
            client.watch_prefix(self.prefix.encode(), start_revision=self.revision + 1),
            self.store.conn.timeout_s,
        )
        self._failures.ok()
        stopper = asyncio.create_task(self._cancel.wait())
        nxt: asyncio.Future[Any] | None = None
        try:
            iterator = watch.__aiter__()
            while True:
                nxt = asyncio.ensure_future(iterator.__anext__())
                done, _ = await asyncio.wait({nxt, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    return
                try:
                    event = nxt.result()
                except StopAsyncIteration:
                    raise ConnectionError("watch stream ended") from None
                kv = event.kv
                self.revision = max(self.revision, int(kv.mod_revision))
                value = None if event.kind == "DELETE" else bytes(kv.value)
                yield WatchEvent(kv.key.decode(), value, int(kv.mod_revision))
        finally:
            stopper.cancel()
            if nxt is not None:
                with contextlib.suppress(BaseException):
                    await cancel_and_wait(nxt)
            with contextlib.suppress(Exception):
                await watch.cancel()
