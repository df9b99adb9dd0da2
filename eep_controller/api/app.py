"""The controller's FastAPI application and the background tasks of one replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from fastapi import Depends, FastAPI, Request, Response

from eep_controller import __version__
from eep_controller.api.context import ControllerContext
from eep_controller.api.limits import BodySizeLimit
from eep_controller.api.openapi import problem_openapi
from eep_controller.api.problems import Problem, install_problem_handlers, problem_response
from eep_controller.api.query_params import known_query_params
from eep_controller.api.routes import deployments, health, layouts, nodes, operations, stream
from eep_controller.errors import EepError
from eep_controller.planner.workers import configure_workers, shutdown_workers
from eep_controller.tasks import cancel_and_wait

log = logging.getLogger(__name__)

BackgroundFactory = Callable[[ControllerContext], Coroutine[Any, Any, None]]


def _domain_problem(exc: EepError) -> Problem:
    return Problem(exc.status, exc.slug, exc.title, exc.detail, **exc.extra)


def create_app(
    ctx: ControllerContext, background: list[BackgroundFactory] | None = None
) -> FastAPI:
    """The HTTP API over ``ctx``; ``background`` coroutines run while the app runs."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        configure_workers(ctx.settings.planner.workers)
        ctx.election.start()
        for factory in background or []:
            ctx.background.append(
                asyncio.create_task(factory(ctx), name=getattr(factory, "__name__", "bg"))
            )
        try:
            yield
        finally:
            await cancel_and_wait(ctx.background)
            ctx.background.clear()
            await ctx.election.stop()
            await asyncio.to_thread(shutdown_workers)

    app = FastAPI(
        title="eep controller",
        version=__version__,
        summary="Elastic expert parallelism control plane for MoE serving",
        lifespan=lifespan,
        dependencies=[Depends(known_query_params)],
    )
    app.state.ctx = ctx
    app.openapi = lambda: problem_openapi(app)  # type: ignore[method-assign]
    install_problem_handlers(app)

    @app.exception_handler(EepError)
    async def _domain(_: Request, exc: EepError) -> Response:
        return problem_response(_domain_problem(exc))

    @app.middleware("http")
    async def _count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        ctx.metrics.http_requests.labels(request.method, path, str(response.status_code)).inc()
        return response

    app.add_middleware(BodySizeLimit, max_bytes=ctx.settings.server.max_body_bytes)
    app.include_router(health.router)
    app.include_router(nodes.router)
    app.include_router(deployments.router)
    app.include_router(operations.router)
    app.include_router(layouts.router)
    app.include_router(stream.router)
    return app
