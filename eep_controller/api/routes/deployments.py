"""Deployments: declare, read, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from eep_controller.api.auth import admin, reader
from eep_controller.operations.deployments import (
    create_deployment,
    delete_deployment,
    deployment_view,
    list_deployment_views,
)
from eep_controller.protocol import DeploymentSpec

router = APIRouter(prefix="/v1/deployments", tags=["deployments"], dependencies=[Depends(reader)])


@router.post("", status_code=201, summary="Declare a deployment", dependencies=[Depends(admin)])
async def create(spec: DeploymentSpec, request: Request, response: Response) -> dict[str, Any]:
    ctx = request.app.state.ctx
    view = await create_deployment(ctx.store, spec)
    response.headers["Location"] = f"/v1/deployments/{spec.name}"
    return view.model_dump(mode="json")


@router.get("", summary="Every deployment with its status")
async def list_all(request: Request) -> dict[str, Any]:
    ctx = request.app.state.ctx
    views = await list_deployment_views(ctx.store)
    ctx.metrics.deployments.set(len(views))
    return {"items": [v.model_dump(mode="json") for v in views], "count": len(views)}


@router.get("/{name}", summary="One deployment with its status")
async def get_one(name: str, request: Request) -> dict[str, Any]:
    ctx = request.app.state.ctx
    return (await deployment_view(ctx.store, name)).model_dump(mode="json")


@router.delete(
    "/{name}",
    summary="Delete a deployment (refused while an operation is active)",
    dependencies=[Depends(admin)],
)
async def delete(name: str, request: Request) -> dict[str, Any]:
    ctx = request.app.state.ctx
    return await delete_deployment(ctx.store, name)
