"""The node's presence in etcd: ``nodes/{node_id}`` bound to a lease the agent keeps alive."""

from __future__ import annotations

import asyncio
import logging

from eep_controller.protocol import NodeInfo
from eep_controller.store import EtcdStore, KeptLease, RepeatedFailure
from eep_controller.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class NodeRegistration:
    """Registers ``info`` under a lease; registers again with a fresh lease if it is lost."""

    def __init__(self, store: EtcdStore, info: NodeInfo, ttl: int) -> None:
        self.store = store
        self.info = info
        self.ttl = ttl
        self.lease: KeptLease | None = None
        self.registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._register()
        self._task = asyncio.create_task(self._watch_lease(), name="node-registration")

    async def _register(self) -> None:
        self.lease = KeptLease(self.store, self.ttl)
        await self.lease.start()
        await self.store.put(
            self.store.keys.node(self.info.node_id), self.info, lease=self.lease.id
        )
        self.registered.set()
        log.info(
            "node %s registered (lease %x, ttl %ss)", self.info.node_id, self.lease.id, self.ttl
        )

    async def _watch_lease(self) -> None:
        while True:
            assert self.lease is not None
            await self.lease.lost.wait()
            self.registered.clear()
            log.warning("node %s lost its lease; registering again", self.info.node_id)
            failures = RepeatedFailure(log, "re-registration failed")
            while True:
                try:
                    await self._register()
                    failures.ok()
                    break
                except Exception as exc:
                    failures.failed(exc)
                    await asyncio.sleep(1.0)

    async def stop(self) -> None:
        """Deregister: revoke the lease so the node key vanishes at once."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self.lease is not None:
            await self.lease.stop(revoke=True)
        self.registered.clear()
