"""A deployment's operation history in etcd: the ids it holds, and trimming it to a bound."""

from __future__ import annotations

from eep_controller.protocol import Operation
from eep_controller.store import EtcdStore, Versioned


async def operation_ids(store: EtcdStore, name: str) -> list[str]:
    """The ids of the deployment's stored operations, oldest first (ids sort by creation)."""
    prefix = store.keys.ops(name)
    return sorted({k[len(prefix) :].split("/")[0] for k in await store.list_keys(prefix)})


async def trim_operations(store: EtcdStore, name: str, keep: int) -> int:
    """Delete the oldest finished operations beyond the newest `keep`, each with its acks,
    rendezvous, id index and Idempotency-Key (a retry with that key after this makes a new
    operation), in one transaction per operation guarded by its revision (an operation that
    is not finished, or changes meanwhile, stays). Returns how many went."""
    ids = await operation_ids(store, name)
    gone = 0
    for op_id in ids[: max(0, len(ids) - keep)]:
        got = await store.get(store.keys.op(name, op_id), Operation)
        if got is not None and not got.value.state.terminal:
            continue
        txn = store.txn()
        if got is not None:
            store.require_revision(txn, got.key, got.mod_revision)
        store.delete_op(txn, store.keys.op(name, op_id))
        store.delete_op(txn, store.keys.op_children(name, op_id), prefix=True)
        for key in _keys_outside(store, op_id, got):
            store.delete_op(txn, key)
        if await store.commit(txn):
            gone += 1
    return gone


async def outside_keys(store: EtcdStore, name: str) -> list[str]:
    """The keys of the deployment's operations that live outside its own prefix."""
    out = []
    for op_id in await operation_ids(store, name):
        got = await store.get(store.keys.op(name, op_id), Operation)
        out += _keys_outside(store, op_id, got)
    return out


def _keys_outside(store: EtcdStore, op_id: str, got: Versioned[Operation] | None) -> list[str]:
    """An operation's id index and, when it has one, its Idempotency-Key."""
    keys = [store.keys.op_index(op_id)]
    if got is not None and got.value.idempotency_key is not None:
        keys.append(store.keys.idempotency(got.value.idempotency_key))
    return keys
