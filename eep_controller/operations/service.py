"""Operations as resources: create (idempotent, one per deployment), read, list, cancel."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from eep_controller.actuators.native import read_acks
from eep_controller.errors import ActiveOperation, Conflict, Invalid, NotFound
from eep_controller.operations.deployments import LockRecord
from eep_controller.operations.history import operation_ids
from eep_controller.operations.planning import (
    PlanInputs,
    PlannedOperation,
    lost_ranks,
    plan_operation,
    plan_preview,
)
from eep_controller.protocol import (
    ACKED_PHASES,
    Ack,
    AckStatus,
    DeploymentSpec,
    GrouplessRank,
    Layout,
    LoadWindow,
    NodeInfo,
    Operation,
    OpKind,
    OpState,
    ScaleRequest,
)
from eep_controller.store import EtcdStore, Versioned
from eep_controller.store.audit import add_event


class IdempotencyRecord(BaseModel):
    op_id: str
    deployment: str
    fingerprint: str
    created_at: float


class OpIndexRecord(BaseModel):
    deployment: str


# what `new_op_id` makes; a list's `before` cursor must look like one
OP_ID_PATTERN = r"^op-[0-9a-f]{12}-[0-9a-f]{6}$"


def new_op_id(now: float | None = None) -> str:
    """Ids sort by creation time: ``op-<ms since epoch, hex>-<random>``."""
    ms = int((now if now is not None else time.time()) * 1000)
    return f"op-{ms:012x}-{secrets.token_hex(3)}"


def fingerprint(deployment: str, request: ScaleRequest) -> str:
    body = json.dumps({"deployment": deployment, **request.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class ScaleOutcome:
    """What the API answers: 200 (no-op or dry run) or 202 (an operation exists)."""

    status: int
    body: dict[str, Any]


async def _read_spec_layout(
    store: EtcdStore, name: str
) -> tuple[DeploymentSpec, Versioned[Layout]]:
    spec = await store.get(store.keys.spec(name), DeploymentSpec)
    if spec is None:
        raise NotFound(f"no deployment named {name!r}", resource="deployment")
    layout = await store.get(store.keys.layout(name), Layout)
    if layout is None:
        raise NotFound(f"deployment {name!r} has no layout", resource="deployment")
    return spec.value, layout


async def devices_in_use(store: EtcdStore, except_deployment: str) -> frozenset[str]:
    """Rank keys held by other deployments' layouts or by joining ranks of their active ops."""
    keys = store.keys
    used: set[str] = set()
    for key in await store.list_keys(keys.deployments()):
        if not key.endswith("/layout"):
            continue
        name = key[len(keys.deployments()) : -len("/layout")]
        if name == except_deployment:
            continue
        layout = await store.get(key, Layout)
        if layout is not None:
            used.update(r.key for r in layout.value.ranks)
        lock = await store.get(keys.lock(name), LockRecord)
        if lock is not None:
            op = await store.get(keys.op(name, lock.value.op_id), Operation)
            if op is not None and op.value.plan is not None:
                used.update(f"{p.node_id}/{p.device_index}" for p in op.value.plan.participants)
    return frozenset(used)


async def plan_inputs(
    store: EtcdStore, name: str, link_bandwidth: float
) -> tuple[PlanInputs, Versioned[Layout]]:
    spec, layout = await _read_spec_layout(store, name)
    nodes = [n.value for n in await store.list(store.keys.nodes(), NodeInfo)]
    load_rec = await store.get(store.keys.load(name), LoadWindow)
    shape = (spec.model.num_moe_layers, spec.model.num_experts)
    load = load_rec.value.usable(*shape) if load_rec is not None else None
    used = await devices_in_use(store, name)
    groupless = await groupless_ranks(store, name, layout.value)
    inputs = PlanInputs(spec, layout.value, nodes, used, load, link_bandwidth, groupless)
    return inputs, layout


async def groupless_ranks(store: EtcdStore, name: str, layout: Layout) -> frozenset[int]:
    """Ranks of the committed generation whose worker was restarted without an active group
    (records of another generation, or of a device no longer at that rank, do not count)."""
    if layout.generation < 1:
        return frozenset()
    found = set()
    for got in await store.list(store.keys.groupless(name, layout.generation), GrouplessRank):
        rec = got.value
        if rec.rank < len(layout.ranks) and (
            layout.ranks[rec.rank].node_id,
            layout.ranks[rec.rank].device_index,
        ) == (rec.node_id, rec.device_index):
            found.add(rec.rank)
    return frozenset(found)


