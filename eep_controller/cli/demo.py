"""``eep-controller demo``: the whole loop on one machine, verified.

Embedded etcd + this controller + local agents (CPU devices) + reference workers for a small
MoE whose checkpoint is written on the fly; a deployment is brought up, a steady probe loop
runs, and the deployment is scaled through the REST API step by step with live progress.
Every step is verified by an exact probe; a summary table (and ``--json``) closes the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.markup import escape
from rich.table import Table

from eep_controller.cli.output import balance_change, make_console
from eep_controller.cli.runtime import ControllerRuntime
from eep_controller.config import Settings
from eep_controller.probe import ProbeClient, ProbeResult, write_synthetic
from eep_controller.protocol import Layout, NodeInfo
from eep_controller.store import EtcdConnection, EtcdStore, KeySpace
from eep_controller.tasks import cancel_and_wait

console = make_console(stderr=True)


@dataclass
class DemoConfig:
    scale: list[int]
    agents: int = 2
    devices_per_agent: int = 2
    layers: int = 4
    experts: int = 16
    hidden: int = 64
    inter: int = 128
    top_k: int = 2
    slots_per_rank: int = 8
    port: int = 0
    state_dir: Path | None = None
    exit_when_done: bool = True
    json_summary: bool = False
    op_timeout_s: float = 300.0


@dataclass
class Traffic:
    """The steady probe loop's counters (requests served and failed, mismatching probes)."""

    probes: int = 0
    requests: int = 0
    failed_requests: int = 0
    mismatches: int = 0
    last: ProbeResult | None = None
    errors: list[str] = field(default_factory=list)

    def snapshot(self) -> tuple[int, int, int, int]:
        return self.probes, self.requests, self.failed_requests, self.mismatches


def _agent_binary() -> Path:
    path = Path(sys.executable).parent / "eep-agent"
    if not path.exists() or importlib.util.find_spec("torch") is None:
        raise SystemExit(
            "the demo runs reference workers: install the agent extra (pip install 'eep[agent]')"
        )
    return path


