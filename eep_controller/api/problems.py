"""Errors as values at the boundary: every 4xx/5xx body is ``application/problem+json``."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_BASE = "https://eep.dev/problems/"
PROBLEM_JSON = "application/problem+json"


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
        return {
            "type": PROBLEM_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }


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


def _json_safe(errors: list[Any]) -> list[dict[str, Any]]:
    out = []
    for err in errors:
        item = {k: v for k, v in err.items() if k in ("loc", "msg", "type")}
        item["msg"] = str(item.get("msg", "")).removeprefix("Value error, ")
        out.append(json.loads(json.dumps(item, default=str)))
    return out


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _json_safe(list(exc.errors()))
        malformed = any(
            e.get("type") in ("json_invalid", "model_attributes_type") for e in errors
        ) or any(
            e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors
        )
        if malformed:
            return problem_response(
                Problem(
                    400,
                    "malformed",
                    "Malformed request",
                    "the body is not a JSON object of the expected form",
                    errors=errors,
                )
            )
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors
        )
        return problem_response(invalid(detail, errors=errors))

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
