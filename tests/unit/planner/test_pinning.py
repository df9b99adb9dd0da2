"""Experts that stay on a rank stay in their slot: no copy from a rank to itself."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from eep_controller.planner import apply_transfers, plan_placement, plan_rescale
from eep_controller.planner.pinning import pin_staying_experts
from tests.unit.planner.planner_checks import repeat_on_rank_zero


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    old_r=st.integers(2, 6),
    new_r=st.integers(2, 7),
    fail=st.booleans(),
    repeat=st.booleans(),
)
def test_pinned_plan_moves_nothing_a_rank_already_holds(
    seed: int, old_r: int, new_r: int, fail: bool, repeat: bool
) -> None:
    rng = np.random.default_rng(seed)
    layers, experts, slots = 3, 12, 6
    current = plan_placement(rng.lognormal(0, 1, (layers, experts)), old_r, slots)
    if repeat:
        current = repeat_on_rank_zero(current)  # a current rank may hold an expert twice
    failed = (int(rng.integers(old_r)),) if fail and new_r < old_r else ()
    plan = plan_rescale(current, rng.lognormal(0, 1, (layers, experts)), new_r, failed_ranks=failed)
    pinned = pin_staying_experts(current, plan)

    assert np.array_equal(apply_transfers(current, pinned), pinned.placement.phy2log)
    assert len(pinned.transfers) <= len(plan.transfers)
    assert pinned.stats["copies"] == len(pinned.transfers)
    old = current.by_rank()
    for t in pinned.transfers:
        survivors = np.flatnonzero(plan.rank_map == t.dst_rank)
        if survivors.size:
            assert t.expert not in old[t.layer, survivors[0]]  # never brought to a rank that had it
    # same experts per rank as the planner chose, so the same balance
    a = np.sort(plan.placement.by_rank(), axis=2)
    b = np.sort(pinned.placement.by_rank(), axis=2)
    assert np.array_equal(a, b)
    assert len({(t.layer, t.dst_rank, t.dst_slot) for t in pinned.transfers}) == len(
        pinned.transfers
    )
    assert pinned.placement.replica_counts().min() >= 1
