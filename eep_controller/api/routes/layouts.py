"""The committed layout of a deployment, its full placement, and its audit events."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request

from eep_controller.api.auth import reader
from eep_controller.errors import NotFound
from eep_controller.operations.events import list_events
from eep_controller.planner import Placement, balancedness
from eep_controller.protocol import DeploymentSpec, Layout, LoadWindow

router = APIRouter(
    prefix="/v1/deployments/{name}", tags=["layouts"], dependencies=[Depends(reader)]
)


async def _layout(request: Request, name: str) -> tuple[DeploymentSpec, Layout]:
    store = request.app.state.ctx.store
    spec = await store.get(store.keys.spec(name), DeploymentSpec)
    layout = await store.get(store.keys.layout(name), Layout)
    if spec is None or layout is None:
        raise NotFound(f"no deployment named {name!r}", resource="deployment")
    return spec.value, layout.value


@router.get(
    "/layout", summary="The committed layout: generation, ranks, placement summary, balance"
)
async def layout(name: str, request: Request) -> dict[str, Any]:
    spec, lay = await _layout(request, name)
    S = lay.slots_per_rank
    body: dict[str, Any] = {
        "deployment": name,
        "generation": lay.generation,
        "dp_size": lay.dp_size,
        "ep_size": len(lay.ranks),
        "slots_per_rank": S,
        "ranks": [
            {"rank": i, "node_id": r.node_id, "device_index": r.device_index}
            for i, r in enumerate(lay.ranks)
        ],
        "group": lay.group.model_dump() if lay.group else None,
        "op_id": lay.op_id,
        "committed_at": lay.committed_at,
        "placement": None,
        "balancedness": None,
    }
    phy = lay.phy2log()
    if phy is not None and phy.size:
        E = spec.model.num_experts
        counts = np.stack([np.bincount(row, minlength=E) for row in phy])
        store = request.app.state.ctx.store
        load_rec = await store.get(store.keys.load(name), LoadWindow)
        load = load_rec.value.usable(phy.shape[0], E) if load_rec else None
        scored_on = "load window"
        if load is None:
            load, scored_on = np.ones((phy.shape[0], E)), "uniform load"
        body["placement"] = {
            "num_layers": int(phy.shape[0]),
            "num_experts": E,
            "physical_slots": int(phy.shape[1]),
            "redundant_slots": int(phy.shape[1] - E),
            "replicas_min": int(counts.min()),
            "replicas_max": int(counts.max()),
            "experts_without_replica": int((counts == 0).sum()),
        }
        body["balancedness"] = {
            "value": balancedness(Placement(phy, S, num_experts=E), load),
            "scored_on": scored_on,
        }
    return body


@router.get(
    "/placement", summary="The full placement phy2log[L][R*S] (slot s of rank r is column r*S+s)"
)
async def placement(name: str, request: Request) -> dict[str, Any]:
    _, lay = await _layout(request, name)
    phy = lay.phy2log()
    return {
        "deployment": name,
        "generation": lay.generation,
        "slots_per_rank": lay.slots_per_rank,
        "num_ranks": len(lay.ranks),
        "phy2log": phy.tolist() if phy is not None else [],
    }


@router.get("/events", summary="Audit events of a deployment, newest first")
async def events(
    name: str,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    op_id: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    await _layout(request, name)
    items = await list_events(request.app.state.ctx.store, name, limit, op_id)
    return {"items": [e.model_dump(mode="json") for e in items], "count": len(items)}
