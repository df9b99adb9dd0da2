"""The scale-operation state machine: a pure function from (op, observations, now) to (op, effects).

PLANNED -> PREPARING -> TRANSFERRING -> SWITCHING -> CLEANUP -> SUCCEEDED, or ABORTED from any
phase before SWITCHING. The commit point is the move into SWITCHING: the reconciler writes the
new layout and the op in one transaction. After it the op only rolls forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from eep_controller.protocol import (
    Ack,
    AckStatus,
    Operation,
    OpState,
    PhaseDeadlines,
    PhaseRecord,
)

NEXT_PHASE: dict[OpState, OpState] = {
    OpState.PLANNED: OpState.PREPARING,
    OpState.PREPARING: OpState.TRANSFERRING,
    OpState.TRANSFERRING: OpState.SWITCHING,
    OpState.SWITCHING: OpState.CLEANUP,
    OpState.CLEANUP: OpState.SUCCEEDED,
}


def phase_budget(phase: OpState, deadlines: PhaseDeadlines, drain_timeout_s: float = 0.0) -> float:
    """Seconds a phase may take; SWITCHING also covers the drain of leaving ranks."""
    return {
        OpState.PREPARING: deadlines.preparing_s,
        OpState.TRANSFERRING: deadlines.transferring_s,
        OpState.SWITCHING: deadlines.switching_s + drain_timeout_s,
        OpState.CLEANUP: deadlines.cleanup_s,
    }.get(phase, 0.0)


@dataclass(frozen=True)
class Observations:
    """What the reconciler saw this tick."""

    acks: Mapping[OpState, Mapping[int, Ack]] = field(default_factory=dict)
    live_nodes: frozenset[str] = frozenset()
    deadlines: PhaseDeadlines = field(default_factory=PhaseDeadlines)


# ---------------------------------------------------------------- effects


@dataclass(frozen=True)
class CommitLayout:
    """Write generation ``to_generation`` together with the op (the commit point)."""


@dataclass(frozen=True)
class ReleaseLock:
    pass


@dataclass(frozen=True)
class RecordEvent:
    type: str
    message: str
    data: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class PhaseFinished:
    phase: OpState
    seconds: float


@dataclass(frozen=True)
class OperationFinished:
    kind: str
    result: str
    bytes_moved: int


Effect = CommitLayout | ReleaseLock | RecordEvent | PhaseFinished | OperationFinished


# ---------------------------------------------------------------- helpers


def _enter(op: Operation, phase: OpState, now: float, obs: Observations) -> Operation:
    history = list(op.history)
    if history and history[-1].ended_at is None:
        history[-1] = history[-1].model_copy(update={"ended_at": now})
    budget = phase_budget(phase, obs.deadlines, op.request.drain_timeout_s)
    return op.model_copy(
        update={
            "state": phase,
            "updated_at": now,
            "history": [*history, PhaseRecord(phase=phase, started_at=now)]
            if not phase.terminal
            else history,
            "phase_deadline_at": now + budget if budget else None,
        }
    )


def _phase_seconds(op: Operation, now: float) -> float:
    if op.history and op.history[-1].phase == op.state:
        return max(0.0, now - op.history[-1].started_at)
    return 0.0


def _participant_nodes(op: Operation) -> dict[int, str]:
    assert op.plan is not None
    return {i: p.node_id for i, p in enumerate(op.plan.participants)}


def _finish(
    op: Operation, state: OpState, now: float, obs: Observations, error: str | None
) -> tuple[Operation, list[Effect]]:
    seconds = _phase_seconds(op, now)
    done = _enter(op, state, now, obs).model_copy(
        update={"error": error, "phase_deadline_at": None}
    )
    result = "succeeded" if state is OpState.SUCCEEDED else "aborted"
    effects: list[Effect] = [
        PhaseFinished(op.state, seconds),
        ReleaseLock(),
        OperationFinished(op.kind.value, result, done.bytes_moved),
        RecordEvent(
            f"operation.{result}",
            f"{op.kind.value} {op.id} {result}" + (f": {error}" if error else ""),
            {
                "from_generation": op.from_generation,
                "to_generation": op.to_generation,
                "state": state.value,
            },
        ),
    ]
    return done, effects


def abort(
    op: Operation, now: float, obs: Observations, reason: str
) -> tuple[Operation, list[Effect]]:
    """Abort an op that has not reached its commit point."""
    if op.state.committed or op.state.terminal:
        raise ValueError(
            f"operation {op.id} is {op.state.value}; only ops before SWITCHING can abort"
        )
    return _finish(op, OpState.ABORTED, now, obs, reason)


def _tally(op: Operation, obs: Observations) -> tuple[list[int], list[tuple[int, str]], list[int]]:
    """(acked ok, failed with reason, missing) participants for the current phase."""
    assert op.plan is not None
    acks = obs.acks.get(op.state, {})
    ok, failed, missing = [], [], []
    for i in range(len(op.plan.participants)):
        ack = acks.get(i)
        if ack is None:
            missing.append(i)
        elif ack.status is AckStatus.OK:
            ok.append(i)
        else:
            failed.append((i, ack.reason or "no reason given"))
    return ok, failed, missing


def _sum_acks(op: Operation, obs: Observations, phase: OpState, attr: str) -> int:
    return sum(int(getattr(a, attr)) for a in obs.acks.get(phase, {}).values())


# ---------------------------------------------------------------- the transition function


def advance(op: Operation, obs: Observations, now: float) -> tuple[Operation, list[Effect]]:
    """One step: the op as it should now be stored, and what must happen for that."""
    if op.state.terminal:
        return op, []
    if op.plan is None:
        return abort(op, now, obs, "operation has no plan")

    if op.state is OpState.PLANNED:
        if op.cancel_requested:
            return abort(op, now, obs, "cancelled before it started")
        nxt = _enter(op, OpState.PREPARING, now, obs)
        return nxt, [
            RecordEvent("operation.phase", f"{op.id} entered PREPARING", {"phase": "PREPARING"})
        ]

    nodes = _participant_nodes(op)
    lost = sorted({n for n in nodes.values() if n not in obs.live_nodes})
    ok, failed, missing = _tally(op, obs)
    seconds = _phase_seconds(op, now)
    overdue = op.phase_deadline_at is not None and now > op.phase_deadline_at

    if not op.state.committed:  # PREPARING or TRANSFERRING: any fault aborts, g stays
        if op.cancel_requested:
            return abort(op, now, obs, f"cancelled during {op.state.value}")
        if lost:
            return abort(op, now, obs, f"node(s) {', '.join(lost)} lost during {op.state.value}")
        if failed:
            detail = "; ".join(f"participant {i} ({nodes[i]}): {why}" for i, why in failed[:5])
            return abort(op, now, obs, f"{op.state.value} failed: {detail}")
        if missing and overdue:
            return abort(
                op, now, obs,
                f"{op.state.value} missed its deadline: {len(ok)}/{len(nodes)} acked; "
                f"waiting on participants {missing[:10]}",
            )  # fmt: skip
        if missing:
            return op, []
        effects: list[Effect] = [PhaseFinished(op.state, seconds)]
        if op.state is OpState.PREPARING:
            nxt = _enter(op, OpState.TRANSFERRING, now, obs)
            effects.append(
                RecordEvent(
                    "operation.phase", f"{op.id} entered TRANSFERRING", {"phase": "TRANSFERRING"}
                )
            )
            return nxt, effects
        moved = _sum_acks(op, obs, OpState.TRANSFERRING, "bytes_received")
        nxt = _enter(op, OpState.SWITCHING, now, obs).model_copy(update={"bytes_moved": moved})
        effects += [
            CommitLayout(),
            RecordEvent(
                "operation.committed",
                f"{op.id} committed generation {op.to_generation}",
                {"phase": "SWITCHING", "generation": op.to_generation, "bytes_moved": moved},
            ),
        ]
        return nxt, effects

    # SWITCHING or CLEANUP: after the commit point we roll forward, never back.
    unreachable = [i for i in missing if nodes[i] in lost]
    waiting = [i for i in missing if nodes[i] not in lost]
    if waiting and not overdue:
        return op, []
    effects = [PhaseFinished(op.state, seconds)]
    notes = []
    if failed:
        notes.append("failed: " + "; ".join(f"participant {i}: {why}" for i, why in failed[:5]))
    if unreachable:
        notes.append(f"participants {unreachable} unreachable (node lost)")
    if waiting:
        notes.append(f"participants {waiting} did not ack before the deadline")
    if notes:
        effects.append(
            RecordEvent(
                "operation.degraded",
                f"{op.id} {op.state.value} rolled forward: " + ", ".join(notes),
                {"phase": op.state.value},
            )
        )
    if op.state is OpState.SWITCHING:
        aborted = _sum_acks(op, obs, OpState.SWITCHING, "aborted_requests")
        nxt = _enter(op, OpState.CLEANUP, now, obs).model_copy(update={"aborted_requests": aborted})
        effects.append(
            RecordEvent("operation.phase", f"{op.id} entered CLEANUP", {"phase": "CLEANUP"})
        )
        return nxt, effects
    done, finish = _finish(op, OpState.SUCCEEDED, now, obs, None)
    return done, [e for e in finish if not isinstance(e, PhaseFinished)] + effects
