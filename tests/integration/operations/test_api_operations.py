"""Operations as resources over real HTTP: dry run, idempotency, one-at-a-time, cancel, history."""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import dump_sync
from tests.integration.operations.serving import cancel_active
from tests.support.processes import Proc, wait_for


def test_dry_run_previews_the_plan_and_changes_nothing(
    api: httpx.Client, env: tuple[Proc, str, str]
) -> None:
    _, etcd, prefix = env
    before = dump_sync(etcd, prefix)
    r = api.post("/v1/deployments/ds/scale", json={"dp_size": 6, "dry_run": True})
    assert r.status_code == 200, r.text
    plan = r.json()["plan"]
    assert plan["from_dp"] == 4 and plan["to_dp"] == 6
    assert len(plan["ranks_added"]) == 2 and plan["ranks_removed"] == []
    assert plan["copies"] >= plan["lower_bound"] > 0
    assert plan["bytes"] == plan["copies"] * (1 << 20)
    assert 0 < plan["balancedness_after"] <= 1 and "est_transfer_s" in plan
    assert dump_sync(etcd, prefix) == before


def test_unknown_query_parameters_are_refused_not_ignored(
    api: httpx.Client, env: tuple[Proc, str, str]
) -> None:
    _, etcd, prefix = env
    before = dump_sync(etcd, prefix)
    # ignored, ?dry_run=true would start a real scale-up (no dry_run in the body)
    r = api.post("/v1/deployments/ds/scale?dry_run=true", json={"dp_size": 6})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["unknown"] == ["dry_run"]
    assert r.json()["detail"] == (
        "unknown query parameter dry_run: POST /v1/deployments/{name}/scale takes no query "
        "parameter; options go in the JSON body"
    )
    r = api.get("/v1/deployments/ds/events", params={"limit": 5, "opid": "x", "all": 1})
    assert r.status_code == 422 and r.json()["unknown"] == ["all", "opid"]
    assert "takes limit, op_id" in r.json()["detail"], r.json()
    assert api.get("/v1/deployments", params={"x": 1}).status_code == 422
    # probes and scrapers may add their own parameters
    assert api.get("/healthz", params={"_": 1}).status_code == 200
    assert api.get("/metrics", params={"name[]": "eep_leader"}).status_code == 200
    assert dump_sync(etcd, prefix) == before
    # the parameters a route declares still work
    assert api.get("/v1/deployments/ds/events", params={"limit": 5}).status_code == 200
    assert api.get("/v1/deployments/ds/operations", params={"limit": 1}).status_code == 200


def test_noop_scale_is_200_and_records_nothing(
    api: httpx.Client, env: tuple[Proc, str, str]
) -> None:
    _, etcd, prefix = env
    before = dump_sync(etcd, prefix)
    r = api.post("/v1/deployments/ds/scale", json={"dp_size": 4})
    assert r.status_code == 200 and r.json()["noop"] is True
    assert dump_sync(etcd, prefix) == before


BAD = [
    ("dp above max", {"dp_size": 9}, 422, "outside [min_dp, max_dp]"),
    ("dp below min", {"dp_size": 1}, 422, "outside [min_dp, max_dp]"),
    ("dp zero", {"dp_size": 0}, 422, "dp_size"),
    ("unknown field", {"dp_size": 6, "force": True}, 422, "force"),
    ("not enough devices", {"dp_size": 8, "dry_run": True}, 422, "missing"),
    (
        "remove_ranks on scale-up",
        {"dp_size": 6, "remove_ranks": [0, 1]},
        422,
        "only for scaling down",
    ),
    ("remove_ranks out of range", {"dp_size": 3, "remove_ranks": [7]}, 422, "out of range"),
    ("remove_ranks wrong count", {"dp_size": 2, "remove_ranks": [0]}, 422, "names 1"),
    ("remove_ranks duplicated", {"dp_size": 2, "remove_ranks": [1, 1]}, 422, "twice"),
    ("negative drain", {"dp_size": 3, "drain_timeout_s": -1}, 422, "drain_timeout_s"),
]


