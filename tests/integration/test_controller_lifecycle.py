"""The controller daemon: embedded etcd, leader election and failover, etcd restarts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from eep_controller.store import EmbeddedEtcd, free_port
from tests.support.processes import (
    BIN,
    Proc,
    pid_running,
    sigterm_held_past_bound,
    start,
    start_controller,
    wait_for,
)


def test_serve_without_endpoints_runs_embedded_etcd_and_stops_it_on_sigterm(
    tmp_path: Path, prefix: str
) -> None:
    port = free_port()
    proc = start(
        "controller",
        [
            str(BIN / "eep-controller"),
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "etcd"),
        ],
        {"EEP_ETCD_PREFIX": prefix, "EEP_ELECTION_LEASE_TTL_S": "2"},
    )
    url = proc.wait_ready()
    wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 15, what="readyz")
    m = wait_for(
        lambda: re.search(r"embedded etcd .* pid (\d+)", proc.output()), 5, what="etcd pid in log"
    )
    etcd_pid = int(m.group(1))
    assert pid_running(etcd_pid)
    assert (tmp_path / "etcd").is_dir()
    assert "external etcd cluster" in proc.output()
    assert proc.stop(timeout=45) == 0, proc.output()[-4000:]
    wait_for(lambda: not pid_running(etcd_pid), 10, what="embedded etcd to exit")


def _serve_embedded(data_dir: Path, prefix: str) -> Proc:
    return start(
        "controller",
        [str(BIN / "eep-controller"), "serve", "--port", "0", "--data-dir", str(data_dir)],
        {"EEP_ETCD_PREFIX": prefix, "EEP_ELECTION_LEASE_TTL_S": "2"},
    )


def test_a_killed_controllers_embedded_etcd_is_stopped_when_it_starts_again(
    tmp_path: Path, prefix: str
) -> None:
    """SIGKILL leaves the embedded etcd running on the data dir (the controller cannot stop
    it); the next controller on that data dir stops the leftover by its recorded pid and
    starts its own on the same data, instead of timing out on the data dir's lock. A second
    controller while the first still runs is refused with a clear message."""
    data = tmp_path / "etcd"
    started: list[Proc] = []
    try:
        first = _serve_embedded(data, prefix)
        started.append(first)
        url = first.wait_ready()
        found = wait_for(
            lambda: re.search(r"embedded etcd .* pid (\d+)", first.output()), 5, what="pid"
        )
        etcd_pid = int(found.group(1))
        assert httpx.post(f"{url}/v1/deployments", json=_spec("kept")).status_code == 201
        second = _serve_embedded(data, prefix)
        started.append(second)
        assert second.popen.wait(30) == 1, second.output()
        assert "is in use by process" in second.output() and "Traceback" not in second.output()
        assert pid_running(etcd_pid)  # the first one's etcd was left alone
        first.kill9()
        assert pid_running(etcd_pid)  # orphaned: nobody stopped it
        again = _serve_embedded(data, prefix)
        started.append(again)
        url = again.wait_ready(45)
        assert f"stopping etcd pid {etcd_pid} left running" in again.output()
        assert not pid_running(etcd_pid)
        assert httpx.get(f"{url}/v1/deployments/kept").status_code == 200  # same data
        assert again.stop(timeout=45) == 0, again.output()[-3000:]
        assert not (tmp_path / "etcd.pid").exists()
    finally:
        for proc in started:
            proc.stop()
        # an etcd a failed run left behind (the first one's, orphaned) is stopped by its pid
        leftover = EmbeddedEtcd(data).stop_leftover()
        assert leftover is None or not pid_running(leftover)


def test_serve_stops_embedded_etcd_on_sigint_too(tmp_path: Path, prefix: str) -> None:
    proc = start(
        "controller",
        [str(BIN / "eep-controller"), "serve", "--port", "0", "--data-dir", str(tmp_path / "etcd")],
        {"EEP_ETCD_PREFIX": prefix},
    )
    proc.wait_ready()
    m = wait_for(
        lambda: re.search(r"embedded etcd .* pid (\d+)", proc.output()), 5, what="etcd pid"
    )
    proc.signal(signal.SIGINT)
    proc.popen.wait(45)
    wait_for(lambda: not pid_running(int(m.group(1))), 10, what="embedded etcd to exit")


def test_refuses_non_loopback_bind_without_tokens(etcd: str, prefix: str) -> None:
    out = subprocess.run(
        [str(BIN / "eep-controller"), "serve", "--etcd", etcd, "--host", "0.0.0.0", "--port", "0"],
        env={**os.environ, "EEP_ETCD_PREFIX": prefix, "EEP_AUTH_TOKENS": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "--insecure" in out.stderr + out.stdout


def test_config_command_masks_secrets(prefix: str) -> None:
    out = subprocess.run(
        [str(BIN / "eep-controller"), "config"],
        env={**os.environ, "EEP_AUTH_TOKENS": "verysecret:admin", "EEP_ETCD_PREFIX": prefix},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "verysecret" not in out.stdout and "***:admin" in out.stdout and prefix in out.stdout


def _leader(url: str) -> Any:
    r = httpx.get(f"{url}/v1/leader", timeout=5)
    return r.json()["replica_id"] if r.status_code == 200 else None


def test_two_replicas_elect_one_leader_and_fail_over(etcd: str, prefix: str) -> None:
    a = start_controller(etcd, prefix, env={"EEP_ELECTION_REPLICA_ID": "replica-a"}, lease_ttl=2)
    b = start_controller(etcd, prefix, env={"EEP_ELECTION_REPLICA_ID": "replica-b"}, lease_ttl=2)
    try:
        assert a.url and b.url
        first = wait_for(lambda: _leader(a.url), 10, what="a leader")  # type: ignore[arg-type]
        assert _leader(b.url) == first  # both agree
        leaders = [httpx.get(f"{u}/readyz").json()["is_leader"] for u in (a.url, b.url)]
        assert sorted(leaders) == [False, True]
        dead, survivor = (a, b) if first == "replica-a" else (b, a)
        killed_at = time.monotonic()
        dead.kill9()
        assert survivor.url
        wait_for(lambda: _leader(survivor.url) not in (None, first), 2 + 3, what="failover")  # type: ignore[arg-type]
        assert time.monotonic() - killed_at <= 2 + 3  # within the lease TTL (+ one poll interval)
        assert httpx.get(f"{survivor.url}/readyz").json()["is_leader"] is True
    finally:
        a.stop()
        b.stop()


def _spec(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"num_moe_layers": 2, "num_experts": 8, "expert_bytes": 8},
        "slots_per_rank": 4,
        "min_dp": 2,
        "max_dp": 4,
    }


def test_controller_rides_out_an_etcd_restart(private_etcd: EmbeddedEtcd, prefix: str) -> None:
    proc = start_controller(private_etcd.endpoint, prefix)
    try:
        url = proc.url
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 10, what="ready")
        created = httpx.post(f"{url}/v1/deployments", json=_spec("before-restart"))
        assert created.status_code == 201, created.text
        gauge = 'eep_layout_generation{deployment="before-restart"}'
        wait_for(lambda: gauge in httpx.get(f"{url}/metrics").text, 10, what="the leader's gauge")
        private_etcd.kill()
        down_from = len(proc.lines)
        wait_for(
            lambda: httpx.get(f"{url}/readyz", timeout=10).status_code == 503, 15, what="not ready"
        )
        problem = httpx.get(f"{url}/readyz", timeout=10)
        assert problem.headers["content-type"].startswith("application/problem+json")
        assert "eep_etcd_up 0.0" in httpx.get(f"{url}/metrics", timeout=10).text
        assert httpx.get(f"{url}/healthz").status_code == 200  # the process is still up
        assert httpx.get(f"{url}/v1/deployments", timeout=15).status_code == 503
        # down long enough for the leader lease to go and the election to retry a few times
        wait_for(lambda: "no longer the leader" in proc.output(), 15, what="the lease lost")
        # only the leader keeps layout gauges current: a replica that stops leading drops them
        # (once the reconcile pass that etcd's going interrupted has given up)
        wait_for(lambda: gauge not in httpx.get(f"{url}/metrics").text, 15, what="gauge dropped")
        time.sleep(2)
        # the election retried every half second while etcd was down: told once, not per try
        told = [line for line in proc.lines[down_from:] if "leader election: " in line]
        assert len(told) == 1, "\n".join(told)
        private_etcd.start()
        wait_for(
            lambda: httpx.get(f"{url}/readyz", timeout=10).status_code == 200,
            20,
            what="ready again",
        )
        assert "eep_etcd_up 1.0" in httpx.get(f"{url}/metrics", timeout=10).text
        assert proc.alive()
        # and once that it works again
        wait_for(lambda: "leader election: working again" in proc.output(), 10, what="told")
        r = httpx.post(f"{url}/v1/deployments", json=_spec("after-restart"))
        assert r.status_code == 201
    finally:
        proc.stop()


def test_python_m_entry_points_exist() -> None:
    for mod in ("eep_controller.cli.server", "eep_controller.cli.ctl"):
        out = subprocess.run(
            [sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr


def test_every_program_tells_its_version() -> None:
    from eep_controller import __version__

    for program in ("eepctl", "eep-controller", "eep-agent"):
        out = subprocess.run(
            [str(BIN / program), "--version"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0 and out.stdout == f"{program} {__version__}\n", out


def test_a_shutdown_held_past_its_bound_logs_the_stuck_tasks_and_stops_hard(
    tmp_path: Path, prefix: str
) -> None:
    """An open event stream holds the graceful HTTP shutdown for 5 s; with a 2 s bound the
    controller logs every task's stack at 1 s and exits with code 3 at 2 s, etcd stopped."""
    proc = start(
        "controller",
        [str(BIN / "eep-controller"), "serve", "--port", "0", "--data-dir", str(tmp_path / "etcd")],
        {"EEP_ETCD_PREFIX": prefix, "EEP_SERVER_SHUTDOWN_TIMEOUT_S": "2"},
    )
    url = proc.wait_ready()
    m = wait_for(
        lambda: re.search(r"embedded etcd .* pid (\d+)", proc.output()), 5, what="etcd pid"
    )
    with httpx.stream("GET", f"{url}/v1/events", timeout=30) as stream:
        assert stream.status_code == 200
        out = sigterm_held_past_bound(proc, 2.0)
    assert "task http-server:" in out  # the server task, stuck closing the open stream
    assert "shutdown did not finish within 2.0s; stopping hard" in out
    wait_for(lambda: not pid_running(int(m.group(1))), 10, what="embedded etcd to exit")


def test_json_logs_are_one_object_per_line(etcd: str, prefix: str) -> None:
    import json

    proc = start_controller(etcd, prefix, env={"EEP_LOG_FORMAT": "json"})
    try:
        # becoming leader is logged at INFO
        wait_for(lambda: any('"logger"' in line for line in proc.lines), 20, what="a log line")
    finally:
        proc.stop()
    logged = [line for line in proc.lines if "ready at" not in line and line.strip()]
    entries = [json.loads(line) for line in logged]  # every line is one JSON object
    assert len(entries) >= 2, proc.output()  # start-up and shutdown at least
    assert all({"time", "level", "logger", "message", "pid"} <= set(e) for e in entries)
    assert {e["pid"] for e in entries} == {proc.pid}