def op_view(
    op: Operation, acks: Mapping[OpState, Mapping[int, Ack]] | None = None
) -> dict[str, Any]:
    """The API view of an operation: the record, a plan summary (no big arrays), ack counts, links."""
    body = op.model_dump(mode="json", exclude={"plan"})
    if op.plan is not None:
        body["plan"] = {
            "from_dp": op.plan.from_dp,
            "to_dp": op.plan.to_dp,
            "transfer_world": op.plan.transfer_world,
            "participants": [p.model_dump(mode="json") for p in op.plan.participants],
            **op.plan.stats.model_dump(),
        }
        total = len(op.plan.participants)
        body["progress"] = {}
        for phase in ACKED_PHASES:
            seen = list((acks or {}).get(phase, {}).values())
            body["progress"][phase.value] = {
                "acked": sum(1 for a in seen if a.status is AckStatus.OK),
                "failed": sum(1 for a in seen if a.status is not AckStatus.OK),
                "total": total,
                "bytes_received": sum(a.bytes_received for a in seen),
            }
    body["links"] = {
        "self": f"/v1/operations/{op.id}",
        "cancel": f"/v1/operations/{op.id}/cancel",
        "deployment": f"/v1/deployments/{op.deployment}",
        "events": f"/v1/deployments/{op.deployment}/events?op_id={op.id}",
    }
    return body


async def create_operation(
    store: EtcdStore,
    name: str,
    request: ScaleRequest,
    *,
    requested_by: str,
    idempotency_key: str | None,
    link_bandwidth: float,
    failed_ranks: list[int] | None = None,
    kind_override: OpKind | None = None,
    allow_below_min: bool = False,
) -> ScaleOutcome:
    """Validate, plan and record an operation, taking the deployment lock in the same txn."""
    keys = store.keys
    fp = fingerprint(name, request)
    replay = await _replay_or_refuse(store, name, idempotency_key, fp)
    if replay is not None:
        return replay
    inputs, layout = await plan_inputs(store, name, link_bandwidth)
    spec = inputs.spec
    lost = lost_ranks(layout.value, inputs.nodes)
    failed = sorted(set(failed_ranks or []) | set(lost)) if failed_ranks is not None else []
    if lost and failed_ranks is None:
        raise Conflict(
            f"deployment {name!r} has lost ranks {lost} (their node is gone); a recover operation runs first",
            lost_ranks=lost,
        )
    same_size = spec.ep_size(request.dp_size) == len(layout.value.ranks)
    if not failed and same_size and not request.remove_ranks:
        body: dict[str, Any] = {
            "noop": True,
            "detail": f"deployment {name!r} already runs at dp_size {request.dp_size}",
            "generation": layout.value.generation,
        }
        if request.dry_run:
            body["dry_run"] = True
        return ScaleOutcome(200, body)
    planned: PlannedOperation = await asyncio.to_thread(
        plan_operation, inputs, request, failed=failed
    )
    # why a scale-down does not go over the active world, when that is why
    standby_why = (
        f"over the standby world: rank(s) {sorted(inputs.groupless)} hold no active group"
        if planned.kind is OpKind.SCALE_DOWN
        and inputs.groupless
        and planned.plan.transfer_world == "standby"
        else None
    )
    if request.dry_run:
        preview = plan_preview(planned.plan, layout.value)
        if standby_why:
            preview["transfer_note"] = standby_why
        return ScaleOutcome(
            200,
            {
                "dry_run": True,
                "kind": planned.kind.value,
                "deployment": name,
                "from_generation": layout.value.generation,
                "plan": preview,
            },
        )

    now = time.time()
    op = Operation(
        id=new_op_id(now),
        deployment=name,
        kind=kind_override or planned.kind,
        from_generation=layout.value.generation,
        to_generation=layout.value.generation + 1,
        request=request,
        plan=planned.plan,
        created_at=now,
        updated_at=now,
        requested_by=requested_by,
        idempotency_key=idempotency_key,
        request_fingerprint=fp,
    )
    txn = store.txn()
    store.require_absent(txn, keys.lock(name))
    store.require_revision(txn, keys.layout(name), layout.mod_revision)
    store.put_op(txn, keys.op(name, op.id), op)
    store.put_op(txn, keys.lock(name), LockRecord(op_id=op.id, since=now))
    store.put_op(txn, keys.op_index(op.id), OpIndexRecord(deployment=name))
    if idempotency_key is not None:
        store.require_absent(txn, keys.idempotency(idempotency_key))
        store.put_op(
            txn,
            keys.idempotency(idempotency_key),
            IdempotencyRecord(op_id=op.id, deployment=name, fingerprint=fp, created_at=now),
        )
    add_event(
        store, txn, name, "operation.created",
        f"{op.kind.value} {op.id}: dp {planned.plan.from_dp} -> {planned.plan.to_dp}"
        + (f" ({request.reason})" if request.reason else "")
        + (f"; {standby_why}" if standby_why else ""),
        op.id,
        {"copies": planned.plan.stats.copies, "lower_bound": planned.plan.stats.lower_bound, "requested_by": requested_by},
    )  # fmt: skip
    if await store.commit(txn):
        return ScaleOutcome(202, op_view(op))
    # lost a race: tell the caller who won
    replay = await _replay_or_refuse(store, name, idempotency_key, fp)
    if replay is not None:
        return replay
    raise Conflict(f"deployment {name!r} changed while planning; retry")


