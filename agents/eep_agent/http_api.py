"""The agent's HTTP endpoint: health, its workers, and the forward endpoint of the reference runtime.

Errors are ``application/problem+json``; a forward that the worker cannot serve with the
experts it holds, or that reaches a draining worker, is ``409`` with a type ending in
``/stale-layout``: the caller re-reads the layout and retries.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from eep_agent import __version__
from eep_agent.runtime.commands import Forward, ForwardResult
from eep_agent.worker_pool import WorkerError, WorkerGone
from eep_controller.problem_details import PROBLEM_JSON, problem_body, validation_problem
from eep_controller.protocol import EncodedArray, ForwardRequest, ForwardResponse

if TYPE_CHECKING:
    from eep_agent.daemon import AgentDaemon

FORWARD_TIMEOUT_S = 60.0


def problem(status: int, slug: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = problem_body(status, slug, title, detail, **extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def build_app(daemon: AgentDaemon) -> FastAPI:
    """The agent's FastAPI app; ``daemon`` is the running :class:`AgentDaemon`."""
    app = FastAPI(title="eep agent", version=__version__)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        body = validation_problem(list(exc.errors()))
        return JSONResponse(body, status_code=body["status"], media_type=PROBLEM_JSON)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "node_id": daemon.settings.node_id, "registered": daemon.registered}

    @app.get("/v1/workers")
    async def workers() -> dict[str, Any]:
        out = []
        for handle in daemon.pool.all():
            record = handle.record
            out.append(
                {
                    "deployment": handle.identity.deployment,
                    "device_index": handle.identity.device_index,
                    "device_kind": handle.identity.device_kind,
                    "rank": record.rank,
                    "generation": record.generation,
                    "pid": handle.pid,
                    "alive": handle.alive,
                    "state": record.state,
                    "op_id": record.op_id,
                    "served_requests": record.served,
                    "aborted_requests": record.aborted,
                    "inflight_requests": record.inflight,
                    # as of the worker's last load report (every --load-interval); null
                    # until one came: a restarted worker has none until the next operation
                    "active_group": record.has_active_group,
                }
            )
        return {"node_id": daemon.settings.node_id, "workers": out}

    @app.post("/v1/deployments/{deployment}/devices/{device_index}/forward", response_model=None)
    async def forward(
        deployment: str, device_index: int, body: ForwardRequest
    ) -> JSONResponse | ForwardResponse:
        handle = daemon.pool.get(deployment, device_index)
        if handle is None or not handle.alive:
            return problem(
                404,
                "no-worker",
                "No worker",
                f"no running worker of {deployment} on device {device_index}",
            )
        record = handle.record
        if record.draining:
            return problem(
                409,
                "stale-layout",
                "Stale layout",
                "the worker is draining: it is leaving the deployment",
            )
        try:
            experts = body.experts.decode().astype(np.int64)
            tokens = body.tokens.decode().astype(np.float32)
        except ValueError as exc:
            return problem(400, "malformed", "Invalid arrays", str(exc))
        if experts.ndim != 1 or tokens.ndim != 2 or tokens.shape[0] != experts.shape[0]:
            return problem(
                422, "invalid", "Invalid shapes",
                f"experts must be [n] and tokens [n, H]; got {list(experts.shape)} and {list(tokens.shape)}",
            )  # fmt: skip
        future = handle.submit(Forward(body.layer, experts, tokens))
        record.inflight += 1
        record.pending_forwards.add(future)
        try:
            result: ForwardResult = await asyncio.wait_for(
                asyncio.wrap_future(future), FORWARD_TIMEOUT_S
            )
        except WorkerGone as exc:
            return problem(503, "worker-gone", "Worker gone", str(exc))
        except WorkerError as exc:
            if exc.stale:
                return problem(409, "stale-layout", "Stale layout", str(exc))
            return problem(422, "forward-failed", "Forward failed", str(exc))
        except asyncio.TimeoutError:
            return problem(
                504,
                "forward-timeout",
                "Forward timed out",
                f"no answer within {FORWARD_TIMEOUT_S}s",
            )
        finally:
            record.inflight -= 1
            record.pending_forwards.discard(future)
        record.served += 1
        return ForwardResponse(
            generation=result.generation, outputs=EncodedArray.encode(result.outputs)
        )

    return app
