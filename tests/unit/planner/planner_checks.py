"""Invariant checks and load generators shared by the planner tests."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from eep_controller.planner import (
    Placement,
    RescalePlan,
    apply_transfers,
    choose_removed_ranks,
    plan_placement,
)


def zipf_load(layers: int, experts: int, s: float, seed: int = 0) -> npt.NDArray[np.float64]:
    """Zipf(s) expert load with a random expert order per layer."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, experts + 1) ** s
    return np.stack([rng.permutation(base) for _ in range(layers)]) * 1000.0


def skewed_shrink(layers: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """A Zipf 1.5 load [layers, 64] and the survivors [layers, 8, 10] of a 12-rank placement
    once the 4 ranks cheapest to remove leave: a shrink whose sticky plan balances badly."""
    load = zipf_load(layers, 64, 1.5, seed=5)
    current = plan_placement(load, 12, 10)
    survivors = [r for r in range(12) if r not in choose_removed_ranks(current, load, 4)]
    return load, current.by_rank()[:, survivors].copy()


def repeat_on_rank_zero(current: Placement) -> Placement:
    """`current` with rank 0 of every layer holding its first expert twice (another EPLB can
    place experts so): the first later slot whose expert has another replica takes it, so
    no expert is lost."""
    phy = current.by_rank().copy()
    counts = current.replica_counts()
    for layer in range(phy.shape[0]):
        for slot in range(1, phy.shape[2]):
            if counts[layer, phy[layer, 0, slot]] >= 2:
                phy[layer, 0, slot] = phy[layer, 0, 0]
                break
    return Placement(
        phy.reshape(phy.shape[0], -1), current.slots_per_rank, num_experts=current.num_experts
    )


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


def distinct_per_rank(phy: npt.NDArray[np.int64]) -> bool:
    """No rank of a batched placement [B, R, S] holds one expert twice."""
    ordered = np.sort(phy, axis=2)
    return not bool(np.any(ordered[:, :, 1:] == ordered[:, :, :-1]))
