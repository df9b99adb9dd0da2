"""Writing the audit trail: events under ``events/{d}/``, one per state change.

The controller writes most (an operation's phases, a deployment waiting); agents write what
only a node sees (a worker that died and was restarted). Reading and trimming them is
:mod:`eep_controller.operations.events`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import Any

from eep_controller.protocol import Event
from eep_controller.store.client import EtcdStore, Txn


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


async def record_event(
    store: EtcdStore,
    deployment: str,
    type_: str,
    message: str,
    data: Mapping[str, Any] | None = None,
) -> Event:
    """Write one event on its own (when there is no change to make atomic with it)."""
    txn = store.txn()
    event = add_event(store, txn, deployment, type_, message, data=data)
    await store.commit(txn)
    return event
