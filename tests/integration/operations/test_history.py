"""A deployment's operation history is bounded by `operations.history_kept`, and deleting a
deployment leaves none of its operations' keys behind."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import dump_sync
from tests.integration.operations.serving import cancel_active, serving_controller
from tests.support.processes import wait_for


def test_finished_operations_beyond_history_kept_are_deleted_oldest_first(
    etcd_server: Any,
) -> None:
    with (
        serving_controller(etcd_server, env={"EEP_OPERATIONS_HISTORY_KEPT": "2"}) as (proc, _, _),
        httpx.Client(base_url=str(proc.url), timeout=30) as api,
    ):
        made: list[str] = []
        for dp in (5, 6, 5, 6):
            key = {"Idempotency-Key": "first"} if not made else {}
            r = api.post("/v1/deployments/ds/scale", json={"dp_size": dp}, headers=key)
            assert r.status_code == 202, r.text
            made.append(r.json()["id"])
            cancel_active(api)  # no agents: it aborts, and the next may start
        listed = wait_for(
            lambda: (h := api.get("/v1/deployments/ds/operations").json())["count"] == 2 and h,
            10,
            what="the history trimmed to two",
        )
        assert [o["id"] for o in listed["items"]] == made[:1:-1]  # the newest, newest first
        for old in made[:2]:
            gone = api.get(f"/v1/operations/{old}")
            assert gone.status_code == 404, gone.text
        assert api.get(f"/v1/operations/{made[3]}").json()["state"] == "ABORTED"
        # the audit trail keeps its own bound: the trimmed operations' events stay
        events = api.get("/v1/deployments/ds/events", params={"op_id": made[0]}).json()
        assert any(e["type"] == "operation.created" for e in events["items"])
        # the trimmed operation's Idempotency-Key went with it: a retry makes a new one
        again = api.post(
            "/v1/deployments/ds/scale", json={"dp_size": 5}, headers={"Idempotency-Key": "first"}
        )
        assert again.status_code == 202 and again.json()["id"] not in made, again.text
        cancel_active(api)


def test_deleting_a_deployment_deletes_its_operations_ids_and_idempotency_keys(
    etcd_server: Any,
) -> None:
    with (
        serving_controller(etcd_server, "dd") as (proc, etcd, prefix),
        httpx.Client(base_url=str(proc.url), timeout=30) as api,
    ):
        r = api.post(
            "/v1/deployments/dd/scale", json={"dp_size": 5}, headers={"Idempotency-Key": "kd"}
        )
        assert r.status_code == 202, r.text
        op_id = r.json()["id"]
        cancel_active(api, "dd")
        stored = dump_sync(etcd, prefix)
        assert any(op_id in k for k in stored) and any(k.endswith("/kd") for k in stored)
        assert api.delete("/v1/deployments/dd").status_code == 200
        left = dump_sync(etcd, prefix)
        assert not [k for k in left if op_id in k or k.endswith("/kd")], sorted(left)
        assert api.get(f"/v1/operations/{op_id}").status_code == 404
