"""Helpers of the operation and event tests (their fixtures are in this package's conftest)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import httpx

from tests.support.processes import Proc, start_controller, wait_for
from tests.support.seeding import seed_serving_deployment


def spec(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"num_moe_layers": 4, "num_experts": 16, "expert_bytes": 1 << 20, "top_k": 2},
        "slots_per_rank": 8,
        "min_dp": 2,
        "max_dp": 8,
    }


def cancel_active(api: httpx.Client, name: str = "ds") -> None:
    """Cancel the deployment's active operation, if any, and wait for its lock to go."""
    active = api.get(f"/v1/deployments/{name}").json()["active_operation"]
    if active:
        api.post(f"/v1/operations/{active}/cancel")
        wait_for(
            lambda: api.get(f"/v1/deployments/{name}").json()["active_operation"] is None,
            10,
            what="lock free",
        )


@contextlib.contextmanager
def serving_controller(
    etcd_server: Any, name: str = "ds", env: dict[str, str] | None = None
) -> Iterator[tuple[Proc, str, str]]:
    """(controller, etcd endpoint, key prefix) over deployment `name` seeded as serving at
    dp 4 on nodes n1, n2 (no agents: an operation stays in PREPARING until cancelled), under
    a fresh prefix; the controller (with `env`) is stopped afterwards."""
    if etcd_server.proc is None:
        etcd_server.start()
    prefix = f"/eep-test/{uuid.uuid4().hex[:12]}"
    seed_serving_deployment(etcd_server.endpoint, prefix, spec(name), {"n1": 4, "n2": 3}, dp=4)
    proc = start_controller(etcd_server.endpoint, prefix, env=env)
    try:
        yield proc, etcd_server.endpoint, prefix
    finally:
        proc.stop()
