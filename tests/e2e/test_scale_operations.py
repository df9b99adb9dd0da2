"""Scale operations end to end through the REST API: real etcd, controller, agents, workers."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from eep_controller.store import EmbeddedEtcd
from tests.conftest import dump_sync
from tests.e2e.cluster import (
    LAYERS,
    TERMINAL,
    Cluster,
    ProbeLoop,
    commit_counts,
    make_cluster,
)
from tests.support.processes import wait_for

pytestmark = [pytest.mark.torch, pytest.mark.timeout(420)]

SLOW_TRANSFERS = {"EEP_TEST_TRANSFER_ROUND_PAUSE_S": "0.4"}


@pytest.fixture
def cluster(private_etcd: EmbeddedEtcd, tmp_path: Path) -> Iterator[Cluster]:
    c = make_cluster(private_etcd, tmp_path)
    yield c
    c.stop()


def _ended_recover(cluster: Cluster, seen: set[str] | None = None) -> dict[str, Any] | None:
    """The newest recover operation not in `seen`, once it has ended; else None."""
    with cluster.api() as api:
        items = api.get("/v1/deployments/moe/operations").json()["items"]
    rec = [o for o in items if o["kind"] == "recover" and o["id"] not in (seen or set())]
    return rec[0] if rec and rec[0]["state"] in TERMINAL else None


def _assert_exactly_once(cluster: Cluster, op: dict[str, object], generation_before: int) -> None:
    committed, finished = commit_counts(cluster.events(), str(op["id"]))
    assert finished == 1
    layout = cluster.layout()
    if op["state"] == "SUCCEEDED":
        assert committed == 1
        assert layout.generation == generation_before + 1 and layout.op_id == op["id"]
    else:
        assert committed == 0
        assert layout.generation == generation_before


def test_scale_2_4_3_2_with_exact_probes_and_no_failed_requests(cluster: Cluster) -> None:
    cluster.start_controller()
    cluster.start_agent("a")
    cluster.start_agent("b")
    cluster.bring_up(initial_dp=2, max_dp=4)
    first = cluster.probe(num_tokens=32, seed=1)
    assert first.ok and first.generation == 1, first

    with cluster.api() as api:
        before = dump_sync(cluster.etcd.endpoint, cluster.prefix)
        preview = api.post("/v1/deployments/moe/scale", json={"dp_size": 4, "dry_run": True})
        assert preview.status_code == 200 and preview.json()["plan"]["to_dp"] == 4
        assert (
            dump_sync(cluster.etcd.endpoint, cluster.prefix) == before
        )  # a dry run changes nothing

    with ProbeLoop(cluster) as traffic:
        # ten callers race: exactly one operation, nine 409s naming it
        def post(_: int) -> httpx.Response:
            return httpx.post(
                f"{cluster.url}/v1/deployments/moe/scale", json={"dp_size": 4}, timeout=60
            )

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(post, range(10)))
        assert sorted(r.status_code for r in responses) == [202] + [409] * 9
        winner = next(r.json()["id"] for r in responses if r.status_code == 202)
        assert all(
            r.json()["active_operation"] == winner for r in responses if r.status_code == 409
        )
        ops = [cluster.wait_op(winner)]

        # an idempotent retry returns the same operation
        key = {"Idempotency-Key": "scale-to-3"}
        with cluster.api() as api:
            a = api.post("/v1/deployments/moe/scale", json={"dp_size": 3}, headers=key)
            b = api.post("/v1/deployments/moe/scale", json={"dp_size": 3}, headers=key)
        assert a.status_code == b.status_code == 202 and a.json()["id"] == b.json()["id"]
        ops.append(cluster.wait_op(a.json()["id"]))
        ops.append(cluster.wait_op(cluster.scale(2)["id"]))

        for gen, (op, dp) in enumerate(zip(ops, (4, 3, 2), strict=True), start=2):
            assert op["state"] == "SUCCEEDED", op
            assert op["to_generation"] == gen and op["plan"]["to_dp"] == dp
            assert op["aborted_requests"] == 0
    assert not traffic.crashes, traffic.crashes[:3]
    assert traffic.results, "the probe loop ran"
    assert traffic.failed_requests == 0
    assert not traffic.mismatches, traffic.mismatches[:2]
    final = cluster.probe(num_tokens=32, seed=2)
    assert final.ok and final.generation == 4
    assert cluster.layout().dp_size == 2


def test_cancel_during_transferring_aborts_and_keeps_serving(cluster: Cluster) -> None:
    cluster.start_controller()
    cluster.start_agent("a", env=SLOW_TRANSFERS)
    cluster.start_agent("b", env=SLOW_TRANSFERS)
    cluster.bring_up(initial_dp=2, max_dp=4)
    op = cluster.scale(4)
    cluster.wait_op(op["id"], 60, states=("TRANSFERRING",))
    with cluster.api() as api:
        assert api.post(f"/v1/operations/{op['id']}/cancel").status_code == 202
    done = cluster.wait_op(op["id"], 60)
    assert done["state"] == "ABORTED" and "cancel" in done["error"]
    _assert_exactly_once(cluster, done, 1)
    with cluster.api() as api:
        assert api.get("/v1/deployments/moe").json()["active_operation"] is None  # the lock is free
    result = cluster.probe(num_tokens=32, seed=3)
    assert result.ok and result.generation == 1, result
    # the aborted standby world left nothing behind: the next scale works
    again = cluster.wait_op(cluster.scale(3)["id"], 120)
    assert again["state"] == "SUCCEEDED", again
    assert cluster.probe(num_tokens=16, seed=4).ok


def test_a_cancel_in_preparing_frees_the_serving_workers_for_the_next_operation_at_once(
    cluster: Cluster,
) -> None:
    """The joining node is paused, so the serving ranks wait in the standby rendezvous for
    ranks that never come. A cancel must free them at once: they used to wait out the phase
    deadline (60 s), and the next operation's PREPARING waited behind them."""
    cluster.start_controller()
    cluster.start_agent("a")
    joining = cluster.start_agent("b", lease_ttl=30)  # paused below for longer than 2 s
    cluster.bring_up(initial_dp=2, max_dp=4)
    assert {r.node_id for r in cluster.layout().ranks} == {"a"}
    joining.signal(signal.SIGSTOP)
    try:
        op = cluster.scale(4)
        wait_for(lambda: cluster.rendezvous_published(op["id"]), 30, what="the rendezvous host")
        time.sleep(0.5)  # the serving ranks are in the rendezvous now
        with cluster.api() as api:
            assert api.post(f"/v1/operations/{op['id']}/cancel").status_code == 202
        done = cluster.wait_op(op["id"], 30)
        assert done["state"] == "ABORTED" and "cancel" in done["error"], done
    finally:
        joining.signal(signal.SIGCONT)
    again = cluster.wait_op(cluster.scale(3)["id"], 120)
    assert again["state"] == "SUCCEEDED", again
    preparing = next(h for h in again["history"] if h["phase"] == "PREPARING")
    assert preparing["ended_at"] - preparing["started_at"] < 20, again["history"]
    assert cluster.probe(num_tokens=16, seed=10).ok


