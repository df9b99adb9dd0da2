"""Leader election among controller replicas through one lease-bound key."""

from __future__ import annotations

import asyncio
import logging
import time

from pydantic import BaseModel

from eep_controller.store.client import EtcdStore
from eep_controller.store.lease import KeptLease
from eep_controller.store.outage import RepeatedFailure
from eep_controller.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class LeaderRecord(BaseModel):
    replica_id: str
    address: str
    since: float
    lease: int


class LeaderElection:
    """Campaigns for ``leader``; ``is_leader`` drops the moment our lease is in doubt.

    The key is created in a transaction that requires it to be absent, bound to our lease;
    when the lease is lost (expired, or not refreshed for a TTL) we stop acting as leader at
    once and campaign again with a new lease.
    """

    def __init__(self, store: EtcdStore, replica_id: str, address: str, ttl: int = 5) -> None:
        self.store = store
        self.replica_id = replica_id
        self.address = address
        self.ttl = ttl
        self.lease: KeptLease | None = None
        self.became_leader = asyncio.Event()
        self._leader = False
        self._task: asyncio.Task[None] | None = None
        self.current: LeaderRecord | None = None
        self.terms = 0
        self._failures = RepeatedFailure(log, "leader election")

    @property
    def is_leader(self) -> bool:
        return self._leader and self.lease is not None and not self.lease.lost.is_set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="leader-election")

    async def _run(self) -> None:
        key = self.store.keys.leader()
        while True:
            try:
                if self.lease is None or self.lease.lost.is_set():
                    self._step_down()
                    self.lease = KeptLease(self.store, self.ttl)
                    await self.lease.start()
                record = LeaderRecord(
                    replica_id=self.replica_id,
                    address=self.address,
                    since=time.time(),
                    lease=self.lease.id,
                )
                txn = self.store.txn()
                self.store.require_absent(txn, key)
                self.store.put_op(txn, key, record, lease=self.lease.id)
                won = await self.store.commit(txn)
                self._failures.ok()
                if won:
                    self._leader = True
                    self.terms += 1
                    self.current = record
                    self.became_leader.set()
                    log.info("replica %s is the leader (lease %x)", self.replica_id, self.lease.id)
                    await self.lease.lost.wait()
                    self._step_down()
                    continue
                got = await self.store.get(key, LeaderRecord)
                self.current = got.value if got else None
                if got is not None and got.lease == self.lease.id:
                    # our own key from before a transport hiccup: we are still the leader
                    self._leader = True
                    self.became_leader.set()
                    await self.lease.lost.wait()
                    self._step_down()
                    continue
                await asyncio.sleep(min(1.0, self.ttl / 4))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failures.failed(exc)
                await asyncio.sleep(0.5)

    def _step_down(self) -> None:
        if self._leader:
            log.warning("replica %s is no longer the leader", self.replica_id)
        self._leader = False
        self.became_leader.clear()

    async def leader(self) -> LeaderRecord | None:
        got = await self.store.get(self.store.keys.leader(), LeaderRecord)
        self.current = got.value if got else None
        return self.current

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        self._leader = False
        if self.lease is not None:
            await self.lease.stop(revoke=True)
