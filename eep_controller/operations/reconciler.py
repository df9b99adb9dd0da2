"""The reconciler (leader only): drives every open operation, brings deployments up, recovers.

Stateless across restarts: everything it needs is in etcd. Each tick it reads, asks the pure
state machine what to do, and writes the result in one transaction guarded by the
revisions it read, so two leaders (during a failover) can never both apply a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from eep_controller.actuators import Actuator, NativeActuator
from eep_controller.config import Settings
from eep_controller.errors import EepError, InsufficientDevices
from eep_controller.metrics import Metrics
from eep_controller.operations.deployments import LockRecord, deployment_names
from eep_controller.operations.events import trim_events
from eep_controller.operations.history import trim_operations
from eep_controller.operations.planning import lost_ranks, recover_dp
from eep_controller.operations.service import create_operation
from eep_controller.operations.state_machine import (
    CommitLayout,
    Effect,
    Observations,
    OperationFinished,
    PhaseFinished,
    RecordEvent,
    ReleaseLock,
    advance,
)
from eep_controller.planner import Placement, balancedness
from eep_controller.protocol import (
    ActuatorKind,
    DeploymentSpec,
    GroupEndpoint,
    Layout,
    LoadWindow,
    NodeInfo,
    Operation,
    OpKind,
    ScaleRequest,
)
from eep_controller.store import EtcdStore, RepeatedFailure, StoreUnavailable, Versioned
from eep_controller.store.audit import add_event, record_event

log = logging.getLogger(__name__)


@dataclass
class _Backoff:
    failures: int = 0
    next_at: float = 0.0
    last_note: str = ""


@dataclass
class Reconciler:
    store: EtcdStore
    settings: Settings
    metrics: Metrics
    is_leader: Callable[[], bool]
    actuators: dict[ActuatorKind, Actuator] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    _backoff: dict[str, _Backoff] = field(default_factory=dict)
    _balance_cache: dict[str, tuple[int, float]] = field(default_factory=dict)  # generation, when
    _exported: set[str] = field(default_factory=set)  # deployments with layout gauges
    _last_trim: float = 0.0
    ticks: int = 0
    _etcd_failures: RepeatedFailure = field(
        default_factory=lambda: RepeatedFailure(log, "reconcile: etcd unavailable")
    )

    def __post_init__(self) -> None:
        self.actuators.setdefault(ActuatorKind.NATIVE, NativeActuator(self.store))

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        interval = self.settings.operations.reconcile_interval_s
        while True:
            if not self.is_leader():
                self._forget_layouts(set())
            else:
                try:
                    await self.tick()
                    self._etcd_failures.ok()
                except StoreUnavailable as exc:
                    self._etcd_failures.failed(exc)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("reconcile tick failed")
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), interval)

    async def tick(self, now: float | None = None) -> None:
        self.ticks += 1
        keys = self.store.keys
        nodes = [n.value for n in await self.store.list(keys.nodes(), NodeInfo)]
        live = frozenset(n.node_id for n in nodes)
        self.metrics.nodes.labels(state="ready").set(len(nodes))
        names = await deployment_names(self.store)
        self.metrics.deployments.set(len(names))
        self._forget_layouts(set(names))
        lost: set[str] = set()  # nodes gone that still hold ranks
        for name in names:
            if not self.is_leader():
                return
            try:
                lost |= await self._reconcile_deployment(name, nodes, live, now)
            except StoreUnavailable:
                raise
            except Exception:
                log.exception("reconciling deployment %s failed", name)
        self.metrics.nodes.labels(state="lost").set(len(lost))
        clock = time.time()
        if clock - self._last_trim > 30:
            self._last_trim = clock
            for name in names:
                await trim_events(self.store, name, self.settings.operations.events_kept)

    async def _reconcile_deployment(
        self, name: str, nodes: list[NodeInfo], live: frozenset[str], now: float | None
    ) -> set[str]:
        """Drive or start this deployment's operation; returns the ids of the nodes gone
        that still hold its ranks."""
        keys = self.store.keys
        spec = await self.store.get(keys.spec(name), DeploymentSpec)
        layout = await self.store.get(keys.layout(name), Layout)
        if spec is None or layout is None:
            return set()
        await self._export_layout(name, layout.value)
        lost = lost_ranks(layout.value, nodes)
        gone = {layout.value.ranks[i].node_id for i in lost}
        lock = await self.store.get(keys.lock(name), LockRecord)
        if lock is not None:
            await self._drive(spec.value, lock, live, now)
        elif lost:
            await self._start(
                spec.value,
                ScaleRequest(
                    dp_size=recover_dp(spec.value, layout.value, lost), reason="node_lost"
                ),
                failed=lost,
                kind=OpKind.RECOVER,
                note=f"ranks {lost} lost",
            )
        elif not layout.value.ranks:
            await self._start(
                spec.value,
                ScaleRequest(dp_size=spec.value.start_dp, reason="initial bring-up"),
                failed=None,
                kind=None,
                note="bring-up",
            )
        return gone

    # ------------------------------------------------------------------ starting ops on our own
    async def _start(
        self,
        spec: DeploymentSpec,
        request: ScaleRequest,
        *,
        failed: list[int] | None,
        kind: OpKind | None,
        note: str,
    ) -> None:
        state = self._backoff.setdefault(spec.name, _Backoff())
        clock = time.time()
        if clock < state.next_at:
            return
        try:
            outcome = await create_operation(
                self.store,
                spec.name,
                request,
                requested_by="controller",
                idempotency_key=None,
                link_bandwidth=self.settings.operations.link_bandwidth_bytes_per_s,
                failed_ranks=failed,
                kind_override=kind,
                allow_below_min=failed is not None,
            )
        except InsufficientDevices as exc:
            state.next_at = clock + 2.0
            if state.last_note != exc.detail:
                state.last_note = exc.detail
                await record_event(
                    self.store, spec.name, "deployment.waiting", f"{note} waits: {exc.detail}"
                )
            return
        except EepError as exc:
            state.failures += 1
            state.next_at = clock + min(300.0, 2.0 * 2**state.failures)
            if state.last_note != exc.detail:
                state.last_note = exc.detail
                await record_event(
                    self.store,
                    spec.name,
                    "deployment.blocked",
                    f"{note} cannot start: {exc.detail}",
                )
            return
        if outcome.status == 202:
            state.failures += 1  # reset when the deployment serves again
            state.next_at = clock + min(300.0, 2.0 * 2**state.failures)
            state.last_note = ""
            log.info(
                "started %s on %s: %s", outcome.body.get("kind"), spec.name, outcome.body.get("id")
            )

    # ------------------------------------------------------------------ driving one op
    async def _drive(
        self,
        spec: DeploymentSpec,
        lock: Versioned[LockRecord],
        live: frozenset[str],
        now: float | None,
    ) -> None:
        keys = self.store.keys
        name = spec.name
        got = await self.store.get(keys.op(name, lock.value.op_id), Operation)
        if got is None or got.value.state.terminal:
            txn = self.store.txn()
            self.store.require_revision(txn, keys.lock(name), lock.mod_revision)
            self.store.delete_op(txn, keys.lock(name))
            add_event(
                self.store,
                txn,
                name,
                "lock.released",
                f"released a stale lock held by {lock.value.op_id}",
                lock.value.op_id,
            )
            await self.store.commit(txn)
            return
        op = got.value
        actuator = self.actuators.get(spec.actuator, self.actuators[ActuatorKind.NATIVE])
        acks = await actuator.observe(op)
        t = now if now is not None else time.time()
        new, effects = advance(
            op, Observations(acks=acks, live_nodes=live, deadlines=spec.deadlines), t
        )
        if new == op and not effects:
            return
        if await self._apply(spec, got, lock, new, effects):
            self.wake.set()
            if new.state.terminal and new.state.value == "ABORTED":
                await actuator.aborted(new)
            elif new.state != op.state:
                await actuator.enter_phase(new)

    async def _apply(
        self,
        spec: DeploymentSpec,
        got: Versioned[Operation],
        lock: Versioned[LockRecord],
        new: Operation,
        effects: list[Effect],
    ) -> bool:
        keys = self.store.keys
        name = spec.name
        txn = self.store.txn()
        self.store.require_revision(txn, got.key, got.mod_revision)
        self.store.put_op(txn, got.key, new)
        for effect in effects:
            if isinstance(effect, CommitLayout):
                layout = await self.store.get(keys.layout(name), Layout)
                if layout is None or layout.value.generation != new.from_generation:
                    log.error(
                        "op %s: layout moved to another generation before its commit; aborting",
                        new.id,
                    )
                    return await self._abort_for_layout(spec, got, lock)
                group = await self.store.get(keys.rendezvous(name, new.id), GroupEndpoint)
                self.store.require_revision(txn, keys.layout(name), layout.mod_revision)
                self.store.put_op(
                    txn,
                    keys.layout(name),
                    self._next_layout(spec, new, group.value if group else None),
                )
                # the new generation's group holds every rank: no rank is without one now
                self.store.delete_op(txn, keys.groupless_all(name), prefix=True)
            elif isinstance(effect, ReleaseLock):
                self.store.require_revision(txn, keys.lock(name), lock.mod_revision)
                self.store.delete_op(txn, keys.lock(name))
            elif isinstance(effect, RecordEvent):
                add_event(self.store, txn, name, effect.type, effect.message, new.id, effect.data)
        if not await self.store.commit(txn):
            return False
        for effect in effects:
            if isinstance(effect, PhaseFinished):
                self.metrics.phase_seconds.labels(phase=effect.phase.value).observe(effect.seconds)
            elif isinstance(effect, OperationFinished):
                self.metrics.operations.labels(kind=effect.kind, result=effect.result).inc()
                if effect.result == "succeeded":
                    self.metrics.bytes_moved.inc(effect.bytes_moved)
                    self._backoff.pop(name, None)
                await trim_operations(self.store, name, self.settings.operations.history_kept)
        log.info("op %s: %s -> %s", new.id, got.value.state.value, new.state.value)
        return True

    async def _abort_for_layout(
        self, spec: DeploymentSpec, got: Versioned[Operation], lock: Versioned[LockRecord]
    ) -> bool:
        from eep_controller.operations.state_machine import abort

        new, effects = abort(
            got.value,
            time.time(),
            Observations(),
            "the committed layout changed underneath this operation",
        )
        return await self._apply(spec, got, lock, new, effects)

    @staticmethod
    def _next_layout(spec: DeploymentSpec, op: Operation, group: GroupEndpoint | None) -> Layout:
        assert op.plan is not None
        return Layout(
            deployment=spec.name,
            generation=op.to_generation,
            dp_size=op.plan.to_dp,
            ranks=op.plan.new_ranks(),
            slots_per_rank=spec.slots_per_rank,
            placement=op.plan.placement,
            group=group,
            op_id=op.id,
            committed_at=time.time(),
        )

    # ------------------------------------------------------------------ metrics
    async def _export_layout(self, name: str, layout: Layout) -> None:
        """Generation and balancedness gauges; balance is scored on the published load window."""
        self._exported.add(name)
        self.metrics.generation.labels(deployment=name).set(layout.generation)
        cached = self._balance_cache.get(name)
        clock = time.time()
        if cached is not None and cached[0] == layout.generation and clock - cached[1] < 10:
            return
        value = 0.0
        phy = layout.phy2log()
        if phy is not None and phy.size:
            load_rec = await self.store.get(self.store.keys.load(name), LoadWindow)
            load = load_rec.value.usable(phy.shape[0]) if load_rec is not None else None
            if load is None or load.shape[1] <= int(phy.max()):
                load = np.ones((phy.shape[0], int(phy.max()) + 1), dtype=np.float64)
            value = balancedness(
                Placement(phy, layout.slots_per_rank, num_experts=load.shape[1]), load
            )
        self._balance_cache[name] = (layout.generation, clock)
        self.metrics.balancedness.labels(deployment=name).set(value)

    def _forget_layouts(self, keep: set[str]) -> None:
        """Drop the layout gauges of deployments not in `keep` (deleted ones; all of them
        once this replica no longer leads, as only the leader keeps them current)."""
        for name in self._exported - keep:
            self._exported.discard(name)
            self._balance_cache.pop(name, None)
            for gauge in (self.metrics.generation, self.metrics.balancedness):
                with contextlib.suppress(KeyError):
                    gauge.remove(name)
