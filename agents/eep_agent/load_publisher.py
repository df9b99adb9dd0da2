"""Publishes the per-expert load window (``deployments/{d}/load``) from this node's workers.

Workers count tokens per (layer, logical expert) as they serve. Every ``interval_s`` the
agent collects the counts since the last collection and merges them into the shared
:class:`LoadWindow` with a compare-and-swap, so several agents add up instead of
overwriting each other. The stored value decays exponentially with time constant
``window_s``: ``load = load * exp(-dt / window_s) + new_counts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

import numpy as np

from eep_agent.runtime.commands import Stats, WorkerStats
from eep_agent.view import DeploymentView
from eep_agent.worker_pool import WorkerPool
from eep_controller.protocol import EncodedArray, LoadWindow
from eep_controller.store import EtcdStore

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 8


class LoadPublisher:
    def __init__(
        self,
        store: EtcdStore,
        view: DeploymentView,
        pool: WorkerPool,
        *,
        interval_s: float,
        window_s: float,
    ) -> None:
        self.store = store
        self.view = view
        self.pool = pool
        self.interval_s = interval_s
        self.window_s = window_s
        self._unpublished: dict[str, np.ndarray[Any, Any]] = {}

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.interval_s)
            if stopping.is_set():
                return
            try:
                await self.publish_once()
            except Exception as exc:  # etcd down: keep the counts and try again next tick
                log.info("load window not published this time: %s", exc)

    async def collect(self) -> dict[str, np.ndarray[Any, Any]]:
        """Counts since the last collection, summed per deployment, added to anything not yet published."""
        for handle in self.pool.all():
            if not handle.alive or handle.record.state in ("starting", "loading"):
                continue
            try:
                stats: WorkerStats = await handle.call(Stats(), 10.0)
            except Exception:
                continue
            handle.record.has_active_group = stats.has_active_group
            if stats.load is None:
                continue
            d = handle.identity.deployment
            prev = self._unpublished.get(d)
            self._unpublished[d] = (
                stats.load if prev is None or prev.shape != stats.load.shape else prev + stats.load
            )
        return self._unpublished

    async def publish_once(self) -> None:
        counts = await self.collect()
        for deployment in list(counts):
            delta = counts[deployment]
            if float(delta.sum()) <= 0:
                del counts[deployment]
                continue
            if await self._merge(deployment, delta):
                del counts[deployment]

    async def _merge(self, deployment: str, delta: np.ndarray[Any, Any]) -> bool:
        key = self.store.keys.load(deployment)
        for _ in range(CAS_ATTEMPTS):
            current = await self.store.get(key, LoadWindow)
            now = time.time()
            base = np.zeros_like(delta, dtype=np.float64)
            revision = 0
            if current is not None:
                revision = current.mod_revision
                old = current.value.load.decode().astype(np.float64)
                if old.shape == delta.shape:
                    base = old * math.exp(-max(0.0, now - current.value.updated_at) / self.window_s)
            window = LoadWindow(
                deployment=deployment,
                generation=self.view.committed_generation(deployment),
                load=EncodedArray.encode(base + delta.astype(np.float64)),
                window_s=self.window_s,
                updated_at=now,
            )
            if await self.store.cas_put(key, window, revision):
                return True
        return False
