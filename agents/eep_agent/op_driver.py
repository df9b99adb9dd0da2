"""What this agent does for one participant in one phase of an operation, and the ack it writes.

The contract is docs/operation-protocol.md. Each public method acts for one
(operation, phase, participant), never raises, and writes exactly one :class:`Ack`
(``ok`` or ``failed`` with the reason) unless fencing says the op is not for now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from eep_agent.runtime.commands import (
    Abort,
    BuildStandby,
    Cleanup,
    HostRendezvous,
    Load,
    Stats,
    Switch,
    Transfer,
    TransferResult,
    WorkerIdentity,
    WorkerStats,
)
from eep_agent.runtime.expert_store import ExpertShape
from eep_agent.runtime.groups import GroupAddress, backend_for
from eep_agent.runtime.moves import PlanError, moves_for_participant, new_slots_of
from eep_agent.view import DeploymentView
from eep_agent.worker_pool import WorkerError, WorkerHandle, WorkerPool
from eep_controller.probe.checkpoint import CheckpointError, read_meta
from eep_controller.protocol import (
    Ack,
    AckStatus,
    DeploymentSpec,
    Device,
    GroupEndpoint,
    GrouplessRank,
    Operation,
    OpState,
    Participant,
    ep_size,
)
from eep_controller.store import EtcdStore

log = logging.getLogger(__name__)

PHASE_DEFAULT_S = {
    OpState.PREPARING: "preparing_s",
    OpState.TRANSFERRING: "transferring_s",
    OpState.SWITCHING: "switching_s",
    OpState.CLEANUP: "cleanup_s",
}
WORKER_START_S = 120.0
QUICK_COMMAND_S = 30.0


class PhaseFailed(RuntimeError):
    """The participant cannot complete the phase; ``str()`` is the ack's reason."""


@dataclass
class AckFields:
    bytes_sent: int = 0
    bytes_received: int = 0
    tensors_verified: int = 0
    checksum_failures: int = 0
    aborted_requests: int = 0
    served_requests: int = 0
    reason: str | None = None


@dataclass(frozen=True)
class NodeContext:
    node_id: str
    devices: list[Device]
    bind_host: str
    advertise_host: str


def fenced(
    op: Operation, phase: OpState, committed_generation: int, committed_by: str | None = None
) -> bool:
    """True when the committed layout allows acting on ``op`` in ``phase`` (the fencing rule).

    ``committed_by`` is the committed layout's ``op_id``: when known, SWITCHING and CLEANUP
    also require that this op is the one that committed it.
    """
    if phase in (OpState.PLANNED, OpState.PREPARING, OpState.TRANSFERRING):
        return op.from_generation == committed_generation
    if phase in (OpState.SWITCHING, OpState.CLEANUP):
        return op.to_generation == committed_generation and committed_by in (None, op.id)
    return False


def expert_shape(spec: DeploymentSpec) -> ExpertShape:
    """The worker's slot shape from the spec (hidden/intermediate sizes from the checkpoint if the spec omits them)."""
    hidden, inter = spec.model.hidden_size, spec.model.intermediate_size
    if (hidden is None or inter is None) and spec.checkpoint:
        try:
            meta = read_meta(Path(spec.checkpoint))
        except CheckpointError as exc:
            raise PhaseFailed(str(exc)) from exc
        hidden, inter = hidden or meta.hidden, inter or meta.inter
    if hidden is None or inter is None:
        raise PhaseFailed(
            "the deployment's model has no hidden_size/intermediate_size and no checkpoint to read them from"
        )
    return ExpertShape(
        layers=spec.model.num_moe_layers,
        experts=spec.model.num_experts,
        slots=spec.slots_per_rank,
        hidden=hidden,
        inter=inter,
    )


