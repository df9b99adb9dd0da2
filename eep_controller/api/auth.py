"""Bearer-token auth: ``admin`` tokens may mutate, ``read`` tokens may read."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from eep_controller.api.problems import Problem
from eep_controller.config import AuthSettings, Role


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role | None


class TokenAuth:
    """Checks ``Authorization: Bearer <token>``; compares in constant time; never logs tokens."""

    def __init__(self, settings: AuthSettings) -> None:
        self._roles = settings.token_roles()
        self.open_reads = settings.open_reads

    @property
    def enabled(self) -> bool:
        return bool(self._roles)

    def _principal(self, request: Request) -> Principal | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        for known, role in self._roles.items():
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                return Principal(name=f"token:{role.value}:{hash(known) & 0xFFFF:04x}", role=role)
        return None

    def _unauthorized(self, detail: str) -> Problem:
        p = Problem(401, "unauthorized", "Unauthorized", detail)
        p.headers["WWW-Authenticate"] = 'Bearer realm="eep"'
        return p

    def require_read(self, request: Request) -> Principal:
        if not self.enabled:
            return Principal("anonymous", Role.ADMIN)
        principal = self._principal(request)
        if principal is None:
            if self.open_reads and "authorization" not in request.headers:
                return Principal("anonymous", None)
            raise self._unauthorized("a valid bearer token is required")
        return principal

    def require_admin(self, request: Request) -> Principal:
        if not self.enabled:
            return Principal("anonymous", Role.ADMIN)
        principal = self._principal(request)
        if principal is None:
            raise self._unauthorized("a valid bearer token is required to change anything")
        if principal.role is not Role.ADMIN:
            raise Problem(403, "forbidden", "Forbidden", "this token may only read")
        return principal


def admin(request: Request) -> Principal:
    """FastAPI dependency: an admin token (runs before the body is parsed)."""
    auth: TokenAuth = request.app.state.ctx.auth
    return auth.require_admin(request)


def reader(request: Request) -> Principal:
    """FastAPI dependency: any valid token, or none when reads are open."""
    auth: TokenAuth = request.app.state.ctx.auth
    return auth.require_read(request)
