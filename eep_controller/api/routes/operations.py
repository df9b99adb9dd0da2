"""Operations: scale a deployment, watch the operation, cancel it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from eep_controller.api.auth import Principal, admin, reader
from eep_controller.operations.service import (
    OP_ID_PATTERN,
    cancel_operation,
    create_operation,
    get_operation,
    list_operations,
)
from eep_controller.protocol import ScaleRequest

router = APIRouter(tags=["operations"], dependencies=[Depends(reader)])

IDEMPOTENCY_KEY = r"^[A-Za-z0-9._:-]{1,200}$"


def _wake(request: Request) -> None:
    reconciler = request.app.state.ctx.extras.get("reconciler")
    if reconciler is not None:
        reconciler.wake.set()


@router.post(
    "/v1/deployments/{name}/scale",
    summary="Scale a deployment to dp_size (202 + operation; 200 for a no-op or a dry run)",
    responses={
        200: {"description": "no-op or dry-run preview"},
        202: {"description": "operation created"},
    },
)
async def scale(
    name: str,
    body: ScaleRequest,
    request: Request,
    response: Response,
    principal: Annotated[Principal, Depends(admin)],
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY)
    ] = None,
) -> dict[str, Any]:
    ctx = request.app.state.ctx
    outcome = await create_operation(
        ctx.store,
        name,
        body,
        requested_by=principal.name,
        idempotency_key=idempotency_key,
        link_bandwidth=ctx.settings.operations.link_bandwidth_bytes_per_s,
    )
    response.status_code = outcome.status
    if outcome.status == 202:
        response.headers["Location"] = f"/v1/operations/{outcome.body['id']}"
        _wake(request)
    return outcome.body


@router.get("/v1/operations/{op_id}", summary="One operation with its progress")
async def get_op(op_id: str, request: Request) -> dict[str, Any]:
    return await get_operation(request.app.state.ctx.store, op_id)


@router.post(
    "/v1/operations/{op_id}/cancel",
    status_code=202,
    summary="Cancel an operation (honoured before SWITCHING; 409 after)",
)
async def cancel(
    op_id: str, request: Request, principal: Annotated[Principal, Depends(admin)]
) -> dict[str, Any]:
    body = await cancel_operation(request.app.state.ctx.store, op_id, principal.name)
    _wake(request)
    return body


@router.get("/v1/deployments/{name}/operations", summary="A deployment's operations, newest first")
async def history(
    name: str,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    before: Annotated[
        str | None,
        Query(pattern=OP_ID_PATTERN, description="the last id of the previous page"),
    ] = None,
) -> dict[str, Any]:
    return await list_operations(request.app.state.ctx.store, name, limit, before)
