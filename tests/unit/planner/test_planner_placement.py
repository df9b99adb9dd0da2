"""plan_placement and balancedness: a valid, balanced, deterministic placement."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import eplb_baseline
from eep_controller.planner import Placement, balancedness, plan_placement
from tests.unit.planner.planner_checks import assert_valid_placement, zipf_load


@st.composite
def shapes_and_loads(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(1, 24))
    ranks = draw(st.integers(1, 8))
    low = max(1, -(-experts // ranks))
    slots = draw(st.integers(low, max(low, min(experts, low + 3))))
    kind = draw(st.sampled_from(["uniform", "zipf", "zero", "spiky", "random"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        load = np.ones((layers, experts))
    elif kind == "zipf":
        load = zipf_load(layers, experts, draw(st.floats(0.0, 3.0)), seed)
    elif kind == "zero":
        load = np.zeros((layers, experts))
    elif kind == "spiky":
        load = np.zeros((layers, experts))
        load[:, rng.integers(experts)] = 1e12
    else:
        load = rng.integers(0, 5, (layers, experts)).astype(float)
    return load, ranks, slots


@settings(max_examples=60, deadline=None)
@given(shapes_and_loads())
def test_placement_is_valid_for_any_shape_and_load(case: tuple[np.ndarray, int, int]) -> None:
    load, ranks, slots = case
    p = plan_placement(load, ranks, slots)
    assert_valid_placement(p, load.shape[1], ranks, slots)
    assert 0.0 <= balancedness(p, load) <= 1.0 + 1e-12


@settings(max_examples=15, deadline=None)
@given(shapes_and_loads())
def test_placement_is_deterministic(case: tuple[np.ndarray, int, int]) -> None:
    load, ranks, slots = case
    assert plan_placement(load, ranks, slots) == plan_placement(load, ranks, slots)


@pytest.mark.parametrize(("ranks", "slots"), [(1, 4), (4, 1), (2, 2), (3, 4)])
def test_edge_shapes_are_handled(ranks: int, slots: int) -> None:
    experts = min(ranks * slots, 4)
    load = zipf_load(2, experts, 1.0)
    assert_valid_placement(plan_placement(load, ranks, slots), experts, ranks, slots)


def test_one_expert_fills_every_rank_once() -> None:
    p = plan_placement(np.ones((2, 1)), 5, 1)
    assert p.replica_counts().tolist() == [[5], [5]]


def test_no_spare_replica_capacity_is_handled() -> None:
    # 2 experts on 2 ranks x 2 slots: every expert must sit on every rank
    p = plan_placement(np.array([[100.0, 1.0]]), 2, 2)
    assert p.replica_counts().tolist() == [[2, 2]]


def test_more_slots_than_experts_is_rejected() -> None:
    with pytest.raises(ValueError, match="distinct"):
        plan_placement(np.ones((1, 1)), 1, 2)


def test_zipf_load_is_balanced_well() -> None:
    load = zipf_load(4, 64, 1.0, seed=1)
    assert balancedness(plan_placement(load, 8, 9), load) > 0.99


def test_hierarchical_placement_keeps_each_group_on_one_node() -> None:
    load = zipf_load(3, 32, 1.0, seed=2)
    p = plan_placement(load, 8, 6, num_nodes=2, num_groups=4)
    assert_valid_placement(p, 32, 8, 6)
    node_of_rank = np.arange(8) // 4
    for layer in p.by_rank():
        group_nodes: dict[int, set[int]] = {}
        for rank, experts in enumerate(layer):
            for e in experts:
                group_nodes.setdefault(int(e) // 8, set()).add(int(node_of_rank[rank]))
        assert all(len(nodes) == 1 for nodes in group_nodes.values())


def test_hierarchy_that_cannot_fill_a_rank_from_its_node_plans_globally() -> None:
    """2 groups of 2 experts on 2 nodes of one 3-slot rank each: a node's 2 experts cannot
    fill its rank with distinct ones, so the placement is global (it used to raise)."""
    load = np.array([[0.0, 0.0, 0.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    p = plan_placement(load, 2, 3, num_nodes=2, num_groups=2)
    assert_valid_placement(p, 4, 2, 3)


def test_balancedness_splits_an_expert_load_over_its_replicas() -> None:
    # rank 0 holds expert 0 (load 4, 2 replicas -> 2) and rank 1 holds expert 0 and 1 (2+2)
    p = Placement(np.array([[0, 2, 0, 1]]), 2)
    load = np.array([[4.0, 2.0, 0.0]])
    assert balancedness(p, load) == pytest.approx(3.0 / 4.0)


def test_balancedness_of_a_layer_without_load_is_one() -> None:
    p = Placement(np.array([[0, 1]]), 1)
    assert balancedness(p, np.zeros((1, 2))) == 1.0


def test_placement_reports_its_shape() -> None:
    p = Placement(np.array([[0, 1, 2, 0], [2, 1, 0, 1]]), 2, num_experts=4)
    assert (p.num_layers, p.num_ranks, p.num_experts) == (2, 2, 4)
    assert p.replica_counts().tolist() == [[2, 1, 1, 0], [1, 2, 1, 0]]


@settings(max_examples=25, deadline=None)
@given(
    ranks=st.integers(2, 6),
    slots=st.integers(32, 40),
    skew=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_many_slots_per_rank_stay_valid(ranks: int, slots: int, skew: float, seed: int) -> None:
    """With >= 32 slots per rank the finer replica split is tried too; plans stay valid."""
    experts = min(ranks * slots, 64)
    load = zipf_load(2, experts, skew, seed)
    placement = plan_placement(load, ranks, slots)
    assert_valid_placement(placement, experts, ranks, slots)


def test_finer_split_beats_the_greedy_when_it_fills_every_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Zipf 1.2 on 8 ranks x 36 slots: the greedy puts the hottest experts on every rank and
    would add more; the finer split (hot experts to half a rank's share, the rest to cold
    ones) balances better, and the planner keeps it."""
    from eep_controller.planner import placement as placement_module

    load = zipf_load(4, 256, 1.2, 7)
    finer = balancedness(plan_placement(load, 8, 36), load)
    monkeypatch.setattr(placement_module, "FINE_SLOTS", 10**6)
    greedy_only = balancedness(plan_placement(load, 8, 36), load)
    assert finer > greedy_only
    assert finer >= 0.99999


def test_few_spare_slots_under_heavy_skew_balance_at_least_as_well_as_plain_lpt() -> None:
    # 48 ranks x 6 slots under Zipf 1.5: 32 spare slots for 256 experts. Dealing replicas in
    # rounds (one per rank per round) plus swaps reached 0.9425 where the published greedy's
    # plain LPT reaches 0.953; layers the search leaves short now try LPT too
    load = zipf_load(4, 256, 1.5, seed=5)
    placed = plan_placement(load, 48, 6)
    assert_valid_placement(placed, 256, 48, 6)
    reference = eplb_baseline.plan(load, 48, 6)
    assert balancedness(placed, load) >= eplb_baseline.balancedness(reference, load) - 1e-12