async def _replay_or_refuse(
    store: EtcdStore, name: str, idempotency_key: str | None, fp: str
) -> ScaleOutcome | None:
    """The operation an Idempotency-Key already made; else ActiveOperation if one holds the lock."""
    if idempotency_key is not None:
        replay = await _replay(store, idempotency_key, fp)
        if replay is not None:
            return replay
    lock = await store.get(store.keys.lock(name), LockRecord)
    if lock is not None:
        raise ActiveOperation(
            f"deployment {name!r} has an active operation {lock.value.op_id}",
            active_operation=lock.value.op_id,
        )
    return None


async def _replay(store: EtcdStore, key: str, fp: str) -> ScaleOutcome | None:
    rec = await store.get(store.keys.idempotency(key), IdempotencyRecord)
    if rec is None:
        return None
    if rec.value.fingerprint != fp:
        raise Invalid(
            "Idempotency-Key was already used with a different request body",
            idempotency_key=key,
            operation=rec.value.op_id,
        )
    op = await store.get(store.keys.op(rec.value.deployment, rec.value.op_id), Operation)
    if op is None:
        raise NotFound(
            f"operation {rec.value.op_id} of Idempotency-Key {key!r} no longer exists",
            resource="operation",
        )
    return ScaleOutcome(202, op_view(op.value, await read_acks(store, op.value)))


async def find_operation(store: EtcdStore, op_id: str) -> Versioned[Operation]:
    if "/" in op_id:
        raise NotFound(f"no operation {op_id!r}", resource="operation")
    idx = await store.get(store.keys.op_index(op_id), OpIndexRecord)
    op = (
        None
        if idx is None
        else await store.get(store.keys.op(idx.value.deployment, op_id), Operation)
    )
    if op is None:
        raise NotFound(f"no operation {op_id!r}", resource="operation")
    return op


async def get_operation(store: EtcdStore, op_id: str) -> dict[str, Any]:
    op = await find_operation(store, op_id)
    return op_view(op.value, await read_acks(store, op.value))


async def list_operations(
    store: EtcdStore, name: str, limit: int, before: str | None
) -> dict[str, Any]:
    """Newest first; ``before`` is the id of the last item of the previous page. Ids sort
    by creation time, so an id no longer kept (history trimmed) still pages on from there."""
    await _read_spec_layout(store, name)
    ids = list(reversed(await operation_ids(store, name)))
    if before is not None:
        ids = [i for i in ids if i < before]
    page = ids[:limit]
    items = []
    for op_id in page:
        got = await store.get(store.keys.op(name, op_id), Operation)
        if got is not None:
            items.append(op_view(got.value))
    nxt = page[-1] if len(ids) > limit and page else None
    return {
        "items": items,
        "count": len(items),
        "next": f"/v1/deployments/{name}/operations?limit={limit}&before={nxt}" if nxt else None,
    }


async def cancel_operation(store: EtcdStore, op_id: str, requested_by: str) -> dict[str, Any]:
    """Ask an op to abort; honoured before SWITCHING, 409 after."""
    for _ in range(5):
        got = await find_operation(store, op_id)
        op = got.value
        if op.state.terminal:
            raise Conflict(
                f"operation {op_id} already ended {op.state.value}", state=op.state.value
            )
        if op.state.committed:
            raise Conflict(
                f"operation {op_id} is past its commit point ({op.state.value}); it can only roll forward",
                state=op.state.value,
            )
        if op.cancel_requested:
            return op_view(op)
        updated = op.model_copy(update={"cancel_requested": True, "updated_at": time.time()})
        txn = store.txn()
        store.require_revision(txn, got.key, got.mod_revision)
        store.put_op(txn, got.key, updated)
        add_event(
            store,
            txn,
            op.deployment,
            "operation.cancel_requested",
            f"cancel of {op_id} requested by {requested_by}",
            op_id,
        )
        if await store.commit(txn):
            return op_view(updated)
    raise Conflict(f"operation {op_id} kept changing; retry the cancel")