def test_agent_killed_during_transferring_aborts_then_recovers(cluster: Cluster) -> None:
    cluster.start_controller()
    for node in ("a", "b", "c"):
        cluster.start_agent(node, env=SLOW_TRANSFERS)
    cluster.bring_up(initial_dp=4, max_dp=6, transferring_s=30)
    assert {r.node_id for r in cluster.layout().ranks} == {"a", "b"}
    op = cluster.scale(6)
    cluster.wait_op(op["id"], 60, states=("TRANSFERRING",))
    cluster.agents["b"].kill9()
    done = cluster.wait_op(op["id"], 40)
    assert done["state"] == "ABORTED", done
    assert done["updated_at"] - done["history"][-1]["started_at"] <= 30  # within the phase deadline
    _assert_exactly_once(cluster, done, 1)

    recovered = wait_for(
        lambda: _ended_recover(cluster), 120, interval=0.5, what="the recover operation"
    )
    assert recovered["state"] == "SUCCEEDED", recovered
    assert recovered["request"]["reason"] == "node_lost"
    layout = cluster.layout()
    assert "b" not in {r.node_id for r in layout.ranks}
    with cluster.api() as api:
        placement = api.get("/v1/deployments/moe/layout").json()["placement"]
    assert placement["experts_without_replica"] == 0
    result = cluster.probe(num_tokens=32, seed=5)
    assert result.ok and result.generation == layout.generation, result
    with cluster.api() as api:
        healed = api.get("/v1/deployments/moe").json()
    assert healed["status"] == "serving" and healed["note"] is None, healed


