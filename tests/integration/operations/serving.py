"""Helpers of the operation and event tests (their fixtures are in this package's conftest)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.processes import wait_for


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
