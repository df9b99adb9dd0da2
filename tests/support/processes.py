"""Start real eep processes for tests and stop them by pid (never by name)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

BIN = Path(sys.executable).parent
READY = re.compile(r"ready at (http://\S+)")
T = TypeVar("T")


@dataclass
class Proc:
    """A child process whose output is collected; ``url`` comes from its "ready at" line."""

    popen: subprocess.Popen[str]
    name: str
    lines: list[str] = field(default_factory=list)
    url: str | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            m = READY.search(line)
            if m and self.url is None:
                self.url = m.group(1).rstrip(".,)")
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 30.0) -> str:
        if not self._ready.wait(timeout) or self.url is None:
            raise RuntimeError(f"{self.name} did not become ready:\n" + self.output())
        return self.url

    def output(self) -> str:
        return "\n".join(self.lines)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; returns the exit code."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        return int(self.popen.returncode)


def pid_running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie is gone for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def sigterm_held_past_bound(proc: Proc, bound_s: float) -> str:
    """SIGTERM ``proc`` whose shutdown something holds, and check the shared shutdown
    watchdog (`eep_controller.tasks.ShutdownWatchdog`) with a ``bound_s`` bound: the
    stuck threads and tasks are logged at half of it and the process exits with code 3 soon after the
    bound. Returns the process's output."""
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    code = proc.popen.wait(20)
    took = time.monotonic() - started
    out = proc.output()
    assert code == 3, out[-3000:]
    assert 0.75 * bound_s < took < 5 * bound_s, took
    assert f"shutdown still running after {bound_s / 2}s; threads:" in out
    assert f"shutdown still running after {bound_s / 2}s; tasks:" in out
    return out


def start(
    name: str, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> Proc:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=full_env,
        cwd=cwd,
    )
    proc = Proc(popen, name)
    threading.Thread(target=proc._pump, daemon=True).start()
    return proc


def start_controller(
    etcd: str | None,
    prefix: str,
    *,
    port: int = 0,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
    lease_ttl: int = 2,
) -> Proc:
    args = [str(BIN / "eep-controller"), "serve", "--port", str(port)]
    if etcd:
        args += ["--etcd", etcd]
    args += extra or []
    e = {"EEP_ETCD_PREFIX": prefix, "EEP_ELECTION_LEASE_TTL_S": str(lease_ttl), **(env or {})}
    proc = start("controller", args, e)
    proc.wait_ready()
    return proc


def start_agent(
    etcd: str,
    prefix: str,
    node_id: str,
    *,
    devices: str = "cpu:2",
    lease_ttl: int = 2,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
) -> Proc:
    args = [
        str(BIN / "eep-agent"), "run", "--etcd", etcd, "--node-id", node_id,
        "--devices", devices, "--prefix", prefix, "--lease-ttl", str(lease_ttl),
    ]  # fmt: skip
    proc = start(f"agent {node_id}", args + (extra or []), env)
    proc.wait_ready()
    return proc


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns a truthy value; raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | Exception | None = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (httpx.HTTPError, ConnectionError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {last!r}")
