"""Audit events over real HTTP: the live SSE stream, resuming it, and eepctl events."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import httpx
import pytest

from tests.integration.operations.serving import cancel_active
from tests.support.processes import Proc, start_controller, wait_for


def test_sse_stream_delivers_events_live(api: httpx.Client, env: tuple[Proc, str, str]) -> None:
    import json

    url = str(env[0].url)
    seen: list[dict[str, Any]] = []
    opened = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", f"{url}/v1/events", params={"deployment": "ds"}, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            event_type = None
            for line in r.iter_lines():
                opened.set()
                if line.startswith("event: "):
                    event_type = line[len("event: ") :]
                elif line.startswith("data: "):
                    seen.append({"type": event_type, **json.loads(line[len("data: ") :])})
                    if event_type == "operation.aborted":
                        return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert opened.wait(10)
    r = api.post("/v1/deployments/ds/scale", json={"dp_size": 5})
    assert r.status_code == 202
    api.post(f"/v1/operations/{r.json()['id']}/cancel")
    t.join(20)
    types = [e["type"] for e in seen]
    assert types[0] == "operation.created" and "operation.aborted" in types
    assert all(e["op_id"] == r.json()["id"] for e in seen)


def _sse_events(
    url: str,
    until: int,
    *,
    headers: dict[str, str] | None = None,
    got: threading.Event | None = None,
    **params: Any,
) -> list[dict[str, Any]]:
    """The events of one /v1/events stream (with `params`), read until `until` arrived or
    20 s passed; each with its frame's id as `frame_id`. `got` is set once `until` - 1
    arrived."""
    import json
    import time

    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    with httpx.stream("GET", f"{url}/v1/events", params=params, headers=headers, timeout=30) as r:
        assert r.status_code == 200, r.read()
        frame_id = None
        for line in r.iter_lines():
            if line.startswith("id: "):
                frame_id = int(line[len("id: ") :])
            elif line.startswith("data: "):
                seen.append({"frame_id": frame_id, **json.loads(line[len("data: ") :])})
                if got is not None and len(seen) >= until - 1:
                    got.set()
            # checked on every line: keep-alive comments come every 15 s without events
            if len(seen) >= until or time.monotonic() > deadline:
                break
    return seen


def test_sse_stream_replays_the_events_after_since_or_last_event_id(
    api: httpx.Client, env: tuple[Proc, str, str]
) -> None:
    """A client that reconnects (`since`, or the Last-Event-ID header an EventSource sends)
    first gets the stored events after that seq, oldest first, then live ones."""
    url = str(env[0].url)
    cancel_active(api)
    r = api.post("/v1/deployments/ds/scale", json={"dp_size": 5, "reason": "replay"})
    assert r.status_code == 202, r.text
    cancel_active(api)
    stored = api.get("/v1/deployments/ds/events", params={"limit": 1000}).json()["items"]
    stored.reverse()  # oldest first
    mine = [e for e in stored if e["op_id"] == r.json()["id"]]
    assert len(mine) >= 2
    since = mine[0]["seq"]
    after = [e["seq"] for e in stored if e["seq"] > since]
    # EventSource polyfills send the resume point as a lastEventId query parameter
    for kwargs in (
        {"since": since},
        {"headers": {"Last-Event-ID": str(since)}},
        {"lastEventId": since},
    ):
        got = _sse_events(url, len(after), deployment="ds", **kwargs)
        assert [e["seq"] for e in got] == after
        assert [e["frame_id"] for e in got] == after  # the id a client resumes from
    # replayed, then live: the stream goes on with what is written next
    replayed = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        listening = pool.submit(
            _sse_events, url, len(after) + 1, got=replayed, deployment="ds", since=since
        )
        assert replayed.wait(20)
        r2 = api.post("/v1/deployments/ds/scale", json={"dp_size": 5, "reason": "live"})
        assert r2.status_code == 202, r2.text
        got = listening.result(timeout=30)
    cancel_active(api)
    assert [e["seq"] for e in got[: len(after)]] == after
    assert got[len(after)]["op_id"] == r2.json()["id"]


@pytest.mark.parametrize(
    ("params", "headers"),
    [
        ({"since": "-1"}, {}),
        ({"since": "x"}, {}),
        ({}, {"Last-Event-ID": "not-a-seq"}),
        ({"lastEventId": "-3"}, {}),
    ],
)
def test_sse_stream_refuses_a_bad_resume_point(
    env: tuple[Proc, str, str], params: dict[str, str], headers: dict[str, str]
) -> None:
    r = httpx.get(f"{env[0].url}/v1/events", params=params, headers=headers, timeout=10)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")


def test_sse_stream_of_an_unknown_deployment_is_404_not_a_silent_wait(
    env: tuple[Proc, str, str],
) -> None:
    for name, status in (("nope", 404), ("Not_A_Name", 422)):
        r = httpx.get(f"{env[0].url}/v1/events", params={"deployment": name}, timeout=10)
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
    assert (
        "no deployment named 'nope'"
        in httpx.get(f"{env[0].url}/v1/events", params={"deployment": "nope"}, timeout=10).json()[
            "detail"
        ]
    )


def test_eepctl_events_lists_the_newest_oldest_first(
    api: httpx.Client, env: tuple[Proc, str, str]
) -> None:
    import json
    import subprocess

    from tests.support.processes import BIN

    ctl = [str(BIN / "eepctl"), "--server", str(env[0].url)]
    cancel_active(api)
    r = api.post("/v1/deployments/ds/scale", json={"dp_size": 5, "reason": "events"})
    assert r.status_code == 202, r.text
    cancel_active(api)  # created, aborted at least
    newest = api.get("/v1/deployments/ds/events", params={"limit": 3}).json()["items"]
    table = subprocess.run(
        [*ctl, "events", "ds", "--limit", "3"], capture_output=True, text=True, timeout=60
    )
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if "operation." in line]
    assert len(rows) == 3 and "ds events" in table.stdout, table.stdout
    # oldest first: the newest event's message is on the last row
    assert newest[0]["message"] in rows[-1] and newest[-1]["message"] in rows[0], table.stdout
    listed = subprocess.run(
        [*ctl, "events", "ds", "--limit", "3", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(listed.stdout)["items"] == newest
    missing = subprocess.run([*ctl, "events", "nope"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "404" in missing.stderr


def test_eepctl_events_follow_rides_out_a_controller_restart(
    api: httpx.Client, env: tuple[Proc, str, str]
) -> None:
    """`eepctl events -f` on a second controller replica: the events written while that
    replica is down arrive once it is back on the same address (the stream resumes from the
    last event seen), then live ones."""
    import json

    from eep_controller.store import free_port
    from tests.support.processes import BIN, start

    _, etcd, prefix = env
    cancel_active(api)
    earlier = api.post("/v1/deployments/ds/scale", json={"dp_size": 5, "reason": "earlier"})
    assert earlier.status_code == 202, earlier.text
    cancel_active(api)  # so there is a newest stored event to show first
    port = free_port()
    replica = start_controller(etcd, prefix, port=port)
    follower = start(
        "eepctl-follow",
        [str(BIN / "eepctl"), "--server", str(replica.url), "events", "ds", "-f", "-o", "json",
         "--limit", "1"],
    )  # fmt: skip

    def followed() -> list[dict[str, Any]]:
        return [json.loads(line) for line in follower.lines if line.startswith("{")]

    try:
        wait_for(lambda: len(followed()) >= 1, 20, what="the newest stored event")
        assert replica.stop() == 0
        down = api.post("/v1/deployments/ds/scale", json={"dp_size": 5, "reason": "down"})
        assert down.status_code == 202, down.text
        cancel_active(api)
        replica = start_controller(etcd, prefix, port=port)
        wait_for(
            lambda: any(
                e["op_id"] == down.json()["id"] and e["type"] == "operation.aborted"
                for e in followed()
            ),
            30,
            what="the events written while the replica was down",
        )
        live = api.post("/v1/deployments/ds/scale", json={"dp_size": 5, "reason": "live"})
        assert live.status_code == 202, live.text
        cancel_active(api)
        wait_for(
            lambda: any(e["op_id"] == live.json()["id"] for e in followed()),
            30,
            what="a live event",
        )
        seqs = [e["seq"] for e in followed()]
        assert len(seqs) == len(set(seqs)), "an event was shown twice"
        assert "reconnecting" in follower.output() and "event stream back" in follower.output()
    finally:
        follower.stop()
        replica.stop()


def test_eepctl_events_follow_retries_while_the_controller_cannot_reach_etcd(
    private_etcd: Any,
) -> None:
    """While etcd is down the controller answers the stream with a 503 problem; `eepctl
    events -f` keeps retrying (a 4xx would end it) and streams again once etcd is back."""
    import json

    from eep_controller.store import free_port
    from tests.integration.operations.serving import spec
    from tests.support.processes import BIN, start
    from tests.support.seeding import seed_serving_deployment

    etcd = private_etcd.endpoint
    seed_serving_deployment(etcd, "/eep-follow", spec("ds"), {"n1": 4}, dp=2)
    port = free_port()
    controller = start_controller(etcd, "/eep-follow", port=port)
    follower = start(
        "eepctl-follow",
        [str(BIN / "eepctl"), "--server", str(controller.url), "events", "ds", "-f", "-o",
         "json"],
    )  # fmt: skip
    api = httpx.Client(base_url=str(controller.url), timeout=30)

    def shown(op_id: str) -> list[dict[str, Any]]:
        lines = [line for line in follower.lines if line.startswith("{")]
        return [e for e in map(json.loads, lines) if e["op_id"] == op_id]

    try:
        first = api.post("/v1/deployments/ds/scale", json={"dp_size": 3}).json()
        wait_for(lambda: shown(first["id"]), 20, what="the stream is up")
        cancel_active(api)
        private_etcd.kill()
        # a controller that starts while etcd is down: the stream's reconnect gets a 503
        assert controller.stop() == 0
        controller = start_controller(etcd, "/eep-follow", port=port)
        wait_for(
            lambda: "event stream unavailable (503 etcd unreachable" in follower.output(),
            20,
            what="a 503 answer to the reconnect",
        )
        assert follower.alive(), follower.output()
        private_etcd.start()
        op = wait_for(
            lambda: (
                (r := api.post("/v1/deployments/ds/scale", json={"dp_size": 3})).status_code == 202
                and r.json()
            ),
            30,
            what="a scale accepted once etcd is back",
        )
        events = wait_for(lambda: shown(op["id"]), 30, what="the new operation's events")
        assert events[0]["type"] == "operation.created", events
        assert "event stream back" in follower.output(), follower.output()
        # told once, not once a second while etcd was down
        assert follower.output().count("event stream unavailable") == 1, follower.output()
    finally:
        api.close()
        follower.stop()
        controller.stop()
