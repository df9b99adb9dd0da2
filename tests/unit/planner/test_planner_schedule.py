"""schedule_transfers: every transfer once, per-rank limits held, unique tags."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eep_controller.planner import (
    RescalePlan,
    plan_placement,
    plan_rescale,
    schedule_transfers,
    tensor_tag,
    transfer_tag,
)
from eep_controller.planner.rescale import Transfer
from tests.unit.planner.planner_checks import zipf_load


def _plan(old: int, new: int, failed: tuple[int, ...] = (), seed: int = 0) -> RescalePlan:
    load = zipf_load(3, 24, 1.0, seed)
    return plan_rescale(plan_placement(load, old, 6), load, new, failed_ranks=failed)


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([(4, 6, ()), (6, 4, ()), (6, 5, (2,)), (4, 4, (0,))]),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 100),
)
def test_rounds_hold_every_transfer_once_within_limits(
    case: tuple[int, int, tuple[int, ...]], sends: int, recvs: int, seed: int
) -> None:
    plan = _plan(*case, seed=seed)
    sched = schedule_transfers(plan, 10.0, max_sends_per_rank=sends, max_recvs_per_rank=recvs)
    flat = [t for r in sched.rounds for t in r]
    assert Counter(flat) == Counter(plan.transfers)
    for group in sched.rounds:
        out = Counter(t.src_rank for t in group if t.src_rank >= 0)
        inn = Counter(t.dst_rank for t in group)
        assert max(out.values(), default=0) <= sends
        assert max(inn.values(), default=0) <= recvs
    assert len(set(sched.tags.values())) == len(plan.transfers)
    assert sched.makespan <= 1.15 * sched.makespan_lower_bound + 1e-9


def test_checkpoint_reloads_do_not_use_a_sender_limit() -> None:
    plan = _plan(6, 5, failed=(2,))
    reloads = [t for t in plan.transfers if t.src_rank == -1]
    assert reloads
    sched = schedule_transfers(plan, 1.0)
    per_dst = Counter(t.dst_rank for t in plan.transfers)
    assert len(sched.rounds) == max(
        max(per_dst.values()),
        max(Counter(t.src_rank for t in plan.transfers if t.src_rank >= 0).values(), default=0),
    )


def test_makespan_lower_bound_is_the_busiest_rank_over_the_bandwidth() -> None:
    plan = _plan(4, 6)
    sched = schedule_transfers(plan, 44e6, link_bandwidth=4.4e9)
    per_dst = Counter(t.dst_rank for t in plan.transfers)
    per_src = Counter(t.src_rank for t in plan.transfers if t.src_rank >= 0)
    busiest = max(max(per_dst.values()), max(per_src.values()))
    assert sched.makespan_lower_bound == pytest.approx(busiest * 44e6 / 4.4e9)


def test_tag_of_returns_the_tag_of_each_transfer() -> None:
    plan = _plan(4, 6)
    sched = schedule_transfers(plan, 1.0)
    for t in plan.transfers:
        assert sched.tag_of(t) == transfer_tag(t, 6, 6)


def test_tags_for_realistic_shapes_fit_in_int32_with_three_tensors() -> None:
    last = Transfer(layer=57, expert=255, src_rank=0, dst_rank=319, dst_slot=8)
    assert tensor_tag(transfer_tag(last, 320, 9), 2) < 2**31


def test_tensor_tag_rejects_a_bad_tensor_index() -> None:
    with pytest.raises(ValueError, match="tensor_index"):
        tensor_tag(1, 3)


def test_empty_plan_has_no_rounds() -> None:
    load = zipf_load(2, 8, 1.0)
    plan = plan_rescale(plan_placement(load, 4, 2), load, 4)
    sched = schedule_transfers(plan, 1.0)
    assert sched.rounds == [] and sched.makespan == 0.0


def test_bad_expert_bytes_are_rejected() -> None:
    with pytest.raises(ValueError, match="expert_bytes"):
        schedule_transfers(_plan(4, 6), 0.0)


def test_schedule_is_deterministic() -> None:
    plan = _plan(6, 4)
    a, b = schedule_transfers(plan, 1.0), schedule_transfers(plan, 1.0)
    assert a.rounds == b.rounds and a.tags == b.tags
    assert np.isclose(a.makespan, b.makespan)
