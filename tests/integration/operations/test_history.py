"""A deployment's operation history is bounded by `operations.history_kept`."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.conftest import dump_sync
from tests.integration.operations.serving import cancel_active, spec
from tests.support.processes import start_controller, wait_for
from tests.support.seeding import seed_serving_deployment


def test_finished_operations_beyond_history_kept_are_deleted_oldest_first(
    etcd_server: Any,
) -> None:
    if etcd_server.proc is None:
        etcd_server.start()
    prefix = f"/eep-test/{uuid.uuid4().hex[:12]}"
    seed_serving_deployment(etcd_server.endpoint, prefix, spec("ds"), {"n1": 4, "n2": 3}, dp=4)
    proc = start_controller(etcd_server.endpoint, prefix, env={"EEP_OPERATIONS_HISTORY_KEPT": "2"})
    try:
        with httpx.Client(base_url=str(proc.url), timeout=30) as api:
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
                "/v1/deployments/ds/scale",
                json={"dp_size": 5},
                headers={"Idempotency-Key": "first"},
            )
            assert again.status_code == 202 and again.json()["id"] not in made, again.text
            cancel_active(api)
    finally:
        proc.stop()


def test_deleting_a_deployment_deletes_its_operations_ids_and_idempotency_keys(
    etcd_server: Any,
) -> None:
    if etcd_server.proc is None:
        etcd_server.start()
    prefix = f"/eep-test/{uuid.uuid4().hex[:12]}"
    seed_serving_deployment(etcd_server.endpoint, prefix, spec("dd"), {"n1": 4, "n2": 3}, dp=4)
    proc = start_controller(etcd_server.endpoint, prefix)
    try:
        with httpx.Client(base_url=str(proc.url), timeout=30) as api:
            r = api.post(
                "/v1/deployments/dd/scale", json={"dp_size": 5}, headers={"Idempotency-Key": "kd"}
            )
            assert r.status_code == 202, r.text
            op_id = r.json()["id"]
            cancel_active(api, "dd")
            stored = dump_sync(etcd_server.endpoint, prefix)
            assert any(op_id in k for k in stored) and any(k.endswith("/kd") for k in stored)
            assert api.delete("/v1/deployments/dd").status_code == 200
            left = dump_sync(etcd_server.endpoint, prefix)
            assert not [k for k in left if op_id in k or k.endswith("/kd")], sorted(left)
            assert api.get(f"/v1/operations/{op_id}").status_code == 404
    finally:
        proc.stop()
