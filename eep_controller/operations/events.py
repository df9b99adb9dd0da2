"""The audit trail: one event per state change, under ``events/{d}/``, bounded."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import Any

from eep_controller.protocol import Event
from eep_controller.store import EtcdStore, Txn


def new_event_id(now_ns: int | None = None) -> tuple[int, str]:
    """(seq, key id): seq is nanoseconds since the epoch; the id sorts by it and never collides."""
    seq = now_ns if now_ns is not None else time.time_ns()
    return seq, f"{seq:020d}-{secrets.token_hex(3)}"


def make_event(
    deployment: str,
    type_: str,
    message: str,
    op_id: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> tuple[str, Event]:
    seq, event_id = new_event_id()
    return event_id, Event(
        seq=seq,
        deployment=deployment,
        time=seq / 1e9,
        type=type_,
        op_id=op_id,
        message=message,
        data=dict(data or {}),
    )


def add_event(
    store: EtcdStore,
    txn: Txn,
    deployment: str,
    type_: str,
    message: str,
    op_id: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> Event:
    """Add an event write to ``txn`` so it lands atomically with the change it records."""
    event_id, event = make_event(deployment, type_, message, op_id, data)
    store.put_op(txn, store.keys.event(deployment, event_id), event)
    return event


async def record_event(store: EtcdStore, deployment: str, type_: str, message: str) -> Event:
    """Write one event on its own (when there is no change to make atomic with it)."""
    txn = store.txn()
    event = add_event(store, txn, deployment, type_, message)
    await store.commit(txn)
    return event


async def list_events(
    store: EtcdStore, deployment: str, limit: int = 100, op_id: str | None = None
) -> list[Event]:
    """Newest first."""
    items = [v.value for v in await store.list(store.keys.events(deployment), Event)]
    if op_id is not None:
        items = [e for e in items if e.op_id == op_id]
    return list(reversed(items))[:limit]


async def newest_event(store: EtcdStore, deployment: str) -> Event | None:
    """The newest stored event of `deployment` (keys sort by seq: only keys are listed)."""
    keys = await store.list_keys(store.keys.events(deployment))
    if not keys:
        return None
    got = await store.get(keys[-1], Event)
    return got.value if got else None


async def trim_events(store: EtcdStore, deployment: str, keep: int) -> int:
    """Delete the oldest events beyond ``keep``; returns how many went."""
    keys = await store.list_keys(store.keys.events(deployment))
    extra = len(keys) - keep
    for key in keys[: max(0, extra)]:
        await store.delete(key)
    return max(0, extra)