class Demo:
    def __init__(self, cfg: DemoConfig) -> None:
        if len(cfg.scale) < 1:
            raise SystemExit("--scale needs at least one dp size, e.g. 2,4,3")
        devices = cfg.agents * cfg.devices_per_agent
        if max(cfg.scale) > devices:
            raise SystemExit(
                f"--scale asks for dp {max(cfg.scale)} but the demo has {devices} devices"
            )
        self.cfg = cfg
        self.own_dir = cfg.state_dir is None
        self.dir = cfg.state_dir or Path(tempfile.mkdtemp(prefix="eep-demo-"))
        self.agents: list[asyncio.subprocess.Process] = []
        self.traffic = Traffic()
        self.url = ""
        self.store: EtcdStore | None = None
        self.summary: list[dict[str, Any]] = []

    # -------------------------------------------------------------- plumbing
    async def _layout(self) -> Layout:
        assert self.store is not None
        got = await self.store.get(self.store.keys.layout("demo"), Layout)
        if got is None:
            raise RuntimeError("the demo deployment has no layout")
        return got.value

    async def _addresses(self) -> dict[str, str]:
        assert self.store is not None
        return {
            n.value.node_id: n.value.address
            for n in await self.store.list(self.store.keys.nodes(), NodeInfo)
        }

    async def _start_agents(self, etcd: str) -> None:
        binary = _agent_binary()
        for i in range(self.cfg.agents):
            log = open(self.dir / f"agent-{i}.log", "ab")  # noqa: SIM115 - owned by the child
            proc = await asyncio.create_subprocess_exec(
                str(binary), "run", "--etcd", etcd, "--node-id", f"demo-node-{i}",
                "--devices", f"cpu:{self.cfg.devices_per_agent}", "--lease-ttl", "3",
                "--state-dir", str(self.dir / f"agent-{i}"),
                stdout=log, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            log.close()
            self.agents.append(proc)

    async def _stop_agents(self) -> None:
        for proc in self.agents:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.agents:
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def _wait(self, what: str, predicate: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await predicate()
            if value:
                return value
            await asyncio.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")

    # -------------------------------------------------------------- traffic
    async def _traffic_loop(self, prober: ProbeClient, stop: asyncio.Event) -> None:
        seed = 1000
        while not stop.is_set():
            seed += 1
            try:
                result = await prober.probe(num_tokens=8, seed=seed)
            except Exception as exc:  # a probe that cannot run at all counts as failed traffic
                self.traffic.failed_requests += 1
                self.traffic.errors.append(str(exc))
                await asyncio.sleep(0.2)
                continue
            self.traffic.probes += 1
            self.traffic.requests += result.requests
            self.traffic.failed_requests += result.failed_requests
            self.traffic.mismatches += 0 if result.ok else 1
            if not result.ok:
                self.traffic.errors.append(
                    f"probe mismatch: max error {result.max_abs_err:.2e}, {result.errors[:2]}"
                )
            self.traffic.last = result
            await asyncio.sleep(0.05)

    # -------------------------------------------------------------- the run
    async def run(self) -> int:
        cfg = self.cfg
        settings = Settings()
        settings.server.port = cfg.port
        settings.etcd.data_dir = self.dir / "etcd"
        settings.election.lease_ttl_s = 3
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        runtime = ControllerRuntime(settings, on_ready=lambda url: ready.set_result(url))
        server = asyncio.create_task(runtime.run())
        stop_traffic = asyncio.Event()
        traffic_task: asyncio.Task[None] | None = None
        ok = False
        try:
            self.url = await asyncio.wait_for(asyncio.shield(ready), 60)
            assert runtime.embedded is not None
            etcd = runtime.embedded.endpoint
            self.store = EtcdStore(EtcdConnection([etcd]), KeySpace(settings.etcd.prefix))
            console.print(
                f"[bold]eep demo[/]: controller {self.url}  (docs {self.url}/docs), etcd {etcd}, state {self.dir}"
            )
            ckpt = self.dir / "checkpoint"
            meta = write_synthetic(
                ckpt,
                layers=cfg.layers,
                experts=cfg.experts,
                hidden=cfg.hidden,
                inter=cfg.inter,
                seed=7,
                top_k=cfg.top_k,
            )
            console.print(
                f"checkpoint: {cfg.layers} layers x {cfg.experts} experts, {meta.expert_bytes} bytes each, at {ckpt}"
            )
            await self._start_agents(etcd)
            async with httpx.AsyncClient(base_url=self.url, timeout=60) as api:
                await self._wait(
                    f"{cfg.agents} agents",
                    lambda: self._nodes_ready(api),
                    60,
                )
                console.print(
                    f"{cfg.agents} agents registered with {cfg.devices_per_agent} CPU devices each"
                )
                spec = {
                    "name": "demo",
                    "model": {
                        "num_moe_layers": cfg.layers, "num_experts": cfg.experts, "expert_bytes": meta.expert_bytes,
                        "hidden_size": cfg.hidden, "intermediate_size": cfg.inter, "top_k": cfg.top_k,
                    },
                    "slots_per_rank": cfg.slots_per_rank,
                    "min_dp": max(1, -(-cfg.experts // cfg.slots_per_rank)),
                    "max_dp": cfg.agents * cfg.devices_per_agent,
                    "initial_dp": cfg.scale[0],
                    "checkpoint": str(ckpt),
                    "deadlines": {"preparing_s": 120, "transferring_s": 120, "switching_s": 60, "cleanup_s": 60},
                }  # fmt: skip
                r = await api.post("/v1/deployments", json=spec)
                if r.status_code != 201:
                    raise RuntimeError(f"creating the deployment failed: {r.status_code} {r.text}")
                console.print(
                    f"deployment [bold]demo[/] declared at dp={cfg.scale[0]}; bringing it up"
                )
                first = await self._await_bring_up(api)
                self.summary.append(first)
                prober = ProbeClient(self._layout, self._addresses, ckpt)
                check = await prober.probe(num_tokens=32, seed=1)
                self._print_probe("after bring-up", check)
                traffic_task = asyncio.create_task(self._traffic_loop(prober, stop_traffic))
                for dp in cfg.scale[1:]:
                    self.summary.append(await self._scale(api, dp, prober))
                stop_traffic.set()
                await traffic_task
                traffic_task = None
            ok = (
                all(s["state"] == "SUCCEEDED" and s["probe_ok"] for s in self.summary)
                and self.traffic.mismatches == 0
            )
            self._print_summary(ok)
            if not cfg.exit_when_done:
                console.print(
                    f"\neep demo ready at {self.url} and keeps running: try "
                    f"[bold]eepctl --server {self.url} layout demo[/]; Ctrl-C stops it",
                    soft_wrap=True,
                )
                await server  # the controller stops on Ctrl-C / SIGTERM
        finally:
            stop_traffic.set()
            if traffic_task is not None:
                await cancel_and_wait(traffic_task)
            await self._stop_agents()
            if self.store is not None:
                await self.store.close()
            runtime.request_stop()
            try:
                await asyncio.wait_for(server, 30)
            except (asyncio.TimeoutError, Exception):
                await cancel_and_wait(server)
            if runtime.embedded is not None:
                runtime.embedded.stop()
            if self.own_dir and ok:
                shutil.rmtree(self.dir, ignore_errors=True)
        if cfg.json_summary:
            print(
                json.dumps(
                    {
                        "ok": ok,
                        "operations": [self._json_row(s) for s in self.summary],
                        "traffic": self._traffic_json(),
                    }
                ),
                flush=True,
            )
        return 0 if ok else 1

    async def _nodes_ready(self, api: httpx.AsyncClient) -> bool:
        r = await api.get("/v1/nodes")
        return r.status_code == 200 and r.json()["count"] >= self.cfg.agents

    async def _await_bring_up(self, api: httpx.AsyncClient) -> dict[str, Any]:
        async def first_op() -> str | None:
            r = await api.get("/v1/deployments/demo/operations", params={"limit": 1})
            items = r.json()["items"] if r.status_code == 200 else []
            return items[0]["id"] if items else None

        op_id = await self._wait("the bring-up operation", first_op, 60)
        return await self._follow(api, op_id, None, 0)

    async def _scale(self, api: httpx.AsyncClient, dp: int, prober: ProbeClient) -> dict[str, Any]:
        before = (await self._layout()).dp_size
        r = await api.post(
            "/v1/deployments/demo/scale", json={"dp_size": dp, "reason": "demo", "drain_timeout_s": 10},
            headers={"Idempotency-Key": f"demo-{dp}-{time.time_ns()}"},
        )  # fmt: skip
        if r.status_code != 202:
            raise RuntimeError(f"scale to {dp} was refused: {r.status_code} {r.text}")
        return await self._follow(api, r.json()["id"], prober, before)

    async def _follow(
        self, api: httpx.AsyncClient, op_id: str, prober: ProbeClient | None, from_dp: int
    ) -> dict[str, Any]:
        from eep_controller.cli import ctl
        from eep_controller.cli.ops_commands import watch_operation

        start_traffic = self.traffic.snapshot()
        t0 = time.monotonic()
        ctl.opts.server = self.url
        op = await asyncio.to_thread(watch_operation, op_id, timeout_s=self.cfg.op_timeout_s)
        seconds = time.monotonic() - t0
        end_traffic = self.traffic.snapshot()
        probe_ok = True
        if op["state"] == "SUCCEEDED" and prober is not None:
            check = await prober.probe(num_tokens=32, seed=len(self.summary) + 2)
            self._print_probe(f"after {op['kind']} to dp {op['plan']['to_dp']}", check)
            probe_ok = check.ok
        plan = op.get("plan") or {}
        phases = {
            h["phase"]: round((h.get("ended_at") or h["started_at"]) - h["started_at"], 3)
            for h in op["history"]
        }
        return {
            "id": op["id"],
            "kind": op["kind"],
            "from_dp": plan.get("from_dp", from_dp),
            "to_dp": plan.get("to_dp"),
            "state": op["state"],
            "error": op.get("error"),
            "copies": plan.get("copies", 0),
            "copy_lower_bound": plan.get("lower_bound", 0),
            "bytes_moved": op.get("bytes_moved", 0),
            "balancedness_before": plan.get("balancedness_before", 0.0),
            "balancedness_after": plan.get("balancedness_after", 0.0),
            "seconds": round(seconds, 3),
            "phases": phases,
            "requests_served": end_traffic[1] - start_traffic[1],
            "probes_failed": (end_traffic[2] - start_traffic[2])
            + (end_traffic[3] - start_traffic[3]),
            "aborted_requests": op.get("aborted_requests", 0),
            "probe_ok": probe_ok,
        }

    def _print_probe(self, when: str, result: ProbeResult) -> None:
        mark = "[green]exact[/]" if result.ok else "[red]MISMATCH[/]"
        console.print(
            f"probe {when}: {mark} (max |error| {result.max_abs_err:.1e}, generation {result.generation}, {result.requests} requests)"
        )

    def _print_summary(self, ok: bool) -> None:
        table = Table(
            "OP", "KIND", "DP", "STATE", "PHASES (s)", "COPIES / LB", "NET BYTES", "BALANCE", "SERVED", "FAILED",
            title="eep demo summary",
        )  # fmt: skip
        for s in self.summary:
            phases = " ".join(f"{k[:4]} {v:.2f}" for k, v in s["phases"].items())
            table.add_row(
                s["id"], s["kind"], f"{s['from_dp']} -> {s['to_dp']}", s["state"], phases,
                f"{s['copies']} / {s['copy_lower_bound']}", f"{s['bytes_moved'] / 1e6:.1f} MB",
                balance_change(s),
                str(s["requests_served"]), str(s["probes_failed"]),
            )  # fmt: skip
        console.print(table)
        for s in self.summary:
            if s["state"] != "SUCCEEDED" or not s["probe_ok"]:
                console.print(
                    f"[red]{s['id']} {s['state']}[/]: "
                    + escape(s["error"] or "probe mismatch after the operation")
                )
        t = self.traffic
        console.print(
            f"traffic: {t.probes} probes, {t.requests} requests, {t.failed_requests} failed, {t.mismatches} mismatches"
        )
        console.print(
            "[bold green]demo OK[/]"
            if ok
            else f"[bold red]demo FAILED[/] {escape(str(t.errors[:3]))}"
        )

    @staticmethod
    def _json_row(s: dict[str, Any]) -> dict[str, Any]:
        keys = (
            "id", "kind", "from_dp", "to_dp", "state", "error", "copies", "copy_lower_bound", "bytes_moved",
            "balancedness_before", "balancedness_after", "seconds", "phases", "requests_served", "probes_failed",
            "aborted_requests",
        )  # fmt: skip
        return {k: s[k] for k in keys}

    def _traffic_json(self) -> dict[str, Any]:
        t = self.traffic
        return {
            "probes": t.probes,
            "requests": t.requests,
            "failed_requests": t.failed_requests,
            "mismatches": t.mismatches,
        }


def run_demo(cfg: DemoConfig) -> int:
    return asyncio.run(Demo(cfg).run())
