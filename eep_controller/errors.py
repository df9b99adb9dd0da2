"""Domain errors raised below the API; the API turns each into one problem+json status."""

from __future__ import annotations

from typing import Any


class EepError(Exception):
    status = 500
    slug = "internal"
    title = "Internal error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class NotFound(EepError):
    status = 404
    slug = "not-found"
    title = "Not found"


class Conflict(EepError):
    status = 409
    slug = "conflict"
    title = "Conflict"


class ActiveOperation(Conflict):
    slug = "active-operation"
    title = "Another operation is active"


class Invalid(EepError):
    status = 422
    slug = "invalid"
    title = "Unprocessable request"


class InsufficientDevices(Invalid):
    slug = "insufficient-devices"
    title = "Not enough free devices"
