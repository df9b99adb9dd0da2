"""`python -m bench.recount`: the replica-count neighbourhood search, on shapes small enough
for a unit test (the script itself runs the bench's 58 x 256 shapes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from bench import recount
from bench.headroom import check_layer
from eep_controller.planner import plan_placement, plan_rescale
from eep_controller.planner.packing import count_replicas
from eep_controller.planner.placement import layer_balancedness
from eep_controller.planner.search import CHOOSE_ABOVE


def test_a_neighbour_moves_exactly_one_replica_and_keeps_every_count_legal() -> None:
    rng = np.random.default_rng(3)
    counts = np.array([[3, 1, 1, 2, 1], [1, 1, 1, 1, 4]])
    out = recount.neighbour_counts(counts, 50, 4, rng)
    assert out.shape == (100, 5)
    base = np.repeat(counts, 50, axis=0)
    assert (out.sum(axis=1) == base.sum(axis=1)).all()
    diff = out - base
    assert ((diff == 1).sum(axis=1) == 1).all() and ((diff == -1).sum(axis=1) == 1).all()
    assert out.min() >= 1 and out.max() <= 4
    # the giving expert held two or more replicas
    assert (base[diff == -1] >= 2).all()


def test_a_row_with_no_legal_move_is_left_as_it_is() -> None:
    counts = np.array([[1, 1, 1]])  # nobody holds two replicas
    out = recount.neighbour_counts(counts, 3, 2, np.random.default_rng(0))
    assert (out == 1).all()


def test_merge_neighbours_move_a_fitting_expert_to_the_coldest_or_the_heaviest_replica() -> None:
    # 2 ranks x 3 slots: mean rank load 9.5, so an expert fits alone with the two lightest
    # replicas (0.5 + 1.0) when its load is at most 9.5 / 0.99 - 1.5
    load = np.array([[8.0, 6.0, 3.5, 0.5, 1.0]])
    counts = np.array([[2, 1, 1, 1, 1]])
    out = recount.merge_counts(counts, load, 4, 3)
    assert out.shape == (4, 5)
    # expert 0 (8.0, two replicas) is the only fitting giver: to the coldest single (3), and
    # to the heaviest replica (expert 1, 6.0); the second pair has no giver and repeats
    assert out[0].tolist() == [1, 1, 1, 2, 1]
    assert out[1].tolist() == [1, 2, 1, 1, 1]
    assert (out[2:] == counts).all()
    assert (out.sum(axis=1) == counts.sum()).all()


def test_merge_neighbours_skip_experts_too_heavy_to_stand_alone() -> None:
    load = np.array([[9.8, 6.0, 3.5, 0.5, 0.2]])  # 9.8 + 0.2 + 0.5 > 10 / 0.99
    counts = np.array([[2, 1, 1, 1, 1]])
    assert (recount.merge_counts(counts, load, 2, 3) == counts).all()


def _small_rescale(
    seed: int = 11, old: int = 12, slots: int = 4, experts: int = 24, skew: float = 1.2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A scale-down from `old` ranks to 8 of three Zipf layers: the load, the survivors'
    slots and eep's plan."""
    rng = np.random.default_rng(seed)
    load = np.stack([rng.permutation(1.0 / np.arange(1, experts + 1) ** skew) for _ in range(3)])
    current = plan_placement(load, old, slots)
    plan = plan_rescale(current, load, 8)
    survivors = [r for r in range(old) if plan.rank_map[r] >= 0]
    origin = current.by_rank()[:, survivors]
    return load, origin, plan.placement.by_rank()


@pytest.mark.parametrize(
    ("moves", "shape"),
    [("random", {}), ("merge", {"seed": 4, "slots": 5, "experts": 32, "skew": 1.0})],
)
def test_the_search_never_keeps_a_plan_with_more_copies_or_below_the_goal(
    moves: str, shape: dict[str, Any]
) -> None:
    load, origin, start = _small_rescale(**shape)
    best, history = recount.search(load, origin, start, rounds=4, tries=8, seed=0, moves=moves)
    start_copies = (start != origin).sum(axis=(1, 2))
    best_copies = (best != origin).sum(axis=(1, 2))
    assert (best_copies <= start_copies).all()
    changed = np.flatnonzero(np.any(best != start, axis=(1, 2)))
    assert changed.size > 0  # this shape has a cheaper plan within 4 rounds
    assert (layer_balancedness(best[changed], load[changed]) >= CHOOSE_ABOVE).all()
    assert (best_copies[changed] < start_copies[changed]).all()
    totals = [h["copies"] for h in history]
    assert len(totals) == 4 and totals == sorted(totals, reverse=True)
    assert totals[-1] == int(best_copies.sum())
    # every kept plan keeps the invariants and S slots per rank
    assert best.shape == start.shape
    assert count_replicas(best, load.shape[1]).min() >= 1
    for layer in best:
        check_layer(layer, load.shape[1])


def test_the_search_is_deterministic_for_a_seed() -> None:
    load, origin, start = _small_rescale()
    first, _ = recount.search(load, origin, start, rounds=2, tries=6, seed=5)
    again, _ = recount.search(load, origin, start, rounds=2, tries=6, seed=5)
    assert np.array_equal(first, again)


@pytest.mark.parametrize(
    "argv", [["--rounds", "0"], ["--tries", "0"], ["--moves", "merge", "--tries", "5"]]
)
def test_bad_rounds_or_tries_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        recount.main(argv)
    assert exc.value.code == 2
