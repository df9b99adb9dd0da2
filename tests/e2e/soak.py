"""A soak run: random scales, cancels, agent kills and controller restarts on a whole cluster.

A long run is for hand use, with a seed to replay (it takes minutes):

    .venv/bin/python -m tests.e2e.soak --seed 3 --steps 25

``tests/e2e/test_soak.py`` runs a short one (six steps, about a minute) in every test run.

After every step, once the cluster has settled, it checks what must hold whatever happened:
every committed rank is on a live node, no expert is without a replica, every operation has
ended with exactly one terminal event (and a commit event only if it succeeded), and the
probe's MoE output is exact on the committed generation. Operations slower than 20 s are
reported. On a violation it writes every process's output next to the cluster's files and
exits 1.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from eep_controller.store import EmbeddedEtcd
from tests.e2e.cluster import Cluster, commit_counts, make_cluster
from tests.support.processes import Proc, wait_for

NODES = ("a", "b", "c", "d")
ACTIONS = ("scale", "cancel", "kill_mid", "kill_idle", "revive", "ctl_restart")
SLOW_TRANSFERS = {"EEP_TEST_TRANSFER_ROUND_PAUSE_S": "0.15"}
SLOW_OP_S = 20.0
# After a step, the chance that a serving worker process is killed (an OOM, a crash): its
# agent must restart it from the checkpoint and say so in the audit trail. Drawn from a
# stream of its own, so a seed's steps are the same with and without these kills.
WORKER_KILL_P = 0.35


class Soak:
    def __init__(self, cluster: Cluster, tmp: Path, seed: int) -> None:
        self.c = cluster
        self.tmp = tmp
        self.rng = random.Random(seed)
        self.worker_rng = random.Random(seed + 10**6)
        self.worker_kills = 0
        self.procs: list[tuple[str, Proc]] = []
        self.slow: set[str] = set()
        self.actions: list[str] = []  # what each step did
        self.checks = 0  # settled states checked

    def say(self, *parts: object) -> None:
        print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)

    def start_agent(self, node: str) -> None:
        self.procs.append(
            (f"agent-{node}-{len(self.procs)}", self.c.start_agent(node, env=SLOW_TRANSFERS))
        )

    def restart_controller(self, name: str) -> None:
        self.procs.append((f"controller-{name}", self.c.start_controller(name)))

    def dump(self) -> None:
        for name, proc in self.procs:
            (self.tmp / f"{name}.log").write_text(proc.output())
        self.say("process outputs written to", self.tmp)

    def get(self, path: str) -> Any:
        with self.c.api() as api:
            return api.get(path).json()

    def live_nodes(self) -> set[str]:
        return {n["node_id"] for n in self.get("/v1/nodes")["items"]}

    def settled(self) -> bool:
        if self.get("/v1/deployments/moe")["active_operation"] is not None:
            return False
        return {r.node_id for r in self.c.layout().ranks} <= self.live_nodes()

    def check(self, tag: str, rng: random.Random | None = None) -> None:
        """Wait for the cluster to settle, then check every invariant (the probe's seed from
        `rng`, the steps' own stream by default)."""
        time.sleep(3.5)  # a killed agent's lease expires and the leader notices
        wait_for(self.settled, 120, interval=0.5, what=f"the cluster to settle after {tag}")
        layout = self.c.layout()
        placement = self.get("/v1/deployments/moe/layout")["placement"]
        ops = self.get("/v1/deployments/moe/operations?limit=200")["items"]
        assert placement["experts_without_replica"] == 0, (tag, placement)
        events = self.c.events()
        for op in ops:
            assert op["state"] in ("SUCCEEDED", "ABORTED"), (tag, op["id"], op["state"])
            committed, ended = commit_counts(events, op["id"])
            assert ended == 1, (tag, op["id"], committed, ended)
            assert committed == (op["state"] == "SUCCEEDED"), (tag, op["id"], committed, ended)
            took = op["updated_at"] - op["created_at"]
            if took > SLOW_OP_S and op["id"] not in self.slow:
                self.slow.add(op["id"])
                phases = [
                    (h["phase"], round((h.get("ended_at") or 0) - h["started_at"], 1))
                    for h in op["history"]
                ]
                self.say(
                    "SLOW",
                    op["id"],
                    op["kind"],
                    op["state"],
                    round(took, 1),
                    phases,
                    op.get("error"),
                )
        probe = self.c.probe(num_tokens=16, seed=(rng or self.rng).randrange(10**6))
        assert probe.ok and probe.generation == layout.generation, (tag, probe)
        nodes = sorted({r.node_id for r in layout.ranks})
        self.checks += 1
        self.say(f"ok after {tag}: generation {layout.generation}, dp {layout.dp_size} on {nodes}")

    def step(self, i: int) -> None:
        live = [n for n in NODES if n in self.c.agents and self.c.agents[n].alive()]
        dead = [n for n in NODES if n not in live]
        action = self.rng.choice(ACTIONS)
        if len(live) < 3 and dead and self.rng.random() < 0.6:
            action = "revive"
        dp = self.c.layout().dp_size
        target = self.rng.choice([d for d in range(2, 7) if d != dp])
        self.say(f"#{i} {action} (dp {dp}, target {target}, live {live})")
        self.actions.append(action)
        if action == "revive":
            if dead:
                self.start_agent(self.rng.choice(dead))
        elif action == "kill_idle":
            if len(live) > 1:
                self.c.agents[self.rng.choice(live)].kill9()
        else:
            with self.c.api() as api:
                r = api.post("/v1/deployments/moe/scale", json={"dp_size": target})
            if r.status_code != 202:
                self.say("  refused:", r.status_code, r.json().get("detail"))
            else:
                op_id = r.json()["id"]
                time.sleep(self.rng.uniform(0, 2.5))
                if action == "cancel":
                    with self.c.api() as api:
                        self.say(
                            "  cancel:", api.post(f"/v1/operations/{op_id}/cancel").status_code
                        )
                elif action == "kill_mid" and len(live) > 1:
                    victim = self.rng.choice(live)
                    self.say("  kill", victim)
                    self.c.agents[victim].kill9()
                elif action == "ctl_restart":
                    self.c.controllers[-1].kill9()
                    self.restart_controller(f"c{i}")
                done = self.c.wait_op(op_id, 180)
                self.say("  op", done["state"], done.get("error") or "")
        self.check(f"#{i} {action}")
        if self.worker_rng.random() < WORKER_KILL_P:
            self.kill_worker(i)

    def kill_worker(self, i: int) -> None:
        """Kill one serving worker; wait for its agent's `worker.restarted` event, then check."""
        ranks = self.c.layout().ranks
        rank = self.worker_rng.randrange(len(ranks))
        node, device = ranks[rank].node_id, ranks[rank].device_index
        address = {n["node_id"]: n["address"] for n in self.get("/v1/nodes")["items"]}[node]
        with httpx.Client(base_url=address, timeout=10) as agent:
            workers = agent.get("/v1/workers").json()["workers"]
        pid = next(w["pid"] for w in workers if w["device_index"] == device and w["alive"])
        seen = {e.seq for e in self.c.events() if e.type == "worker.restarted"}
        self.say(f"#{i} kill_worker: rank {rank} (pid {pid} on {node} device {device})")
        os.kill(pid, signal.SIGKILL)
        self.worker_kills += 1
        wait_for(
            lambda: any(
                e.type == "worker.restarted" and e.seq not in seen and e.data["rank"] == rank
                for e in self.c.events()
            ),
            60,
            what=f"rank {rank}'s worker restarted",
        )
        self.check(f"#{i} kill_worker", self.worker_rng)


def run(seed: int, steps: int, tmp: Path) -> Soak:
    """Bring a cluster up under `tmp`, take `steps` random steps, check after each; raises
    on the first violation (after writing every process's output to `tmp`). Every process
    it started is stopped, whatever happens."""
    etcd = EmbeddedEtcd(tmp / "etcd")
    etcd.start()
    cluster = make_cluster(etcd, tmp)
    soak = Soak(cluster, tmp, seed)
    try:
        soak.restart_controller("c")
        for node in NODES[:3]:
            soak.start_agent(node)
        cluster.bring_up(initial_dp=2, max_dp=6)
        soak.check("bring-up")
        for i in range(steps):
            soak.step(i)
    except Exception as exc:
        soak.say("SOAK FAILED:", repr(exc))
        soak.dump()
        raise
    finally:
        cluster.stop()
        etcd.stop()
    soak.say(f"SOAK PASSED: seed {seed}, {steps} steps, {len(soak.slow)} slow operations")
    return soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        run(args.seed, args.steps, Path(tempfile.mkdtemp(prefix="eep-soak-")))
    except Exception:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
