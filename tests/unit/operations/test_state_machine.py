"""The operation state machine, as a pure function: every path through the phases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eep_controller.operations.state_machine import (
    CommitLayout,
    Observations,
    OperationFinished,
    PhaseFinished,
    RecordEvent,
    ReleaseLock,
    abort,
    advance,
)
from eep_controller.protocol import (
    Ack,
    AckStatus,
    EncodedArray,
    Operation,
    OpKind,
    OpPlan,
    OpState,
    Participant,
    PhaseDeadlines,
    PlanStats,
    ScaleRequest,
)

NODES = ("n1", "n2")
DEADLINES = PhaseDeadlines(preparing_s=10, transferring_s=20, switching_s=5, cleanup_s=5)


def make_op(
    state: OpState = OpState.PLANNED, participants: int = 4, drain: float = 1.0
) -> Operation:
    parts = [
        Participant(
            node_id=NODES[i % 2], device_index=i // 2, old_rank=i if i < 3 else None, new_rank=i
        )
        for i in range(participants)
    ]
    stats = PlanStats(
        copies=1, lower_bound=1, checkpoint_reloads=0, bytes=10, max_rank_bytes_in=10, max_rank_bytes_out=10,
        balancedness_before=0.5, balancedness_after=0.9, rounds=1, est_transfer_s=0.1, makespan_lower_bound_s=0.1,
    )  # fmt: skip
    plan = OpPlan(
        from_dp=3, to_dp=participants, participants=parts, rank_map=[0, 1, 2],
        placement=EncodedArray.encode(np.zeros((1, participants), dtype=np.int64)),
        transfers=EncodedArray.encode(np.zeros((0, 7), dtype=np.int64)), transfer_world="standby", stats=stats,
    )  # fmt: skip
    return Operation(
        id="op-1", deployment="d", kind=OpKind.SCALE_UP, state=state, from_generation=1, to_generation=2,
        request=ScaleRequest(dp_size=participants, drain_timeout_s=drain), plan=plan, created_at=0.0, updated_at=0.0,
    )  # fmt: skip


def acks(
    phase: OpState, n: int, *, failed: dict[int, str] | None = None, **fields: int
) -> dict[OpState, dict[int, Ack]]:
    failed = failed or {}
    return {
        phase: {
            i: Ack(
                op_id="op-1",
                phase=phase,
                participant=i,
                node_id=NODES[i % 2],
                status=AckStatus.FAILED if i in failed else AckStatus.OK,
                reason=failed.get(i),
                started_at=0,
                finished_at=0,
                **fields,
            )
            for i in range(n)
        }
    }


def obs(
    a: dict[OpState, dict[int, Ack]] | None = None, live: tuple[str, ...] = NODES
) -> Observations:
    return Observations(acks=a or {}, live_nodes=frozenset(live), deadlines=DEADLINES)


def test_planned_moves_to_preparing_with_a_deadline() -> None:
    op, effects = advance(make_op(), obs(), now=100.0)
    assert op.state is OpState.PREPARING
    assert op.phase_deadline_at == 110.0
    assert op.history[-1].phase is OpState.PREPARING and op.history[-1].started_at == 100.0
    assert any(isinstance(e, RecordEvent) for e in effects)


def test_phase_waits_until_every_participant_acked() -> None:
    op, _ = advance(make_op(), obs(), 0.0)
    same, effects = advance(op, obs(acks(OpState.PREPARING, 3)), 1.0)
    assert same == op and effects == []


def test_happy_path_reaches_succeeded_with_one_commit_and_lock_release() -> None:
    op, _ = advance(make_op(), obs(), 0.0)
    op, e1 = advance(op, obs(acks(OpState.PREPARING, 4)), 1.0)
    assert op.state is OpState.TRANSFERRING and not any(isinstance(e, CommitLayout) for e in e1)
    op, e2 = advance(op, obs(acks(OpState.TRANSFERRING, 4, bytes_received=100)), 2.0)
    assert op.state is OpState.SWITCHING
    assert sum(isinstance(e, CommitLayout) for e in e2) == 1
    assert op.bytes_moved == 400
    assert op.phase_deadline_at == 2.0 + 5 + 1.0  # switching + drain
    op, e3 = advance(op, obs(acks(OpState.SWITCHING, 4, aborted_requests=0)), 3.0)
    assert op.state is OpState.CLEANUP and not any(isinstance(e, ReleaseLock) for e in e3)
    op, e4 = advance(op, obs(acks(OpState.CLEANUP, 4)), 4.0)
    assert op.state is OpState.SUCCEEDED and op.error is None
    assert sum(isinstance(e, ReleaseLock) for e in e4) == 1
    assert [e for e in e4 if isinstance(e, OperationFinished)] == [
        OperationFinished("scale_up", "succeeded", 400)
    ]
    assert [h.phase for h in op.history] == [
        OpState.PREPARING,
        OpState.TRANSFERRING,
        OpState.SWITCHING,
        OpState.CLEANUP,
    ]
    assert all(h.ended_at is not None for h in op.history)
    assert advance(op, obs(), 5.0) == (op, [])  # terminal is final


@pytest.mark.parametrize("phase", [OpState.PREPARING, OpState.TRANSFERRING])
def test_failed_ack_before_commit_aborts_with_the_reason(phase: OpState) -> None:
    op = make_op(phase).model_copy(update={"phase_deadline_at": 100.0})
    out, effects = advance(
        op, obs(acks(phase, 4, failed={2: "checksum mismatch on layer 0 expert 3"})), 1.0
    )
    assert out.state is OpState.ABORTED
    assert "checksum mismatch" in (out.error or "")
    assert any(isinstance(e, ReleaseLock) for e in effects)
    assert not any(isinstance(e, CommitLayout) for e in effects)


@pytest.mark.parametrize("phase", [OpState.PREPARING, OpState.TRANSFERRING])
def test_missed_deadline_before_commit_aborts_naming_who_is_missing(phase: OpState) -> None:
    op = make_op(phase).model_copy(update={"phase_deadline_at": 10.0})
    out, _ = advance(op, obs(acks(phase, 2)), 10.5)
    assert out.state is OpState.ABORTED
    assert "deadline" in (out.error or "") and "[2, 3]" in (out.error or "")


def test_lost_node_before_commit_aborts() -> None:
    op = make_op(OpState.TRANSFERRING).model_copy(update={"phase_deadline_at": 100.0})
    out, _ = advance(op, obs(live=("n1",)), 1.0)
    assert out.state is OpState.ABORTED and "n2" in (out.error or "")


@pytest.mark.parametrize("phase", [OpState.PLANNED, OpState.PREPARING, OpState.TRANSFERRING])
def test_cancel_is_honoured_before_the_commit_point(phase: OpState) -> None:
    op = make_op(phase).model_copy(update={"cancel_requested": True, "phase_deadline_at": 100.0})
    out, effects = advance(op, obs(), 1.0)
    assert out.state is OpState.ABORTED and "cancel" in (out.error or "")
    assert any(isinstance(e, ReleaseLock) for e in effects)


@pytest.mark.parametrize("phase", [OpState.SWITCHING, OpState.CLEANUP])
def test_after_commit_cancel_and_faults_roll_forward(phase: OpState) -> None:
    op = make_op(phase).model_copy(update={"cancel_requested": True, "phase_deadline_at": 10.0})
    out, effects = advance(
        op, obs(acks(phase, 4, failed={1: "worker crashed"}), live=("n1",)), 11.0
    )
    assert out.state in (OpState.CLEANUP, OpState.SUCCEEDED)
    assert any(isinstance(e, RecordEvent) and e.type == "operation.degraded" for e in effects)
    with pytest.raises(ValueError, match="only ops before SWITCHING"):
        abort(op, 1.0, obs(), "no")


def test_after_commit_lost_participants_are_not_waited_for() -> None:
    op = make_op(OpState.SWITCHING).model_copy(update={"phase_deadline_at": 100.0})
    a = {
        OpState.SWITCHING: {
            i: x for i, x in acks(OpState.SWITCHING, 4)[OpState.SWITCHING].items() if i % 2 == 0
        }
    }
    out, _ = advance(op, obs(a, live=("n1",)), 1.0)  # n2's participants (1, 3) are gone
    assert out.state is OpState.CLEANUP


def test_drain_aborted_requests_are_recorded() -> None:
    op = make_op(OpState.SWITCHING).model_copy(update={"phase_deadline_at": 100.0})
    out, _ = advance(op, obs(acks(OpState.SWITCHING, 4, aborted_requests=2)), 1.0)
    assert out.aborted_requests == 8


def test_phase_durations_are_reported() -> None:
    op, _ = advance(make_op(), obs(), 0.0)
    _, effects = advance(op, obs(acks(OpState.PREPARING, 4)), 2.5)
    assert PhaseFinished(OpState.PREPARING, 2.5) in effects


ack_sets = st.dictionaries(st.integers(0, 3), st.sampled_from(["ok", "failed"]), max_size=4)


@settings(max_examples=200, deadline=None)
@given(
    phases=st.lists(
        st.tuples(ack_sets, st.booleans(), st.floats(0, 50), st.booleans()), min_size=1, max_size=12
    )
)
def test_any_sequence_of_observations_keeps_the_invariants(
    phases: list[tuple[dict[int, str], bool, float, bool]],
) -> None:
    """Whatever agents report: at most one commit, a lock released exactly once at the end,
    no abort after the commit, and time only moves forward."""
    op = make_op()
    now = 0.0
    commits = releases = 0
    committed = False
    for ack_map, lose_node, dt, cancel in phases:
        now += dt
        if cancel:
            op = op.model_copy(update={"cancel_requested": True})
        seen = {
            op.state: {
                i: Ack(
                    op_id="op-1",
                    phase=op.state,
                    participant=i,
                    node_id=NODES[i % 2],
                    status=AckStatus(v),
                    started_at=0,
                    finished_at=0,
                )
                for i, v in ack_map.items()
            }
        }
        before = op.state
        op, effects = advance(op, obs(seen, live=("n1",) if lose_node else NODES), now)
        commits += sum(isinstance(e, CommitLayout) for e in effects)
        releases += sum(isinstance(e, ReleaseLock) for e in effects)
        if before.committed:
            committed = True
        if committed:
            assert op.state is not OpState.ABORTED
        if op.state.terminal:
            assert releases == 1
        else:
            assert releases == 0
    assert commits <= 1
    assert commits == (1 if op.state.committed else 0)
