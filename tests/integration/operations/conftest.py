"""Fixtures of the operation and event tests: a controller over a seeded serving deployment
"ds" (dp 4 on nodes n1, n2; no agents, so an operation stays in PREPARING until cancelled)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.operations.serving import serving_controller
from tests.support.processes import Proc


@pytest.fixture(scope="module")
def env(etcd_server: Any) -> Iterator[tuple[Proc, str, str]]:
    """(controller, etcd endpoint, key prefix) with deployment "ds" seeded as serving; one per
    test module."""
    with serving_controller(etcd_server) as started:
        yield started


@pytest.fixture
def api(env: tuple[Proc, str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=str(env[0].url), timeout=30) as c:
        yield c
