"""The controller plans with planner worker processes and stops them (by pid) on shutdown."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.support.processes import start_controller, wait_for
from tests.support.seeding import seed_serving_deployment

SPEC: dict[str, Any] = {
    "name": "wide",
    "model": {"num_moe_layers": 16, "num_experts": 32, "expert_bytes": 1 << 20, "top_k": 2},
    "slots_per_rank": 6,
    "min_dp": 6,
    "max_dp": 12,
}


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.update(int(c) for c in text)
    return out


def _is_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    return b"eep_controller.planner.worker" in cmd


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split(")")[-1].split()[0] != "Z"


def test_dry_runs_use_a_planner_worker_that_stops_with_the_controller(etcd: str) -> None:
    prefix = f"/eep-test/{uuid.uuid4().hex[:12]}"
    seed_serving_deployment(etcd, prefix, SPEC, {"n1": 6, "n2": 6}, dp=8)
    proc = start_controller(etcd, prefix, env={"EEP_PLANNER_WORKERS": "1"})
    try:
        with httpx.Client(base_url=str(proc.url), timeout=60) as api:
            # the first large plan starts the worker in the background
            first = api.post("/v1/deployments/wide/scale", json={"dp_size": 12, "dry_run": True})
            assert first.status_code == 200, first.text
            workers = wait_for(
                lambda: {p for p in _children(proc.pid) if _is_worker(p)} or None,
                30,
                what="planner worker process",
            )
            assert len(workers) == 1
            # plans are the same whether or not the worker took part
            for _ in range(3):
                again = api.post(
                    "/v1/deployments/wide/scale", json={"dp_size": 12, "dry_run": True}
                )
                assert again.status_code == 200, again.text
                assert again.json()["plan"] == first.json()["plan"]
            assert {p for p in _children(proc.pid) if _is_worker(p)} == workers
    finally:
        code = proc.stop(timeout=45)
    assert code == 0, proc.output()[-4000:]
    assert not any(_alive(p) for p in workers)
