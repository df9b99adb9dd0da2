"""The audit trail: one event per state change, under ``events/{d}/``, bounded. Events are
written with :mod:`eep_controller.store.audit` (agents write some too); this module reads and
trims them."""

from __future__ import annotations

from eep_controller.protocol import Event
from eep_controller.store import EtcdStore


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
