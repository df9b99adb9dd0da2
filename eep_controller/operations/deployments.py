"""Deployments in etcd: create, read a status view, delete — each one transaction."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

from eep_controller.errors import ActiveOperation, Conflict, Invalid, NotFound
from eep_controller.operations.events import newest_event
from eep_controller.operations.history import outside_keys
from eep_controller.protocol import ActuatorKind, DeploymentSpec, Layout, NodeInfo
from eep_controller.store import EtcdStore


class LockRecord(BaseModel):
    """``deployments/{d}/lock``: the one active operation."""

    op_id: str
    since: float


class DeploymentView(BaseModel):
    """What ``GET /v1/deployments/{name}`` returns."""

    name: str
    spec: DeploymentSpec
    generation: int
    dp_size: int
    ep_size: int
    ranks: int
    active_operation: str | None
    # scaling: an operation holds the lock; pending: no rank yet; degraded: some rank is on a
    # node whose agent lease is gone (a recover operation follows); serving: otherwise
    status: str
    # why a pending or degraded deployment is not moving on, when its newest event says so
    # (a bring-up or recover waiting for devices, unable to start, or aborted: it is retried
    # with a growing pause, and the abort's reason, a checkpoint that cannot be read say, is
    # what to fix)
    note: str | None = None


# Events that say why a deployment waits (see `DeploymentView.note`).
NOTE_EVENTS = ("deployment.waiting", "deployment.blocked", "operation.aborted")


def _status(layout: Layout | None, lock: LockRecord | None, live: frozenset[str]) -> str:
    if lock is not None:
        return "scaling"
    if layout is None or not layout.ranks:
        return "pending"
    if any(rank.node_id not in live for rank in layout.ranks):
        return "degraded"
    return "serving"


async def create_deployment(store: EtcdStore, spec: DeploymentSpec) -> DeploymentView:
    """Store the spec and an empty generation-0 layout; Conflict if the name is taken.

    Invalid for `actuator: vllm`: the wire format has room for driving vLLM's own
    ``/scale_elastic_ep``, but no actuator for it exists yet, and a deployment must not be
    driven by another actuator than the one it names."""
    if spec.actuator is ActuatorKind.VLLM:
        raise Invalid(
            "actuator 'vllm' (driving vLLM's own /scale_elastic_ep) is not available in this "
            "version; use 'native' (eep agents)",
            field="actuator",
        )
    keys = store.keys
    layout = Layout(
        deployment=spec.name, generation=0, dp_size=0, ranks=[], slots_per_rank=spec.slots_per_rank,
        committed_at=time.time(),
    )  # fmt: skip
    txn = store.txn()
    store.require_absent(txn, keys.spec(spec.name))
    store.require_absent(txn, keys.layout(spec.name))
    store.put_op(txn, keys.spec(spec.name), spec)
    store.put_op(txn, keys.layout(spec.name), layout)
    if not await store.commit(txn):
        raise Conflict(f"a deployment named {spec.name!r} already exists", deployment=spec.name)
    return _view(spec, layout, None, frozenset())


async def get_lock(store: EtcdStore, name: str) -> tuple[LockRecord, int] | None:
    got = await store.get(store.keys.lock(name), LockRecord)
    return None if got is None else (got.value, got.mod_revision)


async def live_nodes(store: EtcdStore) -> frozenset[str]:
    """Ids of the nodes whose agent holds its lease."""
    return frozenset(n.value.node_id for n in await store.list(store.keys.nodes(), NodeInfo))


class LostNode(BaseModel):
    """A node that still holds ranks of some deployment but whose agent lease is gone."""

    node_id: str
    # deployment name -> the indices of its ranks on this node
    ranks: dict[str, list[int]]


async def deployment_names(store: EtcdStore) -> list[str]:
    """The names of every stored deployment."""
    keys = store.keys
    return [
        k[len(keys.deployments()) : -len("/spec")]
        for k in await store.list_keys(keys.deployments())
        if k.endswith("/spec")
    ]


async def lost_nodes(store: EtcdStore, live: frozenset[str]) -> list[LostNode]:
    """Nodes not in `live` that some deployment's layout still places ranks on (until a
    recover operation moves those ranks away), by node id."""
    held: dict[str, dict[str, list[int]]] = {}
    for name in await deployment_names(store):
        layout = await store.get(store.keys.layout(name), Layout)
        if layout is None:
            continue  # deleted between the list and the read
        for index, rank in enumerate(layout.value.ranks):
            if rank.node_id not in live:
                held.setdefault(rank.node_id, {}).setdefault(name, []).append(index)
    return [LostNode(node_id=n, ranks=held[n]) for n in sorted(held)]


async def deployment_view(
    store: EtcdStore, name: str, live: frozenset[str] | None = None
) -> DeploymentView:
    """`live`: the live node ids when the caller has them already."""
    keys = store.keys
    spec = await store.get(keys.spec(name), DeploymentSpec)
    if spec is None:
        raise NotFound(f"no deployment named {name!r}", resource="deployment")
    layout = await store.get(keys.layout(name), Layout)
    lock = await store.get(keys.lock(name), LockRecord)
    if live is None:
        live = await live_nodes(store)
    view = _view(spec.value, layout.value if layout else None, lock.value if lock else None, live)
    if view.status in ("pending", "degraded"):
        newest = await newest_event(store, name)
        if newest is not None and newest.type in NOTE_EVENTS:
            view.note = newest.message
    return view


def _view(
    spec: DeploymentSpec, layout: Layout | None, lock: LockRecord | None, live: frozenset[str]
) -> DeploymentView:
    dp = layout.dp_size if layout else 0
    return DeploymentView(
        name=spec.name,
        spec=spec,
        generation=layout.generation if layout else 0,
        dp_size=dp,
        ep_size=spec.ep_size(dp),
        ranks=len(layout.ranks) if layout else 0,
        active_operation=lock.op_id if lock else None,
        status=_status(layout, lock, live),
    )


async def list_deployment_views(store: EtcdStore) -> list[DeploymentView]:
    live = await live_nodes(store)
    views: list[DeploymentView] = []
    for name in await deployment_names(store):
        try:
            views.append(await deployment_view(store, name, live))
        except NotFound:
            continue  # deleted between the list and the read
    return views


async def delete_deployment(store: EtcdStore, name: str) -> dict[str, Any]:
    """Delete a deployment and its history; refused while an operation is active."""
    keys = store.keys
    spec = await store.get(keys.spec(name), DeploymentSpec)
    if spec is None:
        raise NotFound(f"no deployment named {name!r}", resource="deployment")
    lock = await get_lock(store, name)
    if lock is not None:
        raise ActiveOperation(
            f"deployment {name!r} has an active operation; cancel it or wait",
            active_operation=lock[0].op_id,
        )
    # read first: the deployment's prefix goes in one transaction, these keys after it
    outside = await outside_keys(store, name)
    txn = store.txn()
    store.require_revision(txn, keys.spec(name), spec.mod_revision)
    store.require_absent(txn, keys.lock(name))
    store.delete_op(txn, keys.deployment(name), prefix=True)
    store.delete_op(txn, keys.events(name), prefix=True)
    if not await store.commit(txn):
        raise Conflict(f"deployment {name!r} changed while deleting it; retry")
    # so a deployment made again under this name does not meet the old operations' ids or
    # Idempotency-Keys (no operation can start in between: the spec is gone)
    for key in outside:
        await store.delete(key)
    return {"deleted": name}
