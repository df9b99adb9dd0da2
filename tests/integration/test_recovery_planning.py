"""The leader notices lost nodes and starts recovery on its own (no agents: the plan is what we check)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.processes import BIN, start_controller, wait_for
from tests.support.seeding import revoke_lease, seed_serving_deployment

SPEC = {
    "name": "rec",
    "model": {"num_moe_layers": 3, "num_experts": 12, "expert_bytes": 1000, "top_k": 2},
    "slots_per_rank": 4,
    "min_dp": 3,
    "max_dp": 8,
    "deadlines": {"preparing_s": 2, "transferring_s": 2, "switching_s": 2, "cleanup_s": 2},
}


@pytest.fixture
def env(etcd: str) -> Iterator[tuple[str, str, dict[str, int]]]:
    prefix = f"/eep-test/{uuid.uuid4().hex[:12]}"
    leases = seed_serving_deployment(etcd, prefix, SPEC, {"n1": 2, "n2": 2, "n3": 2}, dp=6)
    proc = start_controller(etcd, prefix)
    yield str(proc.url), prefix, leases
    proc.stop()


def _ops(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{url}/v1/deployments/rec/operations").json()["items"])


def test_lost_node_while_idle_starts_a_recover_operation(
    env: tuple[str, str, dict[str, int]], etcd: str
) -> None:
    url, _, leases = env
    revoke_lease(etcd, leases["n3"])
    ops = wait_for(lambda: [o for o in _ops(url) if o["kind"] == "recover"], 10, what="recover op")
    op = httpx.get(f"{url}/v1/operations/{ops[0]['id']}").json()
    assert op["request"]["reason"] == "node_lost" and op["requested_by"] == "controller"
    nodes = {p["node_id"] for p in op["plan"]["participants"]}
    assert nodes == {"n1", "n2"}  # the lost node takes no part
    assert op["plan"]["to_dp"] == 4
    assert op["plan"]["checkpoint_reloads"] > 0  # orphans come back from the checkpoint
    assert op["plan"]["transfer_world"] == "standby"
    events = httpx.get(f"{url}/v1/deployments/rec/events").json()["items"]
    assert any(e["type"] == "operation.created" and e["op_id"] == op["id"] for e in events)


def test_a_lost_node_is_listed_with_the_ranks_it_still_holds(
    env: tuple[str, str, dict[str, int]], etcd: str
) -> None:
    url, _, leases = env
    before = httpx.get(f"{url}/v1/nodes").json()
    assert before["count"] == 3 and before["lost"] == []
    revoke_lease(etcd, leases["n3"])
    # no agent runs here, so the recover operation never commits and n3 stays lost
    nodes = wait_for(
        lambda: (n := httpx.get(f"{url}/v1/nodes").json())["lost"] and n, 10, what="n3 lost"
    )
    assert sorted(n["node_id"] for n in nodes["items"]) == ["n1", "n2"]
    assert nodes["lost"] == [{"node_id": "n3", "ranks": {"rec": [4, 5]}}]
    one = httpx.get(f"{url}/v1/nodes/n3")
    assert one.status_code == 404 and one.json()["lost"] == nodes["lost"][0]
    assert "no live agent lease; it still holds ranks" in one.json()["detail"]
    assert "lost" not in httpx.get(f"{url}/v1/nodes/nope").json()
    # the gauge counts nodes (one), not the two ranks on it
    wait_for(
        lambda: 'eep_nodes{state="lost"} 1.0' in httpx.get(f"{url}/metrics").text,
        10,
        what="the lost-node gauge",
    )
    shown = subprocess.run(
        [str(BIN / "eepctl"), "--server", url, "nodes"], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "lost: n3 (agent gone) holds rec ranks 4, 5" in shown.stdout, shown.stdout


def test_lost_node_during_an_operation_aborts_it_then_recovery_follows(
    env: tuple[str, str, dict[str, int]], etcd: str
) -> None:
    url, _, leases = env
    r = httpx.post(f"{url}/v1/deployments/rec/scale", json={"dp_size": 5}, timeout=30)
    assert r.status_code == 202
    first = r.json()["id"]
    wait_for(
        lambda: httpx.get(f"{url}/v1/operations/{first}").json()["state"] == "PREPARING",
        10,
        what="PREPARING",
    )
    revoke_lease(etcd, leases["n2"])
    aborted = wait_for(
        lambda: (o := httpx.get(f"{url}/v1/operations/{first}").json())["state"] == "ABORTED" and o,
        10,
        what="abort",
    )
    assert "n2" in aborted["error"] and "lost" in aborted["error"]
    assert httpx.get(f"{url}/v1/deployments/rec/layout").json()["generation"] == 1  # g unchanged
    wait_for(
        lambda: any(o["kind"] == "recover" for o in _ops(url)),
        10,
        what="recover op after the abort",
    )


def test_recover_that_leaves_too_few_ranks_for_every_expert_takes_a_free_device(
    etcd: str,
) -> None:
    """12 experts need 3 ranks of 4 slots. Two of three serving nodes are lost, and the two
    surviving ranks cannot hold every expert: the recover takes a free device (n4) to reach
    3 ranks. It used to ask for 2, which planning refused, again and again, while the
    deployment stayed broken and refused user requests until a recover ran."""
    prefix = f"/eep-test/{uuid.uuid4().hex[:12]}"
    leases = seed_serving_deployment(etcd, prefix, SPEC, {"n1": 2, "n2": 2, "n3": 2, "n4": 1}, dp=6)
    proc = start_controller(etcd, prefix)
    try:
        url = str(proc.url)
        revoke_lease(etcd, leases["n2"])
        revoke_lease(etcd, leases["n3"])
        ops = wait_for(
            lambda: [o for o in _ops(url) if o["kind"] == "recover"], 15, what="recover op"
        )
        op = httpx.get(f"{url}/v1/operations/{ops[0]['id']}").json()
        assert op["plan"]["to_dp"] == 3
        placed = sorted(
            (p["node_id"], p["old_rank"] is None)
            for p in op["plan"]["participants"]
            if p["new_rank"] is not None
        )
        assert placed == [("n1", False), ("n1", False), ("n4", True)]
    finally:
        proc.stop()
