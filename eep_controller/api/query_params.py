"""Query parameters a route does not take are refused, not ignored.

A client that writes ``POST .../scale?dry_run=true`` means a dry run; ignoring the unknown
parameter would start a real operation. Every route's known parameters are the query
parameters FastAPI collects from its signature and its dependencies. Health checks and
Prometheus scrapes are not checked: load balancers and scrapers may add parameters of their
own (a cache buster, a `name[]` filter).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from eep_controller.api.problems import invalid

# Only the API's routes are checked; infrastructure endpoints stay lenient.
API_PREFIX = "/v1/"
_known: dict[int, frozenset[str]] = {}


def _query_names(dependant: Dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _known_params(route: APIRoute) -> frozenset[str]:
    known = _known.get(id(route))
    if known is None:
        known = _known[id(route)] = frozenset(_query_names(route.dependant))
    return known


async def known_query_params(request: Request) -> None:
    """An app-wide dependency: a 422 problem naming the query parameters the route lacks."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not route.path.startswith(API_PREFIX):
        return  # probes and scrapers (/healthz, /readyz, /metrics) may add their own
    known = _known_params(route)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        takes = f"takes {', '.join(sorted(known))}" if known else "takes no query parameter"
        hint = "; options go in the JSON body" if request.method in ("POST", "PUT", "PATCH") else ""
        raise invalid(
            f"unknown query parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
            f"{request.method} {route.path} {takes}{hint}",
            unknown=unknown,
        )
