"""The README's run command: ``eep-controller demo --scale 2,4,3 --exit --json``."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.processes import BIN

pytestmark = [pytest.mark.torch, pytest.mark.timeout(400)]


def test_demo_scales_2_4_3_and_reports_a_verified_summary(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run(
        [
            str(BIN / "eep-controller"),
            "demo",
            "--scale",
            "2,4,3",
            "--exit",
            "--json",
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=360,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True
    ops = summary["operations"]
    assert [(o["from_dp"], o["to_dp"]) for o in ops] == [(0, 2), (2, 4), (4, 3)]
    for op in ops:
        assert op["state"] == "SUCCEEDED"
        assert op["probes_failed"] == 0
        assert op["copies"] >= op["copy_lower_bound"]
        assert {
            "id",
            "bytes_moved",
            "balancedness_before",
            "balancedness_after",
            "seconds",
        } <= op.keys()
    assert summary["traffic"]["mismatches"] == 0 and summary["traffic"]["requests"] > 0
    assert "demo OK" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_mode_stays_up_for_exploring_and_stops_cleanly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx
    import psutil

    from tests.support.processes import start, wait_for

    proc = start(
        "demo",
        [str(BIN / "eep-controller"), "demo", "--scale", "2", "--state-dir", str(tmp_path)],
        {"COLUMNS": "200"},
    )
    try:
        url = proc.wait_ready(180)
        assert httpx.get(f"{url}/readyz").status_code == 200
        nodes = subprocess.run([str(BIN / "eepctl"), "--server", url, "nodes", "-o", "json"],
                               capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        assert sorted(n["node_id"] for n in json.loads(nodes.stdout)["items"]) == [
            "demo-node-0",
            "demo-node-1",
        ]
        layout = httpx.get(f"{url}/v1/deployments/demo/layout").json()
        assert layout["dp_size"] == 2 and layout["generation"] == 1
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 5  # etcd, 2 agents, their workers
    finally:
        code = proc.stop(timeout=60)
    assert code == 0, proc.output()[-2000:]
    wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), 30,
             what="every process the demo started to exit")  # fmt: skip
