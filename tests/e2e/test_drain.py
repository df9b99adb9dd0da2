"""Drain on scale-down: a leaving rank finishes the requests it has in flight before it goes.

(The abort-and-count path, for requests still running at the drain timeout, is covered by
``tests/unit/agent/test_drain.py``: with the worker's one serving thread, a request in flight
delays the leaving worker's own transfer, so end to end it always finishes first.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from eep_controller.protocol import EncodedArray, ForwardRequest
from eep_controller.store import EmbeddedEtcd
from tests.e2e.cluster import HIDDEN, Cluster, make_cluster
from tests.support.processes import wait_for

pytestmark = [pytest.mark.torch, pytest.mark.timeout(300)]


@pytest.fixture
def cluster(private_etcd: EmbeddedEtcd, tmp_path: Path) -> Iterator[Cluster]:
    c = make_cluster(private_etcd, tmp_path)
    c.start_controller()
    c.start_agent("a", devices=2)
    c.start_agent("slow", devices=1, env={"EEP_TEST_FORWARD_DELAY_S": "3"})
    c.bring_up(initial_dp=2, max_dp=3)
    grown = c.wait_op(c.scale(3)["id"])
    assert grown["state"] == "SUCCEEDED", grown
    yield c
    c.stop()


def _slow_request(cluster: Cluster, out: dict[str, Any]) -> None:
    """One forward request straight to the worker on node "slow" (3 s each)."""
    layout = cluster.layout()
    rank = next(i for i, r in enumerate(layout.ranks) if r.node_id == "slow")
    phy = layout.phy2log()
    assert phy is not None
    expert = int(phy[0, rank * layout.slots_per_rank])
    body = ForwardRequest(
        generation=layout.generation, layer=0,
        experts=EncodedArray.encode(np.array([expert], dtype=np.int64)),
        tokens=EncodedArray.encode(np.ones((1, HIDDEN), dtype=np.float32)),
    )  # fmt: skip
    with cluster.api() as api:
        address = api.get("/v1/nodes/slow").json()["address"]
    try:
        r = httpx.post(f"{address}/v1/deployments/moe/devices/{layout.ranks[rank].device_index}/forward",
                       content=body.model_dump_json(), headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
        out["status"] = r.status_code
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)


def _scale_down_while_a_request_is_in_flight(
    cluster: Cluster, drain_timeout_s: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    slow_rank = next(i for i, r in enumerate(cluster.layout().ranks) if r.node_id == "slow")
    outcome: dict[str, Any] = {}
    t = threading.Thread(target=_slow_request, args=(cluster, outcome))
    t.start()
    wait_for(lambda: _inflight(cluster) > 0, 10, interval=0.05, what="the request to be in flight")
    op = cluster.scale(2, remove_ranks=[slow_rank], drain_timeout_s=drain_timeout_s)
    done = cluster.wait_op(op["id"], 120)
    t.join(30)
    return done, outcome


def _inflight(cluster: Cluster) -> int:
    with cluster.api() as api:
        address = api.get("/v1/nodes/slow").json()["address"]
    workers = httpx.get(f"{address}/v1/workers").json()["workers"]
    return sum(int(w["inflight_requests"]) for w in workers)


def test_in_flight_requests_finish_within_the_drain_timeout(cluster: Cluster) -> None:
    done, outcome = _scale_down_while_a_request_is_in_flight(cluster, drain_timeout_s=20)
    assert done["state"] == "SUCCEEDED", done
    assert done["aborted_requests"] == 0
    assert outcome.get("status") == 200
    assert cluster.probe(num_tokens=16, seed=4).ok