def test_each_of_several_node_losses_in_a_row_is_recovered_promptly(cluster: Cluster) -> None:
    """Each loss takes the node holding every rank; the node comes back empty after its
    recover. Every operation the controller starts on its own raises its backoff, and only
    a success clears it: without that, each later recover waits longer to start (8, 16,
    32 s, ...) while the deployment has no live rank."""
    cluster.start_controller()
    cluster.start_agent("a")
    cluster.bring_up(initial_dp=2, max_dp=4)
    cluster.start_agent("b")
    recovered: set[str] = set()
    for _ in range(4):
        (holder,) = {r.node_id for r in cluster.layout().ranks}
        cluster.agents[holder].kill9()
        killed_at = time.time()

        op = wait_for(
            lambda: _ended_recover(cluster, recovered), 90, interval=0.3, what="the recover"
        )
        recovered.add(str(op["id"]))
        assert op["state"] == "SUCCEEDED", op
        # lease expiry (2 s) and a reconcile pass, not a growing backoff
        assert op["created_at"] - killed_at < 10, op["created_at"] - killed_at
        cluster.start_agent(holder)  # the node comes back, free for the next round
    assert cluster.probe(num_tokens=16, seed=11).ok


def test_controller_killed_mid_operation_ends_it_exactly_once_after_restart(
    cluster: Cluster,
) -> None:
    cluster.start_controller("c1")
    cluster.start_agent("a", env=SLOW_TRANSFERS)
    cluster.start_agent("b", env=SLOW_TRANSFERS)
    cluster.bring_up(initial_dp=2, max_dp=4)
    op = cluster.scale(4)
    cluster.wait_op(op["id"], 60, states=("TRANSFERRING",))
    cluster.controllers[0].kill9()
    cluster.start_controller("c1-restarted")
    done = cluster.wait_op(op["id"], 120)
    _assert_exactly_once(cluster, done, 1)
    assert cluster.probe(num_tokens=16, seed=6).ok


def test_leader_failover_mid_operation_ends_it_exactly_once(cluster: Cluster) -> None:
    one = cluster.start_controller("one")
    two = cluster.start_controller("two")
    cluster.start_agent("a", env=SLOW_TRANSFERS)
    cluster.start_agent("b", env=SLOW_TRANSFERS)
    cluster.bring_up(initial_dp=2, max_dp=4)
    with cluster.api() as api:
        leader = api.get("/v1/leader").json()["replica_id"]
    op = cluster.scale(4)
    cluster.wait_op(op["id"], 60, states=("TRANSFERRING",))
    (one if leader == "one" else two).kill9()
    done = cluster.wait_op(op["id"], 120)
    _assert_exactly_once(cluster, done, 1)
    with cluster.api() as api:
        assert api.get("/v1/leader").json()["replica_id"] != leader
    assert cluster.probe(num_tokens=16, seed=7).ok


def test_etcd_restart_during_an_operation_ends_consistently(cluster: Cluster) -> None:
    cluster.start_controller()
    cluster.start_agent("a", env=SLOW_TRANSFERS)
    cluster.start_agent("b", env=SLOW_TRANSFERS)
    cluster.bring_up(initial_dp=2, max_dp=4)
    op = cluster.scale(4)
    cluster.wait_op(op["id"], 60, states=("TRANSFERRING",))
    cluster.etcd.kill()
    cluster.etcd.start()
    done = cluster.wait_op(op["id"], 120)
    _assert_exactly_once(cluster, done, 1)
    with cluster.api() as api:
        assert api.get("/v1/deployments/moe").json()["active_operation"] is None
    result = cluster.probe(num_tokens=16, seed=8)
    assert result.ok and result.generation == cluster.layout().generation