@pytest.mark.parametrize(("case", "body", "status", "mentions"), BAD, ids=[b[0] for b in BAD])
def test_bad_scale_requests_are_problems_and_change_nothing(
    api: httpx.Client,
    env: tuple[Proc, str, str],
    case: str,
    body: dict[str, Any],
    status: int,
    mentions: str,
) -> None:
    _, etcd, prefix = env
    before = dump_sync(etcd, prefix)
    r = api.post("/v1/deployments/ds/scale", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert mentions in r.text
    assert dump_sync(etcd, prefix) == before


def test_not_enough_devices_says_how_many_are_missing(api: httpx.Client) -> None:
    r = api.post("/v1/deployments/ds/scale", json={"dp_size": 8})
    assert r.status_code == 422
    body = r.json()
    assert (body["needed"], body["available"], body["missing"]) == (4, 3, 1)
    assert "1 missing" in body["detail"]


def test_unknown_deployment_is_404(api: httpx.Client) -> None:
    r = api.post("/v1/deployments/nope/scale", json={"dp_size": 3})
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")


def test_ten_simultaneous_scales_give_one_202_and_nine_409_naming_it(
    api: httpx.Client, env: tuple[Proc, str, str]
) -> None:
    url = str(env[0].url)

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/deployments/ds/scale", json={"dp_size": 6}, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(post, range(10)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [202] + [409] * 9, [r.text for r in responses]
    winner = next(r for r in responses if r.status_code == 202).json()["id"]
    for r in responses:
        if r.status_code == 409:
            assert r.json()["active_operation"] == winner
            assert r.headers["content-type"].startswith("application/problem+json")
    cancel_active(api)


def test_idempotent_replay_returns_the_same_operation(
    api: httpx.Client, env: tuple[Proc, str, str]
) -> None:
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    first = api.post("/v1/deployments/ds/scale", json={"dp_size": 5, "reason": "test"}, headers=key)
    assert first.status_code == 202, first.text
    again = api.post("/v1/deployments/ds/scale", json={"dp_size": 5, "reason": "test"}, headers=key)
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    other = api.post("/v1/deployments/ds/scale", json={"dp_size": 6}, headers=key)
    assert other.status_code == 422
    assert other.json()["operation"] == first.json()["id"]
    cancel_active(api)
    # after the op ended, a replay still names it (and does not start another)
    replay = api.post(
        "/v1/deployments/ds/scale", json={"dp_size": 5, "reason": "test"}, headers=key
    )
    assert replay.json()["id"] == first.json()["id"] and replay.json()["state"] == "ABORTED"


def test_bad_idempotency_key_is_rejected(api: httpx.Client) -> None:
    r = api.post(
        "/v1/deployments/ds/scale",
        json={"dp_size": 5},
        headers={"Idempotency-Key": "has spaces and /"},
    )
    assert r.status_code == 422


def test_operation_resource_cancel_and_history(
    api: httpx.Client, env: tuple[Proc, str, str]
) -> None:
    r = api.post("/v1/deployments/ds/scale", json={"dp_size": 3, "reason": "shrink"})
    assert r.status_code == 202
    op = r.json()
    assert r.headers["location"] == f"/v1/operations/{op['id']}"
    assert op["kind"] == "scale_down" and op["from_generation"] == 1 and op["to_generation"] == 2
    assert op["plan"]["transfer_world"] == "active"
    assert len([p for p in op["plan"]["participants"] if p["new_rank"] is None]) == 1
    got = wait_for(
        lambda: (g := api.get(f"/v1/operations/{op['id']}").json())["state"] == "PREPARING" and g,
        10,
        what="PREPARING",
    )
    assert got["progress"]["PREPARING"] == {
        "acked": 0,
        "failed": 0,
        "total": 4,
        "bytes_received": 0,
    }
    conflict = api.post("/v1/deployments/ds/scale", json={"dp_size": 5})
    assert conflict.status_code == 409 and conflict.json()["active_operation"] == op["id"]
    assert api.delete("/v1/deployments/ds").status_code == 409

    c = api.post(f"/v1/operations/{op['id']}/cancel")
    assert c.status_code == 202 and c.json()["cancel_requested"] is True
    done = wait_for(
        lambda: (g := api.get(f"/v1/operations/{op['id']}").json())["state"] == "ABORTED" and g,
        10,
        what="ABORTED",
    )
    assert "cancel" in done["error"]
    assert api.get("/v1/deployments/ds").json()["active_operation"] is None
    assert api.get("/v1/deployments/ds/layout").json()["generation"] == 1
    again = api.post(f"/v1/operations/{op['id']}/cancel")
    assert again.status_code == 409 and again.json()["state"] == "ABORTED"

    hist = api.get("/v1/deployments/ds/operations", params={"limit": 1}).json()
    assert hist["items"][0]["id"] == op["id"]  # newest first
    assert hist["next"]
    page2 = api.get(hist["next"]).json()
    assert page2["items"] and page2["items"][0]["id"] < op["id"]
    # a cursor that is no operation id at all is refused, not read as "nothing before it"
    bad = api.get("/v1/deployments/ds/operations", params={"before": "yesterday"})
    assert bad.status_code == 422 and "before" in bad.json()["detail"], bad.json()
    assert bad.headers["content-type"] == "application/problem+json"
    events = api.get("/v1/deployments/ds/events", params={"op_id": op["id"]}).json()["items"]
    types = [e["type"] for e in events]
    assert (
        "operation.created" in types
        and "operation.cancel_requested" in types
        and "operation.aborted" in types
    )


def test_unknown_operation_is_404(api: httpx.Client) -> None:
    assert api.get("/v1/operations/op-nope").status_code == 404
    assert api.post("/v1/operations/op-nope/cancel").status_code == 404


def test_layout_and_placement(api: httpx.Client) -> None:
    lay = api.get("/v1/deployments/ds/layout").json()
    assert lay["generation"] == 1 and lay["ep_size"] == 4 and len(lay["ranks"]) == 4
    assert lay["placement"]["experts_without_replica"] == 0
    assert lay["placement"]["physical_slots"] == 32
    assert 0 < lay["balancedness"]["value"] <= 1
    full = api.get("/v1/deployments/ds/placement").json()
    assert len(full["phy2log"]) == 4 and len(full["phy2log"][0]) == 32


@contextlib.contextmanager
def _scale_waiting(api: httpx.Client, env: tuple[Proc, str, str]) -> Iterator[tuple[Proc, str]]:
    """`eepctl scale ds --dp 5 --wait` running (no agents: the operation stays in
    PREPARING), with the operation's id; stopped and the operation cancelled afterwards."""
    from tests.support.processes import BIN, start

    cancel_active(api)
    waiting = start(
        "eepctl-scale-wait",
        [str(BIN / "eepctl"), "--server", str(env[0].url), "scale", "ds", "--dp", "5", "--wait"],
    )
    try:
        active = wait_for(
            lambda: api.get("/v1/deployments/ds").json()["active_operation"], 20, what="the op"
        )
        yield waiting, active
    finally:
        waiting.stop()
        cancel_active(api)


def test_eepctl_scale_wait_exits_non_zero_when_the_operation_aborts(
    api: httpx.Client, env: tuple[Proc, str, str]
) -> None:
    """`eepctl scale --wait && next-step` must not go on after an aborted operation."""
    with _scale_waiting(api, env) as (waiting, active):
        assert api.post(f"/v1/operations/{active}/cancel").status_code == 202
        assert waiting.popen.wait(30) == 1, waiting.output()
        assert f"operation {active} ABORTED" in waiting.output(), waiting.output()


def test_ctrl_c_on_eepctl_scale_wait_stops_watching_not_the_operation(
    api: httpx.Client, env: tuple[Proc, str, str]
) -> None:
    import signal

    with _scale_waiting(api, env) as (waiting, active):
        wait_for(lambda: "accepted" in waiting.output(), 20, what="the watch")
        waiting.signal(signal.SIGINT)
        assert waiting.popen.wait(30) == 130, waiting.output()
        out = waiting.output()
        assert f"stopped watching; operation {active} goes on" in out, out
        assert f"eepctl cancel {active}" in out and "Aborted" not in out, out
        assert api.get(f"/v1/operations/{active}").json()["state"] == "PREPARING"
        assert api.get("/v1/deployments/ds").json()["active_operation"] == active


def test_metrics_count_operations(api: httpx.Client) -> None:
    wait_for(
        lambda: (
            'eep_operations_total{kind="scale_up",result="aborted"}' in api.get("/metrics").text
        ),
        10,
        what="metric",
    )
    text = api.get("/metrics").text
    assert 'eep_layout_generation{deployment="ds"} 1.0' in text
    assert 'eep_balancedness{deployment="ds"}' in text
    assert 'eep_nodes{state="ready"} 2.0' in text
    assert "eep_operation_phase_seconds_bucket" in text


def test_eepctl_scale_dry_run_and_layout(env: tuple[Proc, str, str]) -> None:
    import json
    import subprocess

    from tests.support.processes import BIN

    ctl = [str(BIN / "eepctl"), "--server", str(env[0].url)]
    out = subprocess.run(
        [*ctl, "scale", "ds", "--dp", "6", "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "copies (lower bound)" in out.stdout and "4 -> 6" in out.stdout
    assert re.search(
        r"estimated transfer time +│ [\d.]+ (ms|s) in \d+ rounds \(lower bound", out.stdout
    )
    js = subprocess.run(
        [*ctl, "scale", "ds", "--dp", "6", "--dry-run", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(js.stdout)["plan"]["to_dp"] == 6
    lay = subprocess.run([*ctl, "layout", "ds"], capture_output=True, text=True, timeout=60)
    assert lay.returncode == 0 and "generation 1" in lay.stdout
    # the heading is one whole line (as the narrow table's title it wrapped)
    assert re.match(r"ds generation 1 \(dp \d+, ep \d+\)\n", lay.stdout), lay.stdout
    # the placement summary is one whole line under the table, not folded to its width
    summary = [line for line in lay.stdout.splitlines() if "layers x" in line]
    assert len(summary) == 1 and "balancedness" in summary[0], lay.stdout
    bad = subprocess.run(
        [*ctl, "scale", "ds", "--dp", "99"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and "422" in bad.stderr
    # the message is shown as text: rich markup would swallow "[min_dp, max_dp]" as a tag
    assert "dp_size 99 is outside [min_dp, max_dp] = [2, 8]" in bad.stderr, bad.stderr


def test_eepctl_ops_piped_keeps_one_line_per_operation(
    env: tuple[Proc, str, str], api: httpx.Client
) -> None:
    """Piped output is not folded to rich's default 80 columns: each operation stays one
    whole line of the table (id, kind, state, dp, copies)."""
    import json
    import subprocess

    from tests.support.processes import BIN

    cancel_active(api)
    started = api.post("/v1/deployments/ds/scale", json={"dp_size": 5, "reason": "piped table"})
    assert started.status_code == 202, started.text
    cancel_active(api)
    ctl = [str(BIN / "eepctl"), "--server", str(env[0].url)]
    listed = json.loads(
        subprocess.run(
            [*ctl, "ops", "ds", "-o", "json"], capture_output=True, text=True, timeout=60
        ).stdout
    )["items"]
    assert any(op["id"] == started.json()["id"] for op in listed)
    table = subprocess.run([*ctl, "ops", "ds"], capture_output=True, text=True, timeout=60).stdout
    rows = {op["id"]: [line for line in table.splitlines() if op["id"] in line] for op in listed}
    for op in listed:
        assert len(rows[op["id"]]) == 1, table
        assert op["kind"] in rows[op["id"]][0] and op["state"] in rows[op["id"]][0], table
    assert "4 -> 5" in rows[started.json()["id"]][0], table


def _set_load(etcd: str, prefix: str, load: Any) -> None:
    """Write (or with None, delete) deployment ds's load window, as an agent would."""
    import asyncio

    import numpy as np

    from eep_controller.protocol import EncodedArray, LoadWindow
    from eep_controller.store import EtcdConnection, EtcdStore, KeySpace

    async def go() -> None:
        store = EtcdStore(EtcdConnection([etcd]), KeySpace(prefix))
        try:
            if load is None:
                await store.delete(store.keys.load("ds"))
            else:
                arr = np.asarray(load, dtype=np.float64)
                window = LoadWindow(
                    deployment="ds",
                    generation=1,
                    load=EncodedArray.encode(arr),
                    window_s=60.0,
                    updated_at=0.0,
                )
                await store.put(store.keys.load("ds"), window)
        finally:
            await store.close()

    asyncio.run(go())


def test_a_bad_load_window_from_an_agent_is_ignored_not_fatal(
    api: httpx.Client, env: tuple[Proc, str, str]
) -> None:
    """A load window with NaN (or negative) values, written by a faulty agent, must not
    stop planning or scoring: both fall back to a uniform load. A good one is used."""
    import numpy as np

    _, etcd, prefix = env
    cancel_active(api)
    try:
        for bad in (np.full((4, 16), np.nan), -np.ones((4, 16)), np.ones((3, 16))):
            _set_load(etcd, prefix, bad)
            lay = api.get("/v1/deployments/ds/layout")
            assert lay.status_code == 200, lay.text
            assert lay.json()["balancedness"]["scored_on"] == "uniform load"
            dry = api.post("/v1/deployments/ds/scale", json={"dp_size": 6, "dry_run": True})
            assert dry.status_code == 200, dry.text
        skewed = np.ones((4, 16))
        skewed[:, 0] = 50.0
        _set_load(etcd, prefix, skewed)
        lay = api.get("/v1/deployments/ds/layout").json()
        assert lay["balancedness"]["scored_on"] == "load window"
    finally:
        _set_load(etcd, prefix, None)


def test_eepctl_scale_wait_with_json_prints_only_the_final_operation_on_stdout(
    api: httpx.Client, env: tuple[Proc, str, str]
) -> None:
    import json
    import subprocess

    from tests.support.processes import BIN

    cancel_active(api)
    proc = subprocess.Popen(
        [str(BIN / "eepctl"), "--server", str(env[0].url), "scale", "ds", "--dp", "5", "--wait",
         "-o", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        active = wait_for(
            lambda: api.get("/v1/deployments/ds").json()["active_operation"], 20, what="the op"
        )
        assert api.post(f"/v1/operations/{active}/cancel").status_code == 202
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cancel_active(api)
    assert proc.returncode == 1, err
    final = json.loads(out)  # the progress bars went to stderr
    assert final["id"] == active and final["state"] == "ABORTED", final
    assert "PREPARING" in err and f"operation {active} ABORTED" in err, err