@dataclass
class OpDriver:
    """Acts for this node's participants; one instance per agent."""

    node: NodeContext
    store: EtcdStore
    view: DeploymentView
    pool: WorkerPool
    served_at_start: dict[tuple[str, int], int] = field(default_factory=dict)

    # ------------------------------------------------------------------ helpers
    def _device(self, index: int) -> Device:
        for device in self.node.devices:
            if device.index == index:
                return device
        raise PhaseFailed(f"node {self.node.node_id} has no device {index}")

    def _identity(self, deployment: str, index: int) -> WorkerIdentity:
        return WorkerIdentity(deployment, self._device(index).kind.value, index)

    def _remaining(self, op: Operation, phase: OpState, spec: DeploymentSpec) -> float:
        if op.phase_deadline_at is not None:
            return max(1.0, op.phase_deadline_at - time.time())
        return float(getattr(spec.deadlines, PHASE_DEFAULT_S[phase]))

    def _worker(self, deployment: str, p: Participant) -> WorkerHandle:
        handle = self.pool.get(deployment, p.device_index)
        if handle is None or not handle.alive:
            code = None if handle is None else handle.exitcode
            raise PhaseFailed(
                f"no running worker for device {p.device_index} on {self.node.node_id}"
                + ("" if code is None else f" (it exited with code {code})")
            )
        return handle

    async def _put_until(self, key: str, value: BaseModel, deadline: float) -> bool:
        """Write ``value``, retrying through etcd outages until ``deadline`` (monotonic)."""
        while True:
            try:
                await self.store.put(key, value)
                return True
            except Exception as exc:
                if time.monotonic() >= deadline:
                    log.error("could not write %s before the deadline: %s", key, exc)
                    return False
                await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ acting
    async def act(self, op: Operation, phase: OpState, index: int) -> None:
        """Do ``phase`` for participant ``index`` of ``op`` and write its ack."""
        assert op.plan is not None
        p = op.plan.participants[index]
        started = time.time()
        spec = self.view.spec(op.deployment)
        fields = AckFields()
        status = AckStatus.OK
        remaining = 60.0
        try:
            if spec is None:
                raise PhaseFailed(f"deployment {op.deployment} has no spec")
            remaining = self._remaining(op, phase, spec)
            served_key = (op.id, p.device_index)
            handle = self.pool.get(op.deployment, p.device_index)
            if served_key not in self.served_at_start and handle is not None:
                self.served_at_start[served_key] = handle.record.served
            if phase is OpState.PREPARING:
                await self._prepare(op, spec, p, remaining)
            elif phase is OpState.TRANSFERRING:
                fields = await self._transfer(op, spec, p, index, remaining)
            elif phase is OpState.SWITCHING:
                fields = await self._switch(op, p)
            elif phase is OpState.CLEANUP:
                await self._cleanup(op, p, remaining)
            if fields.reason is not None:
                raise PhaseFailed(fields.reason)
        except asyncio.CancelledError:
            raise
        except (PhaseFailed, WorkerError, PlanError) as exc:
            status, fields.reason = AckStatus.FAILED, str(exc)
        except Exception as exc:
            log.exception("%s of op %s participant %d failed", phase.value, op.id, index)
            status, fields.reason = AckStatus.FAILED, f"{type(exc).__name__}: {exc}"
        if status is AckStatus.FAILED:
            log.warning(
                "op %s %s participant %d failed: %s", op.id, phase.value, index, fields.reason
            )
        ack = Ack(
            op_id=op.id,
            phase=phase,
            participant=index,
            node_id=self.node.node_id,
            status=status,
            reason=fields.reason,
            started_at=started,
            finished_at=time.time(),
            bytes_sent=fields.bytes_sent,
            bytes_received=fields.bytes_received,
            tensors_verified=fields.tensors_verified,
            checksum_failures=fields.checksum_failures,
            aborted_requests=fields.aborted_requests,
            served_requests=fields.served_requests,
        )
        key = self.store.keys.ack(op.deployment, op.id, phase.value, index)
        await self._put_until(key, ack, time.monotonic() + remaining + 30.0)

    async def _prepare(
        self, op: Operation, spec: DeploymentSpec, p: Participant, remaining: float
    ) -> None:
        assert op.plan is not None
        deadline = time.monotonic() + remaining
        shape = expert_shape(spec)
        if p.joining:
            identity = self._identity(op.deployment, p.device_index)
            handle = await self.pool.start(identity, timeout_s=min(remaining, WORKER_START_S))
            handle.record.state = "joining"
            handle.record.op_id = op.id
            await handle.call(
                Load(shape, spec.checkpoint, None, generation=-1, rank=None), remaining
            )
        handle = self._worker(op.deployment, p)
        if p.leaving:
            return
        assert p.new_rank is not None
        world = len(op.plan.new_ranks())
        if world != ep_size(op.plan.to_dp, spec.tp, spec.pcp):
            raise PhaseFailed(
                f"the plan has {world} new ranks but dp={op.plan.to_dp}, tp={spec.tp}, pcp={spec.pcp} "
                f"needs {ep_size(op.plan.to_dp, spec.tp, spec.pcp)}"
            )
        backend = backend_for(self._device(p.device_index).kind.value)
        handle.record.op_id = op.id
        if p.new_rank == 0:
            port = await handle.call(
                HostRendezvous(op.id, self.node.bind_host, world, remaining), QUICK_COMMAND_S
            )
            endpoint = GroupEndpoint(
                host=self.node.advertise_host,
                port=port,
                backend=backend,
                world_size=world,
                prefix=f"{op.deployment}/{op.id}/g{op.to_generation}",
            )
            if not await self._put_until(
                self.store.keys.rendezvous(op.deployment, op.id), endpoint, deadline
            ):
                raise PhaseFailed("could not publish the rendezvous endpoint before the deadline")
        else:
            found = await self.view.wait_until(
                lambda: self.view.rendezvous(op.deployment, op.id), deadline - time.monotonic()
            )
            if found is None:
                raise PhaseFailed(
                    "no rendezvous endpoint for the standby world was published before the deadline"
                )
            endpoint = found
        if endpoint.world_size != world or endpoint.backend != backend:
            raise PhaseFailed(
                f"rendezvous endpoint is for {endpoint.world_size} ranks on {endpoint.backend}, "
                f"this rank needs {world} on {backend}"
            )
        address = GroupAddress(
            endpoint.host, endpoint.port, endpoint.backend, endpoint.world_size, endpoint.prefix
        )
        left = max(1.0, deadline - time.monotonic())
        await handle.call(BuildStandby(op.id, address, p.new_rank, left), left + 10.0)

    async def _transfer(
        self, op: Operation, spec: DeploymentSpec, p: Participant, index: int, remaining: float
    ) -> AckFields:
        assert op.plan is not None
        plan = op.plan
        handle = self._worker(op.deployment, p)
        moves = moves_for_participant(
            plan.transfers.decode(),
            plan.participants,
            plan.rank_map,
            plan.transfer_world,
            index,
            slots_per_rank=spec.slots_per_rank,
        )
        new_slots = (
            None
            if p.new_rank is None
            else new_slots_of(plan.placement.decode(), p.new_rank, spec.slots_per_rank)
        )
        result: TransferResult = await handle.call(
            Transfer(op.id, moves, new_slots, remaining), remaining + 10.0
        )
        return AckFields(
            bytes_sent=result.bytes_sent,
            bytes_received=result.bytes_received,
            tensors_verified=result.tensors_verified,
            checksum_failures=result.checksum_failures,
            reason=result.error,
        )

    async def _switch(self, op: Operation, p: Participant) -> AckFields:
        handle = self._worker(op.deployment, p)
        record = handle.record
        baseline = self.served_at_start.pop((op.id, p.device_index), record.served)
        if p.leaving:
            aborted = await record.drain(op.request.drain_timeout_s)
            return AckFields(aborted_requests=aborted, served_requests=record.served - baseline)
        assert p.new_rank is not None
        await handle.call(Switch(op.id, op.to_generation, p.new_rank), QUICK_COMMAND_S)
        record.rank, record.generation, record.op_id, record.state = (
            p.new_rank,
            op.to_generation,
            None,
            "serving",
        )
        return AckFields(served_requests=record.served - baseline)

    async def _cleanup(self, op: Operation, p: Participant, remaining: float) -> None:
        if p.leaving:
            await self.pool.stop(op.deployment, p.device_index)
            return
        handle = self._worker(op.deployment, p)
        await handle.call(Cleanup(op.id), remaining)

    # ------------------------------------------------------------------ abort
    async def abort(self, op: Operation) -> None:
        """Undo this node's part of an operation aborted before its commit point."""
        if op.plan is None:
            return
        for p in op.plan.participants:
            if p.node_id != self.node.node_id:
                continue
            self.served_at_start.pop((op.id, p.device_index), None)
            handle = self.pool.get(op.deployment, p.device_index)
            if handle is None:
                continue
            if p.joining:
                # only the worker started for this op: a newer op may have started its own
                # on the device while this abort went through the participants before it
                if handle.record.op_id == op.id:
                    await self.pool.stop(op.deployment, p.device_index, handle)
                continue
            handle.record.draining = False
            if handle.record.op_id == op.id:
                handle.record.op_id = None
            if handle.alive:
                with contextlib.suppress(WorkerError):
                    await handle.call(Abort(op.id), self._abort_wait(op))
                await self._report_lost_group(op.deployment, p.device_index, handle)

    async def _report_lost_group(self, deployment: str, index: int, handle: WorkerHandle) -> None:
        """After an abort: a serving worker whose active group a failed transfer destroyed
        (every rank of a failed active-world transfer drops it) is marked groupless."""
        record = handle.record
        if record.rank is None or record.generation != self.view.committed_generation(deployment):
            return
        try:
            stats: WorkerStats = await handle.call(Stats(), QUICK_COMMAND_S)
        except WorkerError:
            return
        if not stats.has_active_group:
            await self.mark_groupless(deployment, record.generation, record.rank, index)

    async def mark_groupless(
        self, deployment: str, generation: int, rank: int, device_index: int
    ) -> None:
        """Tell the controller this rank has no active group (see `GrouplessRank`), so the
        next scale-down does not count on the active world. If it cannot be written, such a
        scale-down fails in TRANSFERRING (no active group) and is aborted: logged."""
        record = GrouplessRank(
            deployment=deployment, generation=generation, rank=rank,
            node_id=self.node.node_id, device_index=device_index, since=time.time(),
        )  # fmt: skip
        try:
            await self.store.put(
                self.store.keys.groupless_rank(deployment, generation, rank), record
            )
        except Exception as exc:
            log.warning(
                "could not record that %s rank %d has no active group: %s", deployment, rank, exc
            )

    def _abort_wait(self, op: Operation) -> float:
        # the worker may finish a blocked transfer first: that is bounded by the phase deadline
        spec = self.view.spec(op.deployment)
        longest = 600.0 if spec is None else spec.deadlines.transferring_s
        return longest + 30.0

    async def load_committed(self, deployment: str, device_index: int) -> tuple[int, int] | None:
        """Start (or restart) the worker of a committed rank from the checkpoint; it serves
        without a group. Returns (rank, generation), or None when the device holds no
        committed rank (any more)."""
        spec = self.view.spec(deployment)
        layout = self.view.layout(deployment)
        if spec is None or layout is None:
            return None
        ranks = [
            i
            for i, r in enumerate(layout.ranks)
            if r.node_id == self.node.node_id and r.device_index == device_index
        ]
        placement = layout.phy2log()
        if not ranks or placement is None:
            return None
        rank = ranks[0]
        shape = expert_shape(spec)
        handle = await self.pool.start(
            self._identity(deployment, device_index), timeout_s=WORKER_START_S
        )
        handle.record.state = "loading"
        try:
            await handle.call(
                Load(
                    shape,
                    spec.checkpoint,
                    new_slots_of(placement, rank, shape.slots),
                    layout.generation,
                    rank,
                ),
                WORKER_START_S,
            )
        except BaseException:
            # a worker that holds nothing must not stay in the pool looking alive: the
            # reconciler restarts only missing or dead workers, so it would never serve
            await self.pool.stop(deployment, device_index, handle)
            raise
        handle.record.rank, handle.record.generation, handle.record.state = (
            rank,
            layout.generation,
            "serving",
        )
        log.warning(
            "worker for %s rank %d (device %d) reloaded from the checkpoint; it has no active group until the next operation",
            deployment, rank, device_index,
        )  # fmt: skip
        return rank, layout.generation
