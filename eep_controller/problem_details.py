"""The problem+json bodies (RFC 9457) that the controller's and the agents' HTTP APIs share,
so a client reads every eep error the same way."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

PROBLEM_BASE = "https://eep.dev/problems/"
PROBLEM_JSON = "application/problem+json"


def problem_body(status: int, slug: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    """One problem: `type` is PROBLEM_BASE + `slug`; `extra` fields are added as they are."""
    return {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }


def _json_safe(errors: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for err in errors:
        item = {k: v for k, v in err.items() if k in ("loc", "msg", "type")}
        item["msg"] = str(item.get("msg", "")).removeprefix("Value error, ")
        out.append(json.loads(json.dumps(item, default=str)))
    return out


def validation_problem(errors: Sequence[Any]) -> dict[str, Any]:
    """The problem for a request that failed validation (FastAPI's error list): 400
    "malformed" when the body is not a JSON object of the expected form, else 422 "invalid"
    with one `field: message` per error in `detail`; the errors themselves in `errors`."""
    safe = _json_safe(errors)
    malformed = any(
        e.get("type") in ("json_invalid", "model_attributes_type") for e in safe
    ) or any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in safe)
    if malformed:
        return problem_body(
            400,
            "malformed",
            "Malformed request",
            "the body is not a JSON object of the expected form",
            errors=safe,
        )
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in safe
    )
    return problem_body(422, "invalid", "Unprocessable request", detail, errors=safe)
