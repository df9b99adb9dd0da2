"""A lease kept alive by our own task, with a clear "lease lost" signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from eep_controller.store.client import EtcdStore, StoreUnavailable
from eep_controller.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class KeptLease:
    """Grants a lease and refreshes it every ``ttl/3`` seconds.

    ``lost`` is set once the lease is known gone (etcd says it expired) or could not be
    refreshed for a whole TTL (so it may have expired without us hearing): whoever holds
    lease-bound keys must then act as if they are gone.
    """

    def __init__(self, store: EtcdStore, ttl: int) -> None:
        if ttl < 2:
            raise ValueError("lease TTL must be at least 2 seconds")
        self.store = store
        self.ttl = ttl
        self.id: int = 0
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_ok = 0.0

    async def start(self) -> int:
        self.id = await self.store.grant_lease(self.ttl)
        self._last_ok = time.monotonic()
        self.lost.clear()
        self._task = asyncio.create_task(self._keep_alive(), name=f"lease-{self.id:x}")
        return self.id

    async def _keep_alive(self) -> None:
        interval = max(0.5, self.ttl / 3)
        while not self.lost.is_set():
            await asyncio.sleep(interval)
            try:
                ttl = await self.store.refresh_lease(self.id)
            except (StoreUnavailable, Exception) as exc:  # any failure counts against the TTL
                if time.monotonic() - self._last_ok >= self.ttl:
                    log.warning("lease %x lost: not refreshed for %ss (%s)", self.id, self.ttl, exc)
                    self.lost.set()
                continue
            if ttl <= 0:
                log.warning("lease %x lost: etcd reports it expired", self.id)
                self.lost.set()
            else:
                self._last_ok = time.monotonic()

    async def stop(self, *, revoke: bool = True) -> None:
        """Stop refreshing; with ``revoke`` the lease's keys vanish at once."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if revoke and self.id and not self.lost.is_set():
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(self.id)
        self.lost.set()
