"""The OpenAPI document says what errors really look like: ``application/problem+json``.

FastAPI documents a route's 422 as its own ``HTTPValidationError`` (``application/json``)
and no other error at all, while every eep error is a problem body (RFC 9457). A client
generated from ``/openapi.json`` would then parse errors wrongly. The document is therefore
post-processed once: a ``Problem`` schema, and on every ``/v1`` operation the errors it can
answer, each with that schema under ``application/problem+json``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from eep_controller.problem_details import PROBLEM_BASE, PROBLEM_JSON

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": (
        "An error (RFC 9457). Besides these fields a problem may carry others that explain "
        "it: `active_operation`, `missing`, `unknown`, `lost`, `resource`..."
    ),
    "properties": {
        "type": {
            "type": "string",
            "format": "uri",
            "description": f"{PROBLEM_BASE}<slug>, e.g. {PROBLEM_BASE}invalid",
        },
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string", "description": "what went wrong, for a person"},
        "errors": {
            "type": "array",
            "description": "400 and 422 from validation: one entry per failed field",
            "items": {
                "type": "object",
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
    "required": ["type", "title", "status", "detail"],
    "additionalProperties": True,
}

# what each error means on any /v1 route
ERRORS = {
    400: "Malformed request: the body is not a JSON object of the expected form",
    401: "No bearer token, or one the controller does not know (when tokens are configured)",
    403: "The token's role may not do this (a read token on a change)",
    404: "No such deployment, operation or node",
    409: "Conflicts with the current state: an active operation, a name taken, too late to cancel",
    413: "The body is larger than server.max_body_bytes",
    422: "Invalid request: a field, a query parameter the route does not take, a plan that "
    "cannot be made (not enough devices: `missing`)",
    503: "etcd cannot be reached (Retry-After: 1)",
}
CHANGES = ("post", "put", "patch", "delete")


def _errors_of(path: str, method: str, operation: dict[str, Any]) -> list[int]:
    codes = [401, 403, 422, 503]
    if "{" in path:
        codes.append(404)
    if method in CHANGES:
        codes.append(409)
        if "requestBody" in operation:
            codes += [400, 413]
    return sorted(codes)


def problem_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document with its errors as problems (built once, then cached)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    problem = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, methods in doc.get("paths", {}).items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in methods.items():
            responses = operation.setdefault("responses", {})
            for code in _errors_of(path, method, operation):
                entry = responses.setdefault(str(code), {"description": ERRORS[code]})
                entry["content"] = problem
                if entry.get("description") == "Validation Error":  # FastAPI's own 422
                    entry["description"] = ERRORS[code]
    # FastAPI's validation schemas, once no route refers to them any more
    if "#/components/schemas/HTTPValidationError" not in json.dumps(doc["paths"]):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
    app.openapi_schema = doc
    return doc