def test_every_serving_node_lost_waits_for_devices_then_reloads_from_the_checkpoint(
    cluster: Cluster,
) -> None:
    """The only serving node dies: no live rank holds any expert. The recover waits (with an
    event) until devices join, then loads every slot from the checkpoint onto them."""
    cluster.start_controller()
    cluster.start_agent("a")
    cluster.bring_up(initial_dp=2, max_dp=4)
    assert {r.node_id for r in cluster.layout().ranks} == {"a"}
    cluster.agents["a"].kill9()
    waiting = wait_for(
        lambda: [e for e in cluster.events() if e.type == "deployment.waiting"],
        30,
        interval=0.5,
        what="the recover to wait for devices",
    )
    assert "lost" in waiting[0].message, waiting[0]
    with cluster.api() as api:
        view = api.get("/v1/deployments/moe").json()
    # the deployment says it is not whole and why it does not move on
    assert view["status"] == "degraded" and view["note"] == waiting[-1].message, view
    cluster.start_agent("c")

    recovered = wait_for(
        lambda: _ended_recover(cluster), 120, interval=0.5, what="the recover operation"
    )
    assert recovered["state"] == "SUCCEEDED", recovered
    plan = recovered["plan"]
    assert plan["to_dp"] == 2
    # every slot of every layer came from the checkpoint: no live rank could send
    assert plan["checkpoint_reloads"] == plan["copies"] == 2 * 4 * LAYERS
    layout = cluster.layout()
    assert {r.node_id for r in layout.ranks} == {"c"}
    with cluster.api() as api:
        placement = api.get("/v1/deployments/moe/layout").json()["placement"]
    assert placement["experts_without_replica"] == 0
    result = cluster.probe(num_tokens=32, seed=9)
    assert result.ok and result.generation == layout.generation, result
    with cluster.api() as api:
        whole = api.get("/v1/deployments/moe").json()
    assert whole["status"] == "serving" and whole["note"] is None, whole


def test_a_bring_up_that_keeps_aborting_says_why_in_the_deployments_note(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_controller()
    cluster.start_agent("n1", devices=2)
    spec = cluster.spec(initial_dp=2, max_dp=2)
    spec["checkpoint"] = str(tmp_path / "no-such-checkpoint")
    with cluster.api() as api:
        assert api.post("/v1/deployments", json=spec).status_code == 201

        def aborted() -> dict[str, Any] | None:
            items = api.get("/v1/deployments/moe/operations").json()["items"]
            return next((o for o in items if o["state"] == "ABORTED"), None)

        wait_for(aborted, 60, what="an aborted bring-up")
        # between tries it is pending, and the note carries the abort's reason, not nothing
        # (during a retry it is "scaling", with no note)
        view = wait_for(
            lambda: (v := api.get("/v1/deployments/moe").json())["note"] and v, 60, what="a note"
        )
        assert view["status"] == "pending", view
        assert "aborted" in view["note"] and "no checkpoint at" in view["note"], view


def test_a_scale_down_after_a_worker_restart_goes_over_the_standby_world(
    cluster: Cluster,
) -> None:
    import os
    import signal as signals

    from tests.conftest import dump_sync as dump

    cluster.start_controller()
    cluster.start_agent("a")
    cluster.start_agent("b")
    cluster.bring_up(initial_dp=4, max_dp=4)
    layout = cluster.layout()
    node, device = layout.ranks[1].node_id, layout.ranks[1].device_index
    with httpx.Client(base_url=str(cluster.agents[node].url), timeout=10) as agent:
        workers = agent.get("/v1/workers").json()["workers"]
    os.kill(next(w["pid"] for w in workers if w["device_index"] == device), signals.SIGKILL)
    wait_for(
        lambda: any(e.type == "worker.restarted" for e in cluster.events()), 60, what="a restart"
    )
    # the agent tells the controller that rank 1 has no active group any more
    groupless = f"{cluster.prefix}/deployments/moe/groupless/{layout.generation}/1"
    wait_for(lambda: groupless in dump(cluster.etcd.endpoint, cluster.prefix), 10, what="record")
    with cluster.api() as api:
        preview = api.post("/v1/deployments/moe/scale", json={"dp_size": 2, "dry_run": True})
        note = preview.json()["plan"].get("transfer_note", "")
        assert "standby world: rank(s) [1] hold no active group" in note, preview.json()
        r = api.post("/v1/deployments/moe/scale", json={"dp_size": 2})
        assert r.status_code == 202, r.text
        # over the active world the restarted worker could carry nothing: this used to abort
        # in TRANSFERRING ("no active group")
        assert r.json()["plan"]["transfer_world"] == "standby", r.json()["plan"]
    done = cluster.wait_op(r.json()["id"], 120)
    assert done["state"] == "SUCCEEDED", done
    created = [
        e for e in cluster.events() if e.type == "operation.created" and e.op_id == done["id"]
    ]
    assert "over the standby world" in created[0].message, created
    probe = cluster.probe(num_tokens=16, seed=5)
    assert probe.ok and probe.generation == layout.generation + 1, probe
    # the new generation's group holds every rank: the record went with the commit
    assert not [k for k in dump(cluster.etcd.endpoint, cluster.prefix) if "/groupless/" in k]
