"""Errors as values at the boundary: every 4xx/5xx body is ``application/problem+json``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from eep_controller.problem_details import PROBLEM_JSON, problem_body, validation_problem


class Problem(Exception):
    """An error the API reports; ``extra`` fields are added to the body (e.g. active_operation)."""

    def __init__(self, status: int, slug: str, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.extra = extra
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        return problem_body(self.status, self.slug, self.title, self.detail, **self.extra)


def problem_response(problem: Problem) -> JSONResponse:
    return JSONResponse(
        problem.body(), status_code=problem.status, media_type=PROBLEM_JSON, headers=problem.headers
    )


def not_found(kind: str, name: str) -> Problem:
    return Problem(
        404, "not-found", f"{kind} not found", f"no {kind} named {name!r}", resource=kind
    )


def conflict(slug: str, detail: str, **extra: Any) -> Problem:
    return Problem(409, slug, "Conflict", detail, **extra)


def invalid(detail: str, **extra: Any) -> Problem:
    return Problem(422, "invalid", "Unprocessable request", detail, **extra)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        body = validation_problem(list(exc.errors()))
        return JSONResponse(body, status_code=body["status"], media_type=PROBLEM_JSON)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {
            404: "Not found",
            405: "Method not allowed",
            401: "Unauthorized",
            403: "Forbidden",
        }
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        problem = Problem(
            exc.status_code, slug, titles.get(exc.status_code, "HTTP error"), str(exc.detail)
        )
        if exc.headers:
            problem.headers.update(exc.headers)
        return problem_response(problem)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        from eep_controller.store import StoreUnavailable

        if isinstance(exc, StoreUnavailable):
            p = Problem(503, "store-unavailable", "etcd unavailable", str(exc))
            p.headers["Retry-After"] = "1"
            return problem_response(p)
        return problem_response(
            Problem(500, "internal", "Internal error", f"{type(exc).__name__}: {exc}")
        )
