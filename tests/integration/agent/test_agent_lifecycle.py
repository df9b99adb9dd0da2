"""The agent as a long-running daemon: many scale cycles without leaks, etcd restarts, SIGTERM,
the load window, and its HTTP surface."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from eep_controller.probe import write_synthetic
from eep_controller.protocol import (
    EncodedArray,
    Event,
    ForwardRequest,
    LoadWindow,
    Operation,
    OpKind,
    OpState,
    ScaleRequest,
)
from eep_controller.store import EmbeddedEtcd
from tests.integration.agent.harness import (
    ContractDriver,
    ranks,
    round_robin_placement,
    simple_plan,
    spec_for,
    start_agent,
    worker_pids,
)
from tests.support.processes import BIN, Proc, pid_running, sigterm_held_past_bound

pytestmark = [pytest.mark.torch, pytest.mark.timeout(240)]

JSON = {"content-type": "application/json"}
TWO = ranks(("a", 0), ("a", 1))
THREE = ranks(("a", 0), ("a", 1), ("a", 2))
FOUR = ranks(("a", 0), ("a", 1), ("b", 0), ("b", 1))


def _placement(driver: ContractDriver, n: int, shift: int = 0):  # type: ignore[no-untyped-def]
    m = driver.spec.model
    return round_robin_placement(
        m.num_moe_layers, m.num_experts, n, driver.spec.slots_per_rank, shift
    )


def _usage(proc: psutil.Process) -> tuple[int, int, int]:
    return proc.num_fds(), proc.num_threads(), proc.memory_info().rss


def _tree(agent: Proc) -> dict[str, tuple[int, int, int]]:
    """fds, threads, RSS of the agent, of its fork server (the workers' parent) and of the
    workers that live through every cycle (devices 0, 1)."""
    parent = psutil.Process(agent.pid)
    out = {"agent": _usage(parent)}
    pids = {
        w["device_index"]: w["pid"]
        for w in httpx.get(f"{agent.url}/v1/workers", timeout=10).json()["workers"]
    }
    server = psutil.Process(pids[0]).parent()
    assert server is not None and server.ppid() == agent.pid, "workers come from the fork server"
    out["fork server"] = _usage(server)
    for device in (0, 1):
        out[f"worker{device}"] = _usage(psutil.Process(pids[device]))
    return out


async def test_twenty_scale_cycles_leak_no_fds_threads_or_memory(
    etcd: str, prefix: str, small_driver: ContractDriver, agents: list[Proc]
) -> None:
    driver = small_driver
    agents.append(start_agent(etcd, prefix, "a", 3))
    agent = agents[0]
    assert (await driver.run_op(TWO, _placement(driver, 2))).state is OpState.SUCCEEDED

    async def cycle(i: int) -> None:
        up = await driver.run_op(THREE, _placement(driver, 3, shift=i))
        assert up.state is OpState.SUCCEEDED, up.acks
        down = await driver.run_op(TWO, _placement(driver, 2, shift=i + 1))
        assert down.state is OpState.SUCCEEDED, down.acks

    for i in range(2):  # warm-up: lazy imports, allocator pools, the agent's bounded thread pool
        await cycle(i)
    base = _tree(agent)
    # workers are forked from the agent's fork server: count every process below the agent
    base_children = len(psutil.Process(agent.pid).children(recursive=True))
    started = time.monotonic()
    for i in range(20):
        await cycle(i)
    took = time.monotonic() - started
    after = _tree(agent)
    result = await driver.probe(num_tokens=8, seed=3)
    assert result.ok, result
    assert (
        len(psutil.Process(agent.pid).children(recursive=True)) == base_children
    )  # joined workers were all reaped
    for name, (fds, threads, rss) in after.items():
        fds0, threads0, rss0 = base[name]
        assert fds <= fds0 + 4, f"{name}: fds {fds0} -> {fds} over 20 cycles"
        assert threads <= threads0 + 2, f"{name}: threads {threads0} -> {threads} over 20 cycles"
        assert rss <= rss0 + 32 * 2**20, (
            f"{name}: RSS {rss0 >> 20} MiB -> {rss >> 20} MiB over 20 cycles"
        )
    print(f"20 cycles in {took:.1f}s; before {base}; after {after}")


async def test_agents_ride_out_an_etcd_restart_and_then_complete_an_operation(
    private_etcd: EmbeddedEtcd, prefix: str, small_checkpoint: Path, agents: list[Proc]
) -> None:
    etcd = private_etcd.endpoint
    spec = spec_for("moe", small_checkpoint, slots=4, max_dp=8)
    driver = ContractDriver(etcd, prefix, spec)
    try:
        await driver.write_spec()
        agents += [start_agent(etcd, prefix, "a", 2), start_agent(etcd, prefix, "b", 2)]
        assert (await driver.run_op(TWO, _placement(driver, 2))).state is OpState.SUCCEEDED
        private_etcd.kill()
        await asyncio.sleep(3.0)  # longer than the agents' 2 s lease TTL
        private_etcd.start()
        # both nodes are registered again (a fresh lease if the old one expired meanwhile)
        deadline = time.monotonic() + 20
        while len(await driver.addresses()) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert set(await driver.addresses()) == {"a", "b"}
        outcome = await driver.run_op(FOUR, _placement(driver, 4, shift=1))
        assert outcome.state is OpState.SUCCEEDED, outcome.acks
        result = await driver.probe(num_tokens=8, seed=4)
        assert result.ok and result.generation == 2, result
        assert all(a.alive() for a in agents)
    finally:
        await driver.close()


async def test_sigterm_stops_the_workers_and_revokes_the_lease_at_once(
    etcd: str, prefix: str, small_driver: ContractDriver, agents: list[Proc]
) -> None:
    driver = small_driver
    proc = start_agent(etcd, prefix, "a", 2)
    agents.append(proc)
    assert (await driver.run_op(TWO, _placement(driver, 2))).state is OpState.SUCCEEDED
    pids = [w["pid"] for w in httpx.get(f"{proc.url}/v1/workers", timeout=10).json()["workers"]]
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    proc.signal(signal.SIGTERM)
    code = proc.popen.wait(20)
    assert code == 0
    assert "a" not in await driver.addresses()  # revoked, not left to expire
    assert not any(
        psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids
    )


@pytest.mark.parametrize(
    ("method", "kill"),
    [(None, False), (None, True), ("spawn", False)],
    ids=["default-sigterm", "default-sigkill", "spawn-sigterm"],
)
async def test_workers_start_by_the_chosen_method_serve_and_stop_with_the_agent(
    etcd: str,
    prefix: str,
    small_driver: ContractDriver,
    agents: list[Proc],
    method: str | None,
    kill: bool,
) -> None:
    """By default every worker is forked from one fork server below the agent (it imported
    torch once); with EEP_AGENT_WORKER_START=spawn each worker is the agent's own child. Either
    way the workers serve exactly, and neither a SIGTERM nor a SIGKILL of the agent leaves a
    process of it behind."""
    driver = small_driver
    env = {"EEP_AGENT_WORKER_START": method} if method else None
    proc = start_agent(etcd, prefix, "a", 2, env=env)
    agents.append(proc)
    assert (await driver.run_op(TWO, _placement(driver, 2))).state is OpState.SUCCEEDED
    result = await driver.probe(num_tokens=8, seed=5)
    assert result.ok, result
    pids = [w["pid"] for w in httpx.get(f"{proc.url}/v1/workers", timeout=10).json()["workers"]]
    assert len(pids) == 2
    parents = {psutil.Process(p).ppid() for p in pids}
    if method == "spawn":
        assert parents == {proc.pid}
    else:
        assert len(parents) == 1 and proc.pid not in parents
        server = psutil.Process(parents.pop())
        assert server.ppid() == proc.pid and "forkserver" in " ".join(server.cmdline())
    below = psutil.Process(proc.pid).children(recursive=True)
    assert len(below) >= 3  # the two workers and the fork server or spawn's resource tracker
    if kill:
        proc.kill9()  # nothing of the agent runs: the workers and the server see their pipes close
    else:
        proc.signal(signal.SIGTERM)
        assert proc.popen.wait(20) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_running(p.pid) for p in below):
        await asyncio.sleep(0.1)
    assert not [p.pid for p in below if pid_running(p.pid)]


def test_an_unknown_worker_start_method_is_refused_naming_the_choices() -> None:
    done = subprocess.run(
        [str(BIN / "eep-agent"), "run", "--etcd", "http://127.0.0.1:9", "--devices", "cpu:1",
         "--worker-start", "fork"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 2
    assert "unknown worker start method 'fork'" in done.stderr
    assert "forkserver, spawn" in done.stderr


async def test_a_shutdown_held_past_its_bound_kills_the_workers_and_exits_3(
    etcd: str, prefix: str, small_driver: ContractDriver, agents: list[Proc]
) -> None:
    """A worker that can neither answer nor die of SIGTERM (stopped with SIGSTOP) holds the
    clean shutdown for ~20 s; with a 2 s bound the agent logs its stuck tasks at 1 s, then
    kills every worker by pid and exits with code 3: no worker outlives its agent."""
    driver = small_driver
    proc = start_agent(etcd, prefix, "a", 2, env={"EEP_AGENT_SHUTDOWN_TIMEOUT_S": "2"})
    agents.append(proc)
    assert (await driver.run_op(TWO, _placement(driver, 2))).state is OpState.SUCCEEDED
    pids = [w["pid"] for w in httpx.get(f"{proc.url}/v1/workers", timeout=10).json()["workers"]]
    assert len(pids) == 2
    stuck = pids[0]
    psutil.Process(stuck).suspend()  # SIGSTOP
    try:
        out = sigterm_held_past_bound(proc, 2.0)
        assert "shutdown did not finish within 2.0s; killing" in out
        assert str(stuck) in out.split("shutdown did not finish", 1)[1].splitlines()[0]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_running(p) for p in pids):
            await asyncio.sleep(0.1)
        assert not any(pid_running(p) for p in pids)
    finally:
        if pid_running(stuck):
            psutil.Process(stuck).kill()


async def test_forward_endpoint_answers_409_stale_layout_for_experts_a_worker_does_not_hold(
    etcd: str, prefix: str, small_driver: ContractDriver, agents: list[Proc]
) -> None:
    driver = small_driver
    proc = start_agent(etcd, prefix, "a", 2)
    agents.append(proc)
    placement = _placement(driver, 2)
    assert (await driver.run_op(TWO, placement)).state is OpState.SUCCEEDED
    held = set(placement[0, :4].tolist())
    missing = next(e for e in range(driver.spec.model.num_experts) if e not in held)
    tokens = np.ones((1, 32), dtype=np.float32)
    body = ForwardRequest(
        generation=1,
        layer=0,
        experts=EncodedArray.encode(np.array([missing])),
        tokens=EncodedArray.encode(tokens),
    )
    async with httpx.AsyncClient(base_url=proc.url or "") as http:
        resp = await http.post(
            "/v1/deployments/moe/devices/0/forward", content=body.model_dump_json(), headers=JSON
        )
        assert resp.status_code == 409
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert resp.json()["type"].endswith("/stale-layout")
        ok = body.model_copy(update={"experts": EncodedArray.encode(np.array([sorted(held)[0]]))})
        resp = await http.post(
            "/v1/deployments/moe/devices/0/forward", content=ok.model_dump_json(), headers=JSON
        )
        assert resp.status_code == 200 and resp.json()["generation"] == 1
        resp = await http.post(
            "/v1/deployments/moe/devices/9/forward", content=ok.model_dump_json(), headers=JSON
        )
        assert resp.status_code == 404 and resp.json()["type"].endswith("/no-worker")
        # bad bodies get the controller's problems: 400 malformed, 422 invalid naming fields
        url = "/v1/deployments/moe/devices/0/forward"
        resp = await http.post(url, content=b"{not json", headers=JSON)
        assert resp.status_code == 400 and resp.json()["type"].endswith("/malformed")
        assert resp.headers["content-type"].startswith("application/problem+json")
        resp = await http.post(url, json={"layer": 0})
        assert resp.status_code == 422 and resp.json()["type"].endswith("/invalid")
        assert resp.json()["detail"].startswith("generation: Field required"), resp.json()
        assert resp.json()["errors"][0]["loc"] == ["body", "generation"]
        workers = (await http.get("/v1/workers")).json()["workers"]
        assert sorted((w["rank"], w["generation"], w["state"]) for w in workers) == [
            (0, 1, "serving"),
            (1, 1, "serving"),
        ]


async def test_the_load_window_counts_the_tokens_the_workers_served(
    etcd: str, prefix: str, small_driver: ContractDriver, agents: list[Proc]
) -> None:
    driver = small_driver
    agents += [start_agent(etcd, prefix, "a", 2), start_agent(etcd, prefix, "b", 2)]
    assert (await driver.run_op(FOUR, _placement(driver, 4))).state is OpState.SUCCEEDED
    tokens, layers, top_k = 20, driver.spec.model.num_moe_layers, driver.spec.model.top_k
    result = await driver.probe(num_tokens=tokens, seed=21)
    assert result.ok

    async def window() -> LoadWindow | None:
        got = await driver.store.get(driver.keys.load("moe"), LoadWindow)
        return None if got is None else got.value

    deadline = time.monotonic() + 10
    total = 0.0
    while time.monotonic() < deadline:
        w = await window()
        # the window decays slowly (60 s), so the sum approaches but never exceeds what was served
        total = 0.0 if w is None else float(w.load.decode().sum())
        if total > 0.98 * tokens * layers * top_k:
            break
        await asyncio.sleep(0.2)
    assert 0.98 * tokens * layers * top_k < total <= tokens * layers * top_k
    w = await window()
    assert (
        w is not None
        and w.generation == 1
        and w.load.shape == [layers, driver.spec.model.num_experts]
    )


async def test_an_agent_replaces_a_crashed_worker_and_ignores_operations_of_another_generation(
    etcd: str, prefix: str, small_driver: ContractDriver, agents: list[Proc]
) -> None:
    driver = small_driver
    proc = start_agent(etcd, prefix, "a", 3)
    agents.append(proc)
    assert (await driver.run_op(TWO, _placement(driver, 2))).state is OpState.SUCCEEDED
    # fencing: an op planned from generation 0 while generation 1 is committed gets no ack
    layout = await driver.layout()
    assert layout is not None and layout.generation == 1
    stale_plan = simple_plan(
        None, THREE, _placement(driver, 3), driver.spec.slots_per_rank, world="standby"
    )
    now = time.time()
    stale = Operation(
        id="op-stale", deployment="moe", kind=OpKind.SCALE_UP, state=OpState.PREPARING, from_generation=0,
        to_generation=1, request=ScaleRequest(dp_size=3), plan=stale_plan, created_at=now, updated_at=now,
        phase_deadline_at=now + 30,
    )  # fmt: skip
    await driver.store.put(driver.keys.op("moe", stale.id), stale)
    # a committed worker crashes: the agent starts a new one from the checkpoint
    before = {
        w["device_index"]: w["pid"]
        for w in httpx.get(f"{proc.url}/v1/workers", timeout=10).json()["workers"]
    }
    psutil.Process(before[1]).kill()
    deadline = time.monotonic() + 30
    healed = None
    while time.monotonic() < deadline:
        workers = httpx.get(f"{proc.url}/v1/workers", timeout=10).json()["workers"]
        healed = next(
            (w for w in workers if w["device_index"] == 1 and w["alive"] and w["pid"] != before[1]),
            None,
        )
        if healed is not None and healed["state"] == "serving":
            break
        await asyncio.sleep(0.2)
    assert healed is not None and healed["state"] == "serving" and healed["rank"] == 1, healed

    def groups() -> dict[int, bool | None]:
        got = httpx.get(f"{proc.url}/v1/workers", timeout=10).json()["workers"]
        return {w["device_index"]: w["active_group"] for w in got}

    # the restarted worker serves without the active group, and the agent's view says so
    deadline = time.monotonic() + 20
    while groups() != {0: True, 1: False} and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert groups() == {0: True, 1: False}
    # and says so in the deployment's audit trail: which rank, how its worker ended
    events = [e.value for e in await driver.store.list(driver.keys.events("moe"), Event)]
    restarted = [e for e in events if e.type == "worker.restarted"]
    assert len(restarted) == 1, events
    assert restarted[0].data == {"node_id": "a", "device_index": 1, "rank": 1, "generation": 1}
    assert f"(pid {before[1]}) was killed (SIGKILL)" in restarted[0].message, restarted[0]
    result = await driver.probe(num_tokens=12, seed=8)
    assert result.ok, result
    assert await driver.acks(stale, OpState.PREPARING) == {}
    assert 2 not in {
        w["device_index"] for w in httpx.get(f"{proc.url}/v1/workers", timeout=10).json()["workers"]
    }


async def test_a_worker_that_cannot_restart_is_recorded_once_then_its_restart(
    etcd: str, prefix: str, tmp_path: Path, agents: list[Proc]
) -> None:
    # a checkpoint of this test's own, so it can go missing
    checkpoint = tmp_path / "ckpt"
    write_synthetic(checkpoint, layers=2, experts=8, hidden=32, inter=64, seed=7, top_k=2)
    driver = ContractDriver(etcd, prefix, spec_for("moe", checkpoint, slots=4, max_dp=8))
    await driver.write_spec()
    try:
        proc = start_agent(etcd, prefix, "a", 2)
        agents.append(proc)
        assert (await driver.run_op(TWO, _placement(driver, 2))).state is OpState.SUCCEEDED

        async def events(type_: str) -> list[Event]:
            stored = await driver.store.list(driver.keys.events("moe"), Event)
            return [e.value for e in stored if e.value.type == type_]

        async def wait_for_event(type_: str) -> list[Event]:
            deadline = time.monotonic() + 30
            while not (got := await events(type_)) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert got, f"no {type_} event"
            return got

        checkpoint.rename(tmp_path / "moved")
        workers = httpx.get(f"{proc.url}/v1/workers", timeout=10).json()["workers"]
        psutil.Process(next(w["pid"] for w in workers if w["device_index"] == 1)).kill()
        failed = await wait_for_event("worker.restart_failed")
        assert failed[0].data["device_index"] == 1 and "ckpt" in failed[0].data["error"], failed
        assert "was killed (SIGKILL)" in failed[0].message, failed
        # the agent retries every 5 s; the same error is not recorded again
        await asyncio.sleep(11)
        tries = [line for line in proc.lines if "is not running; starting it" in line]
        assert len(tries) >= 2, proc.output()
        assert len(await events("worker.restart_failed")) == 1
        assert not await events("worker.restarted")
        (tmp_path / "moved").rename(checkpoint)
        restarted = await wait_for_event("worker.restarted")
        assert restarted[0].data["rank"] == 1, restarted
        # after failed tries it still names what took the first worker down
        assert "was killed (SIGKILL)" in restarted[0].message, restarted
        assert (await driver.probe(num_tokens=8, seed=3)).ok
    finally:
        await driver.close()


async def test_json_logs_of_the_agent_and_its_workers(
    etcd: str, prefix: str, small_driver: ContractDriver, agents: list[Proc]
) -> None:
    import json

    proc = start_agent(etcd, prefix, "a", 2, env={"EEP_LOG_FORMAT": "json"})
    agents.append(proc)
    assert (await small_driver.run_op(TWO, _placement(small_driver, 2))).state is OpState.SUCCEEDED
    # the agent dies at once: each worker notices, logs it (in JSON too) and exits
    workers = list(worker_pids(proc.url or "").values())
    proc.popen.send_signal(signal.SIGKILL)
    proc.popen.wait(10)
    deadline = time.monotonic() + 30
    while any(pid_running(p) for p in workers) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not any(pid_running(p) for p in workers)
    entries = [
        json.loads(line) for line in proc.lines if line.strip() and "ready at" not in line
    ]  # every line is one JSON object
    assert any(e["logger"].startswith("eep_agent") for e in entries), proc.output()
    gone = [e for e in entries if e["message"].endswith("worker exits")]
    assert {e["worker"] for e in gone} == {"moe/cpu:0", "moe/cpu:1"}, proc.output()
    assert {e["pid"] for e in gone} == set(workers)
