"""Liveness, readiness, metrics and who leads."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from eep_controller.api.auth import reader
from eep_controller.api.problems import Problem
from eep_controller.store import StoreUnavailable

router = APIRouter()


def _ctx(request: Request) -> Any:
    return request.app.state.ctx


@router.get("/healthz", tags=["health"], summary="The process is up")
async def healthz(request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    return {"status": "ok", "replica_id": ctx.election.replica_id}


@router.get("/readyz", tags=["health"], summary="etcd is reachable and a leader is known")
async def readyz(request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    try:
        await ctx.store.ping()
        leader = await ctx.election.leader()
    except StoreUnavailable as exc:
        p = Problem(503, "not-ready", "Not ready", f"etcd is not reachable: {exc}", etcd=False)
        p.headers["Retry-After"] = "1"
        raise p from None
    if leader is None:
        p = Problem(
            503,
            "not-ready",
            "Not ready",
            "no controller replica holds the leader lease yet",
            etcd=True,
            leader=None,
        )
        p.headers["Retry-After"] = "1"
        raise p
    return {
        "status": "ready",
        "etcd": True,
        "leader": leader.replica_id,
        "is_leader": ctx.election.is_leader,
    }


@router.get("/metrics", tags=["health"], summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    ctx = _ctx(request)
    ctx.metrics.is_leader.set(1 if ctx.election.is_leader else 0)
    ctx.metrics.etcd_up.set(1 if ctx.store.reachable else 0)
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/leader",
    tags=["health"],
    summary="The replica that currently leads",
    dependencies=[Depends(reader)],
)
async def leader(request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    record = await ctx.election.leader()
    if record is None:
        raise Problem(404, "no-leader", "No leader", "no controller replica holds the leader lease")
    return {
        **record.model_dump(exclude={"lease"}),
        "is_self": record.replica_id == ctx.election.replica_id,
    }
