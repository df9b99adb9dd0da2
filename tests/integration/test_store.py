"""The store layer against a real etcd: typed values, CAS, leases, watches across restarts."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from eep_controller.protocol import Device, DeviceKind, NodeInfo
from eep_controller.store import (
    EmbeddedEtcd,
    EtcdConnection,
    EtcdStore,
    KeptLease,
    KeySpace,
    PrefixWatch,
    Resync,
    StoreUnavailable,
    WatchEvent,
)


def node(node_id: str) -> NodeInfo:
    return NodeInfo(
        node_id=node_id,
        address="http://127.0.0.1:1",
        devices=[Device(index=0, kind=DeviceKind.CPU)],
        agent_version="test",
    )


async def test_typed_put_get_round_trips(store: EtcdStore) -> None:
    await store.put(store.keys.node("a"), node("a"))
    got = await store.get(store.keys.node("a"), NodeInfo)
    assert got is not None and got.value == node("a")
    assert got.mod_revision > 0


async def test_cas_conflict_is_detected(store: EtcdStore) -> None:
    key = store.keys.node("a")
    assert await store.cas_put(key, node("a"), 0)  # create
    assert not await store.cas_put(key, node("a"), 0)  # exists now
    got = await store.get(key, NodeInfo)
    assert got is not None
    assert await store.cas_put(key, node("a"), got.mod_revision)
    # a writer holding the old revision loses
    assert not await store.cas_put(key, node("b"), got.mod_revision)
    final = await store.get(key, NodeInfo)
    assert final is not None and final.value.node_id == "a"


async def test_transaction_applies_all_or_nothing(store: EtcdStore) -> None:
    k = store.keys
    await store.put(k.node("x"), node("x"))
    txn = store.txn()
    store.require_absent(txn, k.node("x"))  # fails
    store.put_op(txn, k.node("y"), node("y"))
    assert not await store.commit(txn)
    assert await store.get(k.node("y"), NodeInfo) is None


async def test_lease_expiry_removes_bound_keys(store: EtcdStore) -> None:
    lease = KeptLease(store, ttl=2)
    await lease.start()
    await store.put(store.keys.node("n"), node("n"), lease=lease.id)
    await asyncio.sleep(3)  # kept alive past its TTL
    assert await store.get(store.keys.node("n"), NodeInfo) is not None
    await lease.stop(revoke=False)  # the holder dies silently
    start = time.monotonic()
    while await store.get(store.keys.node("n"), NodeInfo) is not None:
        assert time.monotonic() - start < 5, "lease-bound key outlived its TTL"
        await asyncio.sleep(0.1)


async def test_lost_lease_is_signalled(store: EtcdStore) -> None:
    lease = KeptLease(store, ttl=2)
    await lease.start()
    await store.revoke_lease(lease.id)  # someone else revoked it
    await asyncio.wait_for(lease.lost.wait(), 5)
    await lease.stop()


async def test_unreachable_etcd_raises_store_unavailable() -> None:
    s = EtcdStore(EtcdConnection(["http://127.0.0.1:9"], timeout_s=1), KeySpace("/x"))
    with pytest.raises(StoreUnavailable):
        await s.ping()
    await s.close()


async def test_a_call_whose_shared_client_another_task_closed_is_unavailable_not_cancelled() -> (
    None
):
    # an "etcd" that accepts connections and never answers: every call times out
    import socket
    import threading

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(silent.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    port = silent.getsockname()[1]
    s = EtcdStore(EtcdConnection([f"http://127.0.0.1:{port}"], timeout_s=2), KeySpace("/x"))
    try:
        first = asyncio.create_task(s.get("/x/a", NodeInfo))
        await asyncio.sleep(1.0)
        # in flight when the first call times out and its task closes the shared client:
        # that cancels this call too, though nobody cancelled this task
        second = asyncio.create_task(s.get("/x/b", NodeInfo))
        for task in (first, second):
            with pytest.raises(StoreUnavailable):
                await task
    finally:
        await s.close()
        silent.close()
        for conn in held:
            conn.close()


async def _collect(watch: PrefixWatch, sink: list[WatchEvent | Resync]) -> None:
    async for ev in watch:
        sink.append(ev)


async def _until(pred, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not pred():
        assert time.monotonic() - start < timeout
        await asyncio.sleep(0.05)


async def test_watch_goes_on_when_another_task_closes_the_shared_client(
    store: EtcdStore, prefix: str
) -> None:
    seen: list[WatchEvent | Resync] = []
    watch = PrefixWatch(store, prefix + "/w/", retry_s=0.1)
    consumer = asyncio.create_task(_collect(watch, seen))
    try:
        await _until(lambda: any(isinstance(e, Resync) for e in seen))
        await store.put(prefix + "/w/a", node("a"))
        await _until(lambda: any(isinstance(e, WatchEvent) for e in seen))
        # what a task does after a failed call: the client the watch streams on is closed
        await store._rotate()
        for _ in range(50):  # the watch's own recovery may close the next client once more
            try:
                await store.put(prefix + "/w/b", node("b"))
                break
            except StoreUnavailable:
                await asyncio.sleep(0.1)
        await _until(
            lambda: (
                any(isinstance(e, WatchEvent) and e.key.endswith("/b") for e in seen)
                or consumer.done()
            )
        )
        assert not consumer.done(), consumer  # the watch did not end as if cancelled
    finally:
        watch.close()
        await asyncio.wait_for(consumer, 10)


async def test_watch_survives_etcd_restart_without_losing_events(
    private_etcd: EmbeddedEtcd,
) -> None:
    s = EtcdStore(EtcdConnection([private_etcd.endpoint], timeout_s=2), KeySpace("/w"))
    await s.put(s.keys.node("before"), node("before"))
    watch = PrefixWatch(s, s.keys.nodes(), retry_s=0.2)
    events: list[WatchEvent | Resync] = []
    task = asyncio.create_task(_collect(watch, events))
    await _until(lambda: bool(events))
    first = events[0]
    assert isinstance(first, Resync) and any(k.endswith("/before") for k in first.snapshot)
    await s.put(s.keys.node("one"), node("one"))
    await _until(lambda: any(isinstance(e, WatchEvent) and e.key.endswith("/one") for e in events))

    private_etcd.kill()
    await asyncio.sleep(0.5)
    private_etcd.start()
    # a write by another client while our watch is reconnecting must still arrive
    other = EtcdStore(EtcdConnection([private_etcd.endpoint]), KeySpace("/w"))
    await other.put(other.keys.node("two"), node("two"))
    await other.delete(other.keys.node("one"))
    await other.close()
    await _until(lambda: any(isinstance(e, WatchEvent) and e.key.endswith("/two") for e in events))
    await _until(
        lambda: any(
            isinstance(e, WatchEvent) and e.deleted and e.key.endswith("/one") for e in events
        )
    )
    assert watch.restarts >= 1
    assert sum(isinstance(e, Resync) for e in events) == 1  # resumed by revision, no re-list
    watch.close()
    await asyncio.wait_for(task, 5)
    await s.close()


async def test_watch_relists_after_compaction(store: EtcdStore) -> None:
    k = store.keys
    await store.put(k.node("a"), node("a"))
    watch = PrefixWatch(store, k.nodes(), retry_s=0.1)
    events: list[WatchEvent | Resync] = []
    task = asyncio.create_task(_collect(watch, events))
    await _until(lambda: bool(events))
    # simulate a watcher that fell far behind: history it needs is compacted away
    for i in range(5):
        await store.put(k.node(f"c{i}"), node(f"c{i}"))
    await _until(lambda: sum(isinstance(e, WatchEvent) for e in events) >= 5)
    watch.close()
    await asyncio.wait_for(task, 5)

    current = await store.revision()
    client = await store.client()
    await client.compact(current)
    # a consumer that resumes from before the compaction point gets a full re-list
    late = PrefixWatch(store, k.nodes(), retry_s=0.1, resume_from=1)
    got: list[WatchEvent | Resync] = []
    t2 = asyncio.create_task(_collect(late, got))
    await _until(lambda: any(isinstance(e, Resync) for e in got))
    resync = next(e for e in got if isinstance(e, Resync))
    assert len(resync.snapshot) == 6
    assert resync.revision >= current
    await store.put(k.node("after"), node("after"))
    await _until(lambda: any(isinstance(e, WatchEvent) and e.key.endswith("/after") for e in got))
    late.close()
    await asyncio.wait_for(t2, 5)
