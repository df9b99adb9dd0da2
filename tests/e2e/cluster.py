"""A whole eep cluster on this machine for end-to-end tests: etcd, controller(s), agents, workers.

Everything is a real process talking over real sockets; tests drive it only through the
REST API (and read etcd / probe the workers to check what they must).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from eep_controller.probe import ProbeClient, ProbeResult, write_synthetic
from eep_controller.protocol import Event, GroupEndpoint, Layout, NodeInfo
from eep_controller.store import EmbeddedEtcd, EtcdConnection, EtcdStore, KeySpace
from tests.support.processes import Proc, start_agent, start_controller, wait_for

LAYERS, EXPERTS, HIDDEN, INTER, TOP_K = 2, 8, 32, 64, 2
TERMINAL = ("SUCCEEDED", "ABORTED")


@dataclass
class Cluster:
    etcd: EmbeddedEtcd
    checkpoint: Path
    prefix: str = field(default_factory=lambda: f"/eep-e2e/{uuid.uuid4().hex[:10]}")
    controllers: list[Proc] = field(default_factory=list)
    agents: dict[str, Proc] = field(default_factory=dict)
    deployment: str = "moe"

    # ------------------------------------------------------------------ processes
    def start_controller(self, replica: str = "c1") -> Proc:
        proc = start_controller(
            self.etcd.endpoint, self.prefix, env={"EEP_ELECTION_REPLICA_ID": replica}, lease_ttl=2
        )
        self.controllers.append(proc)
        return proc

    def start_agent(
        self,
        node_id: str,
        devices: int = 2,
        env: dict[str, str] | None = None,
        lease_ttl: int = 2,
    ) -> Proc:
        proc = start_agent(
            self.etcd.endpoint, self.prefix, node_id, devices=f"cpu:{devices}", lease_ttl=lease_ttl, env=env,
            extra=["--state-dir", str(self.checkpoint.parent / f"agent-{node_id}")],
        )  # fmt: skip
        self.agents[node_id] = proc
        return proc

    def stop(self) -> None:
        for proc in [*self.controllers, *self.agents.values()]:
            proc.stop(timeout=30)

    @property
    def url(self) -> str:
        for proc in self.controllers:
            if proc.alive() and proc.url:
                return proc.url
        raise RuntimeError("no controller is running")

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    # ------------------------------------------------------------------ deployment
    def spec(self, initial_dp: int, max_dp: int, **deadlines: float) -> dict[str, Any]:
        return {
            "name": self.deployment,
            "model": {
                "num_moe_layers": LAYERS, "num_experts": EXPERTS, "expert_bytes": 3 * HIDDEN * INTER * 4,
                "hidden_size": HIDDEN, "intermediate_size": INTER, "top_k": TOP_K,
            },
            "slots_per_rank": 4,
            "min_dp": 2,
            "max_dp": max_dp,
            "initial_dp": initial_dp,
            "checkpoint": str(self.checkpoint),
            "deadlines": {"preparing_s": 60, "transferring_s": 60, "switching_s": 30, "cleanup_s": 30, **deadlines},
        }  # fmt: skip

    def bring_up(self, initial_dp: int, max_dp: int, **deadlines: float) -> dict[str, Any]:
        with self.api() as api:
            r = api.post("/v1/deployments", json=self.spec(initial_dp, max_dp, **deadlines))
            assert r.status_code == 201, r.text
            ops = wait_for(
                lambda: api.get(f"/v1/deployments/{self.deployment}/operations").json()["items"],
                30,
                what="bring-up op",
            )
        op = self.wait_op(ops[0]["id"], 120)
        assert op["state"] == "SUCCEEDED", op
        return op

    def op(self, op_id: str) -> dict[str, Any]:
        with self.api() as api:
            return dict(api.get(f"/v1/operations/{op_id}").json())

    def wait_op(
        self, op_id: str, timeout: float = 120, states: tuple[str, ...] = TERMINAL
    ) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            try:
                op = self.op(op_id)
            except (httpx.HTTPError, RuntimeError):
                return None
            return op if op.get("state") in states else None

        return dict(
            wait_for(done, timeout, interval=0.2, what=f"operation {op_id} to reach {states}")
        )

    def scale(self, dp: int, **body: Any) -> dict[str, Any]:
        with self.api() as api:
            r = api.post(f"/v1/deployments/{self.deployment}/scale", json={"dp_size": dp, **body})
            assert r.status_code == 202, r.text
            return dict(r.json())

    # ------------------------------------------------------------------ reading truth
    def _store(self) -> EtcdStore:
        return EtcdStore(EtcdConnection([self.etcd.endpoint]), KeySpace(self.prefix))

    def layout(self) -> Layout:
        async def go() -> Layout:
            store = self._store()
            try:
                got = await store.get(store.keys.layout(self.deployment), Layout)
                assert got is not None
                return got.value
            finally:
                await store.close()

        return asyncio.run(go())

    def rendezvous_published(self, op_id: str) -> bool:
        """The standby world's rendezvous endpoint of `op_id` is in etcd (its host is up)."""

        async def go() -> bool:
            store = self._store()
            try:
                key = store.keys.rendezvous(self.deployment, op_id)
                return await store.get(key, GroupEndpoint) is not None
            finally:
                await store.close()

        return asyncio.run(go())

    def events(self) -> list[Event]:
        async def go() -> list[Event]:
            store = self._store()
            try:
                return [
                    e.value for e in await store.list(store.keys.events(self.deployment), Event)
                ]
            finally:
                await store.close()

        return asyncio.run(go())

    def probe(self, num_tokens: int = 16, seed: int = 0) -> ProbeResult:
        async def go() -> ProbeResult:
            store = self._store()

            async def layout() -> Layout:
                got = await store.get(store.keys.layout(self.deployment), Layout)
                assert got is not None
                return got.value

            async def addresses() -> dict[str, str]:
                return {
                    n.value.node_id: n.value.address
                    for n in await store.list(store.keys.nodes(), NodeInfo)
                }

            try:
                return await ProbeClient(layout, addresses, self.checkpoint).probe(
                    num_tokens=num_tokens, seed=seed
                )
            finally:
                await store.close()

        return asyncio.run(go())


def commit_counts(events: list[Event], op_id: str) -> tuple[int, int]:
    """How many commit events and how many end events (succeeded or aborted) `op_id` has."""
    mine = [e.type for e in events if e.op_id == op_id]
    ended = sum(t in ("operation.succeeded", "operation.aborted") for t in mine)
    return mine.count("operation.committed"), ended


def make_cluster(etcd: EmbeddedEtcd, tmp: Path) -> Cluster:
    ckpt = tmp / "checkpoint"
    write_synthetic(
        ckpt, layers=LAYERS, experts=EXPERTS, hidden=HIDDEN, inter=INTER, seed=11, top_k=TOP_K
    )
    return Cluster(etcd=etcd, checkpoint=ckpt)


class ProbeLoop:
    """Probes continuously in a thread; counts requests that failed and outputs that mismatched."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.results: list[ProbeResult] = []
        self.crashes: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        seed = 500
        while not self._stop.is_set():
            seed += 1
            try:
                self.results.append(self.cluster.probe(num_tokens=8, seed=seed))
            except Exception as exc:  # the loop must keep going; the test asserts on crashes
                self.crashes.append(repr(exc))
            time.sleep(0.05)

    def __enter__(self) -> ProbeLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    @property
    def failed_requests(self) -> int:
        return sum(r.failed_requests for r in self.results)

    @property
    def mismatches(self) -> list[ProbeResult]:
        return [r for r in self.results if not r.ok]
