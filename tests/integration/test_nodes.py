"""Nodes appear when an agent registers and vanish with its lease."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from eep_controller.store import EmbeddedEtcd
from tests.support.processes import BIN, Proc, start, start_agent, start_controller, wait_for


@pytest.fixture
def controller(etcd: str, prefix: str) -> Iterator[Proc]:
    proc = start_controller(etcd, prefix)
    yield proc
    proc.stop()


def _node_ids(url: str) -> list[str]:
    return [n["node_id"] for n in httpx.get(f"{url}/v1/nodes").json()["items"]]


def test_agent_registers_its_devices(controller: Proc, etcd: str, prefix: str) -> None:
    agent = start_agent(etcd, prefix, "node-a", devices="cpu:3")
    try:
        url = controller.url
        wait_for(lambda: "node-a" in _node_ids(url), 10, what="node-a listed")  # type: ignore[arg-type]
        node = httpx.get(f"{url}/v1/nodes/node-a").json()
        assert [d["kind"] for d in node["devices"]] == ["cpu"] * 3
        assert node["address"].startswith("http://127.0.0.1:")
        assert httpx.get(f"{node['address']}/healthz").json()["registered"] is True
    finally:
        agent.stop()


def test_sigterm_deregisters_at_once(controller: Proc, etcd: str, prefix: str) -> None:
    agent = start_agent(etcd, prefix, "node-b", lease_ttl=30)
    url = controller.url
    wait_for(lambda: "node-b" in _node_ids(url), 10, what="node-b listed")  # type: ignore[arg-type]
    assert agent.stop() == 0
    # the lease is revoked, so it goes well before its 30 s TTL
    wait_for(lambda: "node-b" not in _node_ids(url), 3, what="node-b gone")  # type: ignore[arg-type]


def test_killed_agent_disappears_within_its_lease_ttl(
    controller: Proc, etcd: str, prefix: str
) -> None:
    agent = start_agent(etcd, prefix, "node-c", lease_ttl=2)
    url = controller.url
    wait_for(lambda: "node-c" in _node_ids(url), 10, what="node-c listed")  # type: ignore[arg-type]
    agent.kill9()
    start = time.monotonic()
    wait_for(lambda: "node-c" not in _node_ids(url), 2 + 2, what="node-c expired")  # type: ignore[arg-type]
    assert time.monotonic() - start <= 4


def test_eepctl_lists_nodes_and_manages_deployments(
    controller: Proc, etcd: str, prefix: str, tmp_path: Path
) -> None:
    agent = start_agent(etcd, prefix, "node-d")
    try:
        ctl = [str(BIN / "eepctl"), "--server", str(controller.url)]
        wait_for(lambda: "node-d" in _node_ids(controller.url), 10, what="node-d")  # type: ignore[arg-type]
        table = subprocess.run(
            [*ctl, "nodes"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert "node-d" in table and "cpu:2" in table
        as_json = subprocess.run(
            [*ctl, "nodes", "-o", "json"], capture_output=True, text=True, timeout=60, check=True
        )
        assert json.loads(as_json.stdout)["items"][0]["node_id"] == "node-d"
        one = subprocess.run(
            [*ctl, "get", "node", "node-d"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        # CPU devices report no memory: shown as unknown, not as 0 bytes
        rows = [line for line in one.splitlines() if "node-d" in line]
        assert len(rows) == 2 and all(r.split("│")[-2].strip() == "-" for r in rows), one

        spec = tmp_path / "spec.yaml"
        spec.write_text(
            # min_dp 4 needs 4 devices; the one agent has 2, so bring-up waits (status pending)
            "name: demo\nmodel:\n  num_moe_layers: 2\n  num_experts: 16\n  expert_bytes: 1024\n"
            "slots_per_rank: 4\nmin_dp: 4\nmax_dp: 8\n"
        )
        created = subprocess.run(
            [*ctl, "create", "deployment", "-f", str(spec), "-o", "json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["name"] == "demo"
        listed = subprocess.run(
            [*ctl, "deployments"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert "demo" in listed and "pending" in listed
        # piped output is not folded to 80 columns: each deployment is one whole line
        row = next(line for line in listed.splitlines() if "demo" in line)
        assert all(cell in row for cell in ("pending", "4..8", "native")), listed

        def shown_json() -> dict[str, Any]:
            got = subprocess.run(
                [*ctl, "get", "deployment", "demo", "-o", "json"],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            return json.loads(got.stdout)  # type: ignore[no-any-return]

        assert shown_json()["spec"]["max_dp"] == 8
        # why it is pending: the newest event, from the bring-up that waits for devices
        waits = wait_for(lambda: shown_json()["note"], 20, what="the bring-up's note")
        assert "needs 4 free healthy devices" in waits, waits
        shown = subprocess.run(
            [*ctl, "get", "deployment", "demo"], capture_output=True, text=True, timeout=60
        ).stdout
        assert f"demo: {waits}" in shown, shown
        again = subprocess.run(
            [*ctl, "create", "deployment", "-f", str(spec)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 1 and "409" in again.stderr and "already exists" in again.stderr
        short = subprocess.run(
            [*ctl, "scale", "demo", "--dp", "8", "--dry-run"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # a piped error is not folded at 80 columns either: the message is one whole line
        assert short.returncode == 1, short.stderr
        assert (
            "error: 422 scaling to dp_size 8 needs 8 free healthy devices; 2 available, 6 missing\n"
            in short.stderr
        ), short.stderr
        missing = subprocess.run(
            [*ctl, "get", "deployment", "nope"], capture_output=True, text=True, timeout=60
        )
        assert missing.returncode == 1 and "404" in missing.stderr
    finally:
        agent.stop()


def _agent_before_etcd(etcd: str, prefix: str, node_id: str) -> Proc:
    return start(
        f"agent {node_id}",
        [str(BIN / "eep-agent"), "run", "--etcd", etcd, "--node-id", node_id, "--prefix", prefix,
         "--devices", "cpu:1"],
    )  # fmt: skip


def test_an_agent_started_before_etcd_backs_off_then_registers(
    private_etcd: EmbeddedEtcd, prefix: str
) -> None:
    private_etcd.kill()
    agent = _agent_before_etcd(private_etcd.endpoint, prefix, "early")
    try:
        # one warning per try, each wait twice the one before
        wait_for(lambda: "retrying in 2 s" in agent.output(), 30, what="a second, longer wait")
        assert "ready at" not in agent.output()
        private_etcd.start()
        controller = start_controller(private_etcd.endpoint, prefix)
        try:
            wait_for(lambda: "early" in _node_ids(str(controller.url)), 30, what="registered")
            assert "eep-agent early ready at" in agent.output()
        finally:
            controller.stop()
    finally:
        agent.stop()


def test_an_agent_stopped_before_it_registers_exits_without_claiming_ready(
    private_etcd: EmbeddedEtcd, prefix: str
) -> None:
    private_etcd.kill()
    agent = _agent_before_etcd(private_etcd.endpoint, prefix, "never")
    wait_for(lambda: "cannot register" in agent.output(), 30, what="a failed registration")
    assert agent.stop() == 0
    assert "ready at" not in agent.output() and "serving at" not in agent.output(), agent.output()
