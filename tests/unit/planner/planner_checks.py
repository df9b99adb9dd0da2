"""Invariant checks and load generators shared by the planner tests."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from eep_controller.planner import Placement, RescalePlan, apply_transfers


def zipf_load(layers: int, experts: int, s: float, seed: int = 0) -> npt.NDArray[np.float64]:
    """Zipf(s) expert load with a random expert order per layer."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, experts + 1) ** s
    return np.stack([rng.permutation(base) for _ in range(layers)]) * 1000.0


def assert_valid_placement(p: Placement, num_experts: int, num_ranks: int, slots: int) -> None:
    """Every expert >= 1 replica per layer, distinct per rank, count <= ranks, S slots each."""
    assert p.num_ranks == num_ranks
    assert p.slots_per_rank == slots
    assert p.phy2log.shape[1] == num_ranks * slots
    assert p.phy2log.min() >= 0 and p.phy2log.max() < num_experts
    counts = p.replica_counts()
    assert counts.shape[1] == num_experts
    assert counts.min() >= 1
    assert counts.max() <= num_ranks
    by_rank = np.sort(p.by_rank(), axis=2)
    assert not np.any(by_rank[:, :, 1:] == by_rank[:, :, :-1])


def assert_valid_plan(current: Placement, plan: RescalePlan, failed: tuple[int, ...]) -> None:
    """Transfers come from live holders, write each slot once, skip unchanged slots, and
    rebuild the new placement exactly."""
    old = current.by_rank()
    new = plan.placement.by_rank()
    survivors = np.flatnonzero(plan.rank_map >= 0)
    seen: set[tuple[int, int, int]] = set()
    for t in plan.transfers:
        key = (t.layer, t.dst_rank, t.dst_slot)
        assert key not in seen
        seen.add(key)
        assert 0 <= t.dst_slot < current.slots_per_rank
        assert new[t.layer, t.dst_rank, t.dst_slot] == t.expert
        live = [r for r in range(current.num_ranks) if r not in failed]
        holders = [r for r in live if t.expert in old[t.layer, r]]
        if t.src_rank == -1:
            assert not holders
        else:
            assert t.src_rank in holders
    for r in survivors:
        nr = plan.rank_map[r]
        same = old[:, r] == new[:, nr]
        for lay, slot in zip(*np.nonzero(same), strict=True):
            assert (int(lay), int(nr), int(slot)) not in seen
    assert np.array_equal(apply_transfers(current, plan), plan.placement.phy2log)
