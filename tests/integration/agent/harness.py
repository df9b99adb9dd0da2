"""A test driver that plays the controller's part of docs/operation-protocol.md.

It writes deployment specs, operation records and committed layouts to a real etcd and
waits for the agents' acks, exactly as the contract says the controller does. Its plans
come from :func:`simple_plan` (a round-robin placement; every expert a rank does not keep
comes from a live holder, else from the checkpoint; rounds with one send and one receive
per rank). It is a driver for the contract, not a stand-in for the controller's logic.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from eep_controller.probe import ProbeClient, ProbeResult
from eep_controller.protocol import (
    Ack,
    AckStatus,
    DeploymentSpec,
    EncodedArray,
    GroupEndpoint,
    Layout,
    MoEShape,
    NodeInfo,
    Operation,
    OpKind,
    OpPlan,
    OpState,
    Participant,
    PlanStats,
    Rank,
    ScaleRequest,
)
from eep_controller.store import EtcdConnection, EtcdStore, KeySpace
from tests.support.processes import BIN, Proc, start

PhaseHook = Callable[[OpState, Operation], Coroutine[Any, Any, None]]


def spec_for(
    name: str,
    checkpoint: Path,
    *,
    slots: int,
    max_dp: int,
    deadlines: dict[str, float] | None = None,
) -> DeploymentSpec:
    meta = json.loads((checkpoint / "eep-checkpoint.json").read_text())
    experts = meta["experts"]
    return DeploymentSpec.model_validate(
        {
            "name": name,
            "model": MoEShape(
                num_moe_layers=meta["layers"],
                num_experts=experts,
                expert_bytes=3 * meta["hidden"] * meta["inter"] * 4,
                hidden_size=meta["hidden"],
                intermediate_size=meta["inter"],
                top_k=meta["top_k"],
            ),
            "slots_per_rank": slots,
            "min_dp": -(-experts // slots),
            "max_dp": max_dp,
            "checkpoint": str(checkpoint),
            "deadlines": deadlines or {},
        }
    )


def round_robin_placement(
    layers: int, experts: int, ranks: int, slots: int, shift: int = 0
) -> np.ndarray[Any, Any]:
    """Column ``c`` of layer ``l`` holds expert ``(c + l + shift) % E``: all experts, distinct within a rank."""
    cols = np.arange(ranks * slots)
    return np.stack([(cols + layer + shift) % experts for layer in range(layers)]).astype(np.int64)


def simple_plan(
    old: Layout | None,
    new_ranks: Sequence[Rank],
    placement: np.ndarray[Any, Any],
    slots: int,
    *,
    world: str,
    dead: Sequence[Rank] = (),
) -> OpPlan:
    old_ranks = list(old.ranks) if old is not None else []
    old_keys = [r.key for r in old_ranks]
    old_p2l = old.phy2log() if old is not None else None
    keys_new = [r.key for r in new_ranks]
    rank_map = [keys_new.index(r.key) if r.key in keys_new else -1 for r in old_ranks]
    dead_keys = {r.key for r in dead}
    participants: list[Participant] = []
    for i, r in enumerate(old_ranks):
        if r.key in dead_keys:
            continue
        participants.append(
            Participant(
                node_id=r.node_id,
                device_index=r.device_index,
                old_rank=i,
                new_rank=rank_map[i] if rank_map[i] >= 0 else None,
            )
        )
    for j, r in enumerate(new_ranks):
        if not any(r.key == o.key for o in old_ranks):
            participants.append(
                Participant(
                    node_id=r.node_id, device_index=r.device_index, old_rank=None, new_rank=j
                )
            )
    rows: list[list[int]] = []
    turn = 0
    layers = placement.shape[0]
    for layer in range(layers):
        for dst in range(len(new_ranks)):
            old_index = old_keys.index(keys_new[dst]) if keys_new[dst] in old_keys else None
            for slot in range(slots):
                expert = int(placement[layer, dst * slots + slot])
                if old_p2l is not None and old_index is not None:
                    held = old_p2l[layer, old_index * slots : (old_index + 1) * slots]
                    if expert in held:
                        continue
                sources: list[int] = []
                if old_p2l is not None:
                    for o in range(len(old_ranks)):
                        if old_ranks[o].key in dead_keys:
                            continue
                        if world == "standby" and rank_map[o] < 0:
                            continue
                        if expert in old_p2l[layer, o * slots : (o + 1) * slots]:
                            sources.append(o)
                src = sources[turn % len(sources)] if sources else -1
                turn += 1
                rows.append([layer, expert, src, dst, slot, 0, len(rows)])
    # rounds: each source sends at most once and each destination receives at most once per round
    sends: dict[int, set[int]] = {}
    recvs: dict[int, set[int]] = {}
    for row in rows:
        if row[2] < 0:
            continue
        rnd = 0
        while row[2] in sends.get(rnd, set()) or row[3] in recvs.get(rnd, set()):
            rnd += 1
        sends.setdefault(rnd, set()).add(row[2])
        recvs.setdefault(rnd, set()).add(row[3])
        row[5] = rnd
    transfers = np.asarray(rows, dtype=np.int64).reshape(-1, 7)
    expert_bytes = 0
    stats = PlanStats(
        copies=len(rows), lower_bound=0, checkpoint_reloads=int((transfers[:, 2] < 0).sum()) if rows else 0,
        bytes=expert_bytes, max_rank_bytes_in=0, max_rank_bytes_out=0, balancedness_before=1.0,
        balancedness_after=1.0, rounds=len(sends) or 1, est_transfer_s=0.0, makespan_lower_bound_s=0.0,
    )  # fmt: skip
    return OpPlan(
        from_dp=len(old_ranks),
        to_dp=len(new_ranks),
        participants=participants,
        rank_map=rank_map,
        placement=EncodedArray.encode(placement),
        transfers=EncodedArray.encode(transfers),
        transfer_world=world,
        stats=stats,
    )


@dataclass
class OpOutcome:
    op: Operation
    acks: dict[OpState, dict[int, Ack]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def state(self) -> OpState:
        return self.op.state

    def failed(self, phase: OpState) -> dict[int, Ack]:
        return {i: a for i, a in self.acks.get(phase, {}).items() if a.status is AckStatus.FAILED}


class ContractDriver:
    """Drives operations for one deployment through etcd, phase by phase."""

    def __init__(self, etcd: str, prefix: str, spec: DeploymentSpec) -> None:
        self.store = EtcdStore(EtcdConnection([etcd]), KeySpace(prefix))
        self.keys = self.store.keys
        self.spec = spec
        self.d = spec.name

    async def close(self) -> None:
        await self.store.close()

    async def write_spec(self) -> None:
        await self.store.put(self.keys.spec(self.d), self.spec)

    async def layout(self) -> Layout | None:
        got = await self.store.get(self.keys.layout(self.d), Layout)
        return None if got is None else got.value

    async def addresses(self) -> dict[str, str]:
        return {
            v.value.node_id: v.value.address
            for v in await self.store.list(self.keys.nodes(), NodeInfo)
        }

    def prober(self) -> ProbeClient:
        async def layout() -> Layout:
            got = await self.layout()
            assert got is not None, "no committed layout to probe"
            return got

        assert self.spec.checkpoint is not None
        return ProbeClient(layout, self.addresses, self.spec.checkpoint)

    async def probe(self, num_tokens: int = 12, seed: int = 0) -> ProbeResult:
        return await self.prober().probe(num_tokens=num_tokens, seed=seed)

    async def acks(self, op: Operation, phase: OpState) -> dict[int, Ack]:
        found = await self.store.list(self.keys.acks(self.d, op.id, phase.value), Ack)
        return {v.value.participant: v.value for v in found}

    async def phase_acks(
        self, op: Operation, phase: OpState, deadline_s: float = 60.0
    ) -> dict[int, Ack]:
        """Every participant's ack of ``phase``, or those in by the deadline."""
        assert op.plan is not None
        want = len(op.plan.participants)
        end = time.monotonic() + deadline_s + 2.0
        acks: dict[int, Ack] = {}
        while time.monotonic() < end:
            # a controller would abort at the first failure; this driver waits for every
            # participant so that tests can check that nobody hangs
            acks = await self.acks(op, phase)
            if len(acks) >= want:
                return acks
            await asyncio.sleep(0.05)
        return acks

    async def advance(self, op: Operation, state: OpState, deadline_s: float = 60.0) -> Operation:
        """Write ``op`` in ``state`` (a phase before the commit point, or an end state)."""
        now = time.time()
        op = op.model_copy(
            update={"state": state, "updated_at": now, "phase_deadline_at": now + deadline_s}
        )
        await self.store.put(self.keys.op(self.d, op.id), op)
        return op

    async def new_op(
        self,
        new_ranks: Sequence[Rank],
        placement: np.ndarray[Any, Any],
        *,
        world: str | None = None,
        dead: Sequence[Rank] = (),
        drain_timeout_s: float = 5.0,
    ) -> Operation:
        """An operation record (PLANNED, not written) from the committed layout to
        ``new_ranks`` / ``placement``."""
        old = await self.layout()
        g = old.generation if old is not None else 0
        grows = old is None or len(new_ranks) >= len(old.ranks)
        world = world or ("standby" if grows else "active")
        plan = simple_plan(
            old, new_ranks, placement, self.spec.slots_per_rank, world=world, dead=dead
        )
        now = time.time()
        return Operation(
            id=f"op-{uuid.uuid4().hex[:10]}",
            deployment=self.d,
            kind=OpKind.SCALE_UP if grows else OpKind.SCALE_DOWN,
            from_generation=g,
            to_generation=g + 1,
            request=ScaleRequest(dp_size=len(new_ranks), drain_timeout_s=drain_timeout_s),
            plan=plan,
            created_at=now,
            updated_at=now,
        )

    async def run_op(
        self,
        new_ranks: Sequence[Rank],
        placement: np.ndarray[Any, Any],
        *,
        world: str | None = None,
        deadline_s: float = 60.0,
        during: PhaseHook | None = None,
        after: PhaseHook | None = None,
        dead: Sequence[Rank] = (),
        drain_timeout_s: float = 5.0,
    ) -> OpOutcome:
        """One operation from the committed layout to ``new_ranks`` / ``placement``.

        ``during(phase, op)`` runs while the agents work on a phase; ``after(phase, op)``
        once every participant acked it ok. A failed or missing ack aborts before SWITCHING.
        """
        op = await self.new_op(
            new_ranks, placement, world=world, dead=dead, drain_timeout_s=drain_timeout_s
        )
        assert op.plan is not None
        plan = op.plan
        outcome = OpOutcome(op)
        started = time.monotonic()
        await self.store.put(self.keys.op(self.d, op.id), op)
        for phase in (OpState.PREPARING, OpState.TRANSFERRING, OpState.SWITCHING, OpState.CLEANUP):
            if phase is OpState.SWITCHING:
                op = await self._commit(op, new_ranks, placement, deadline_s)
            else:
                op = await self.advance(op, phase, deadline_s)
            hook = asyncio.create_task(during(phase, op)) if during is not None else None
            acks = await self.phase_acks(op, phase, deadline_s)
            if hook is not None:
                await hook
            outcome.acks[phase] = acks
            ok = len(acks) == len(plan.participants) and all(
                a.status is AckStatus.OK for a in acks.values()
            )
            if not ok:
                if phase in (OpState.PREPARING, OpState.TRANSFERRING):
                    op = await self.advance(
                        op.model_copy(update={"error": f"{phase.value} failed"}),
                        OpState.ABORTED,
                        deadline_s,
                    )
                    outcome.op = op
                    outcome.seconds = time.monotonic() - started
                    return outcome
                raise AssertionError(
                    f"{phase.value} after the commit point did not complete: {acks}"
                )
            if after is not None:
                await after(phase, op)
        op = await self.advance(op, OpState.SUCCEEDED, deadline_s)
        outcome.op = op
        outcome.seconds = time.monotonic() - started
        return outcome

    async def _commit(
        self,
        op: Operation,
        new_ranks: Sequence[Rank],
        placement: np.ndarray[Any, Any],
        deadline_s: float,
    ) -> Operation:
        endpoint = await self.store.get(self.keys.rendezvous(self.d, op.id), GroupEndpoint)
        layout = Layout(
            deployment=self.d,
            generation=op.to_generation,
            dp_size=len(new_ranks),
            ranks=list(new_ranks),
            slots_per_rank=self.spec.slots_per_rank,
            placement=EncodedArray.encode(placement),
            group=None if endpoint is None else endpoint.value,
            op_id=op.id,
            committed_at=time.time(),
        )
        now = time.time()
        op = op.model_copy(
            update={
                "state": OpState.SWITCHING,
                "updated_at": now,
                "phase_deadline_at": now + deadline_s,
            }
        )
        txn = self.store.txn()
        self.store.put_op(txn, self.keys.layout(self.d), layout)
        self.store.put_op(txn, self.keys.op(self.d, op.id), op)
        assert await self.store.commit(txn)
        return op


def start_agent(
    etcd: str, prefix: str, node_id: str, devices: int, env: dict[str, str] | None = None
) -> Proc:
    args = [
        str(BIN / "eep-agent"), "run", "--etcd", etcd, "--node-id", node_id,
        "--devices", f"cpu:{devices}", "--prefix", prefix, "--lease-ttl", "2", "--load-interval", "0.5",
    ]  # fmt: skip
    proc = start(f"agent {node_id}", args, env)
    proc.wait_ready(60)
    return proc


def worker_pids(agent_url: str) -> dict[int, int]:
    """device index -> pid of the agent's live workers."""
    got = httpx.get(f"{agent_url}/v1/workers", timeout=10).json()
    return {w["device_index"]: w["pid"] for w in got["workers"] if w["alive"]}


def ranks(*where: tuple[str, int]) -> list[Rank]:
    return [Rank(node_id=n, device_index=i) for n, i in where]
