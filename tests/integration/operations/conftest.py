"""Fixtures of the operation and event tests: a controller over a seeded serving deployment
"ds" (dp 4 on nodes n1, n2; no agents, so an operation stays in PREPARING until cancelled)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.operations.serving import spec
from tests.support.processes import Proc, start_controller
from tests.support.seeding import seed_serving_deployment


@pytest.fixture(scope="module")
def env(etcd_server: Any) -> Iterator[tuple[Proc, str, str]]:
    """(controller, etcd endpoint, key prefix) with deployment "ds" seeded as serving; one per
    test module."""
    if etcd_server.proc is None:
        etcd_server.start()
    prefix = f"/eep-test/{uuid.uuid4().hex[:12]}"
    seed_serving_deployment(etcd_server.endpoint, prefix, spec("ds"), {"n1": 4, "n2": 3}, dp=4)
    proc = start_controller(etcd_server.endpoint, prefix)
    try:
        yield proc, etcd_server.endpoint, prefix
    finally:
        proc.stop()


@pytest.fixture
def api(env: tuple[Proc, str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=str(env[0].url), timeout=30) as c:
        yield c
