"""Nodes: what the agents registered under their leases."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from eep_controller.api.auth import reader
from eep_controller.api.problems import not_found
from eep_controller.operations.deployments import live_nodes, lost_nodes
from eep_controller.protocol import NodeInfo

router = APIRouter(prefix="/v1/nodes", tags=["nodes"], dependencies=[Depends(reader)])


@router.get("", summary="Nodes with a live agent lease, and lost nodes that still hold ranks")
async def list_nodes(request: Request) -> dict[str, Any]:
    ctx = request.app.state.ctx
    nodes = await ctx.store.list(ctx.keys.nodes(), NodeInfo)
    ctx.metrics.nodes.labels(state="ready").set(len(nodes))
    lost = await lost_nodes(ctx.store, frozenset(n.value.node_id for n in nodes))
    return {
        "items": [n.value.model_dump(mode="json") for n in nodes],
        "count": len(nodes),
        "lost": [n.model_dump(mode="json") for n in lost],
    }


@router.get("/{node_id}", summary="One node")
async def get_node(node_id: str, request: Request) -> dict[str, Any]:
    ctx = request.app.state.ctx
    got = await ctx.store.get(ctx.keys.node(node_id), NodeInfo) if "/" not in node_id else None
    if got is None:
        problem = not_found("node", node_id)
        live = await live_nodes(ctx.store)
        lost = next((n for n in await lost_nodes(ctx.store, live) if n.node_id == node_id), None)
        if lost is not None:
            # gone, but still in some layout until a recover operation moves its ranks
            problem.detail = f"node {node_id!r} has no live agent lease; it still holds ranks"
            problem.extra["lost"] = lost.model_dump(mode="json")
        raise problem
    return dict(got.value.model_dump(mode="json"))
