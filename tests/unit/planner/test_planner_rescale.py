"""plan_rescale: valid, sticky, reproducible plans for scale-up, scale-down and failure."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eep_controller.planner import (
    Placement,
    RescalePlan,
    balancedness,
    choose_removed_ranks,
    copy_lower_bound,
    plan_placement,
    plan_rescale,
)
from eep_controller.planner.fallback import fallback
from eep_controller.planner.placement import layer_balancedness
from tests.unit.planner.planner_checks import (
    assert_valid_placement,
    assert_valid_plan,
    repeat_on_rank_zero,
    skewed_shrink,
    zipf_load,
)


@st.composite
def rescale_cases(draw: st.DrawFn) -> dict[str, object]:
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(1, 20))
    slots = draw(st.integers(1, min(5, experts)))
    min_ranks = max(1, -(-experts // slots))
    old = draw(st.integers(min_ranks, min_ranks + 5))
    seed = draw(st.integers(0, 2**16))
    skew = draw(st.sampled_from([0.0, 1.0, 2.5]))
    load = zipf_load(layers, experts, skew, seed)
    if draw(st.booleans()):
        load[:, : experts // 2] = 0.0
    failed = draw(st.lists(st.integers(0, old - 1), max_size=2, unique=True))
    alive = old - len(failed)
    new = draw(st.integers(max(min_ranks, 1), min_ranks + 6))
    removed: list[int] | None = None
    if alive < 1:
        failed = []
        alive = old
    if new < alive and draw(st.booleans()):
        pool = [r for r in range(old) if r not in failed]
        removed = draw(st.permutations(pool))[: alive - new]
    new_load = load * np.random.default_rng(seed + 1).lognormal(0, 0.3, load.shape)
    return {
        "current": plan_placement(load, old, slots),
        "load": new_load,
        "new": new,
        "removed": removed,
        "failed": tuple(failed),
    }


@settings(max_examples=60, deadline=None)
@given(rescale_cases())
def test_rescale_plan_satisfies_every_invariant(case: dict[str, object]) -> None:
    current = case["current"]
    assert isinstance(current, Placement)
    failed = case["failed"]
    assert isinstance(failed, tuple)
    new = case["new"]
    assert isinstance(new, int)
    plan = plan_rescale(
        current,
        case["load"],  # type: ignore[arg-type]
        new,
        removed_ranks=case["removed"],  # type: ignore[arg-type]
        failed_ranks=failed,
    )
    assert_valid_placement(plan.placement, current.num_experts, new, current.slots_per_rank)
    assert_valid_plan(current, plan, failed)
    assert plan.stats["copies"] == len(plan.transfers)
    assert plan.stats["copies"] >= plan.stats["lower_bound"]


@settings(max_examples=10, deadline=None)
@given(rescale_cases())
def test_rescale_is_deterministic(case: dict[str, object]) -> None:
    args = (case["current"], case["load"], case["new"])
    kw = {"removed_ranks": case["removed"], "failed_ranks": case["failed"]}
    a = plan_rescale(*args, **kw)  # type: ignore[arg-type]
    b = plan_rescale(*args, **kw)  # type: ignore[arg-type]
    assert a.placement == b.placement
    assert a.transfers == b.transfers
    assert np.array_equal(a.rank_map, b.rank_map)


def test_scale_up_keeps_old_ranks_and_appends_new_ones() -> None:
    load = zipf_load(2, 16, 1.0)
    plan = plan_rescale(plan_placement(load, 4, 5), load, 6)
    assert plan.rank_map.tolist() == [0, 1, 2, 3]
    assert plan.placement.num_ranks == 6


def test_scale_up_writes_every_slot_of_a_new_rank() -> None:
    load = zipf_load(2, 16, 1.0)
    plan = plan_rescale(plan_placement(load, 4, 5), load, 6)
    written = {(t.layer, t.dst_rank, t.dst_slot) for t in plan.transfers}
    assert all((lay, r, s) in written for lay in range(2) for r in (4, 5) for s in range(5))


def test_scale_down_renumbers_survivors_compactly_in_order() -> None:
    load = zipf_load(2, 16, 1.0)
    plan = plan_rescale(plan_placement(load, 6, 5), load, 4, removed_ranks=[1, 3])
    assert plan.rank_map.tolist() == [0, -1, 1, -1, 2, 3]


def test_scale_down_chooses_the_ranks_to_remove_when_not_given() -> None:
    load = zipf_load(2, 16, 1.0)
    current = plan_placement(load, 6, 5)
    plan = plan_rescale(current, load, 4)
    chosen = choose_removed_ranks(current, load, 2)
    assert [r for r in range(6) if plan.rank_map[r] < 0] == list(chosen)


def test_failed_rank_never_sends_and_orphans_reload_from_checkpoint() -> None:
    load = zipf_load(3, 24, 1.0)
    current = plan_placement(load, 8, 4)
    plan = plan_rescale(current, load, 7, failed_ranks=(3,))
    assert all(t.src_rank != 3 for t in plan.transfers)
    assert plan.stats["checkpoint_reloads"] == sum(t.src_rank == -1 for t in plan.transfers)
    assert plan.stats["checkpoint_reloads"] > 0


def test_failed_rank_can_be_replaced_by_a_fresh_one() -> None:
    load = zipf_load(2, 16, 1.0)
    current = plan_placement(load, 4, 5)
    plan = plan_rescale(current, load, 4, failed_ranks=(1,))
    assert plan.rank_map.tolist() == [0, -1, 1, 2]
    assert_valid_plan(current, plan, (1,))


def test_rebalance_on_unchanged_load_moves_nothing() -> None:
    load = zipf_load(3, 32, 1.0)
    current = plan_placement(load, 8, 5)
    plan = plan_rescale(current, load, 8)
    assert plan.transfers == []


def test_rebalance_after_drift_improves_balance_with_few_copies() -> None:
    load = zipf_load(4, 64, 1.0)
    current = plan_placement(load, 8, 9)
    drifted = load * np.random.default_rng(3).lognormal(0, 0.3, load.shape)
    plan = plan_rescale(current, drifted, 8)
    assert plan.stats["balancedness_after"] >= balancedness(current, drifted)
    assert plan.stats["copies"] < 4 * 8 * 9 / 2


def test_scale_up_copies_stay_close_to_the_lower_bound() -> None:
    load = zipf_load(4, 64, 1.0)
    current = plan_placement(load, 8, 9)
    plan = plan_rescale(current, load, 12)
    assert plan.stats["lower_bound"] == 4 * 4 * 9
    assert plan.stats["copies"] <= 1.5 * plan.stats["lower_bound"]
    assert plan.stats["balancedness_after"] > 0.98


def test_lower_bound_counts_new_slots_and_orphans() -> None:
    # two ranks, one slot each, experts 0 and 1; losing rank 1 orphans expert 1 per layer
    current = Placement(np.array([[0, 1], [1, 0]]), 1)
    assert copy_lower_bound(current, 3, (), ()) == 2  # one new slot in each layer
    assert copy_lower_bound(current, 2, (), (1,)) == 2  # one orphan per layer, one new slot
    assert copy_lower_bound(current, 2, (), ()) == 0


def test_skewed_rescales_balance_well_with_bounded_copies() -> None:
    # Zipf 1.5: the sticky plan alone cannot balance these; the replica-count search must
    load = zipf_load(4, 64, 1.5, seed=1)
    for old, new, slots, failed in [(8, 12, 9, ()), (12, 8, 9, ()), (9, 8, 10, (3,))]:
        current = plan_placement(load, old, slots)
        plan = plan_rescale(current, load, new, failed_ranks=failed)
        assert_valid_plan(current, plan, failed)
        assert plan.stats["balancedness_after"] >= 0.99
        assert plan.stats["copies"] <= 2.5 * plan.stats["lower_bound"]


def test_skewed_rescale_is_deterministic() -> None:
    load = zipf_load(3, 48, 1.5, seed=4)
    current = plan_placement(load, 12, 5)
    a = plan_rescale(current, load, 10)
    b = plan_rescale(current, load, 10)
    assert a.placement == b.placement
    assert a.transfers == b.transfers


def test_retargeted_keeps_wanted_survivors_and_places_only_the_deltas() -> None:
    from eep_controller.planner.packing import count_replicas
    from eep_controller.planner.starts import retargeted_plan

    # one layer, 3 ranks x 2 slots; expert 0 held 3 times, target wants it once
    phy = np.array([[[0, 1], [0, 2], [0, 3]]])
    weight = np.array([[1.0, 4.0, 4.0, 4.0]])
    counts = np.array([[1, 2, 2, 1]])
    out = retargeted_plan(phy, weight, counts)
    assert count_replicas(out, 4).tolist() == counts.tolist()
    assert int((out != phy).sum()) == 2  # only the two surplus copies of expert 0 change


def test_drop_surplus_frees_exactly_the_surplus_on_the_hottest_ranks() -> None:
    from eep_controller.planner.packing import count_replicas
    from eep_controller.planner.starts import _drop_surplus

    # expert 0 held 3 times, wanted once: the two hottest holders (ranks 1 and 2) free it
    phy = np.array([[[0, 1], [0, 2], [0, 3]], [[0, 1], [0, 2], [0, 3]]])
    weight = np.array([[3.0, 1.0, 2.0, 3.0], [3.0, 1.0, 2.0, 3.0]])
    counts = np.array([[1, 1, 1, 1], [2, 1, 1, 1]])
    _drop_surplus(phy, weight, counts)
    assert phy[0].tolist() == [[0, 1], [-1, 2], [-1, 3]]
    assert phy[1].tolist() == [[0, 1], [0, 2], [-1, 3]]
    assert np.all(count_replicas(phy, 4) == counts)


@pytest.mark.parametrize(
    ("layers", "experts", "skew", "seed", "old", "new"),
    [
        # a mild skew: the finishing refinement takes the sticky plan past 0.99
        (6, 64, 1.2, 3, 8, 12),
        # Zipf 1.5 from 48 to 64 ranks: the refinement on the three lightest ranks stalls
        # just below 0.99 (no single move onto them lowers the hottest rank); the finishing
        # one, which looks at more of them, gets past it
        (2, 256, 1.5, 0, 48, 64),
    ],
)
def test_scale_up_finishes_the_sticky_plan_near_the_bound(
    layers: int, experts: int, skew: float, seed: int, old: int, new: int
) -> None:
    load = zipf_load(layers, experts, skew, seed)
    current = plan_placement(load, old, 9)
    plan = plan_rescale(current, load, new)
    assert_valid_plan(current, plan, ())
    assert plan.stats["balancedness_after"] >= 0.99
    assert plan.stats["copies"] <= 1.3 * plan.stats["lower_bound"]


@settings(max_examples=15, deadline=None)
@given(
    slots=st.integers(17, 40),
    old=st.integers(2, 4),
    new=st.integers(2, 5),
    skew=st.sampled_from([0.0, 1.0, 1.5]),
    seed=st.integers(0, 2**16),
    fail=st.booleans(),
)
def test_many_slots_per_rank_rescale_is_valid(
    slots: int, old: int, new: int, skew: float, seed: int, fail: bool
) -> None:
    """Above 16 slots per rank the refinement looks at the hottest rank's heaviest slots
    only and the placement may use the finer split; every invariant still holds."""
    experts = min(old, new) * slots - 3
    current = plan_placement(zipf_load(2, experts, skew, seed), old, slots)
    load = zipf_load(2, experts, skew, seed + 1)
    failed = (0,) if fail and old > 1 and new >= old - 1 else ()
    plan = plan_rescale(current, load, new, failed_ranks=failed)
    assert_valid_placement(plan.placement, experts, new, slots)
    assert_valid_plan(current, plan, failed)
    assert plan.stats["copies"] >= plan.stats["lower_bound"]


def test_rescue_refines_every_option_for_a_layer_the_search_left_short() -> None:
    from eep_controller.planner.placement import layer_balancedness
    from eep_controller.planner.search import (
        CHOOSE_ABOVE,
        RESCUE_BELOW,
        _rescue,
        _retarget_options,
    )
    from eep_controller.planner.starts import sticky_plan

    # a skewed shrink: the sticky plan alone (no refinement) balances far below the bar
    load, origin = skewed_shrink(2)
    best = sticky_plan(origin, load, 8 * 10)
    assert np.all(layer_balancedness(best, load) < RESCUE_BELOW)
    weak = np.arange(2)
    plans, kind, row = _retarget_options(origin, load)
    _rescue(best, load, origin, weak, plans, kind, row, np.ones(2, dtype=bool))
    assert np.all(layer_balancedness(best, load) >= CHOOSE_ABOVE)
    # still a placement with 8 slots per rank and every expert present
    assert best.shape == origin.shape
    for layer in range(2):
        assert set(best[layer].ravel().tolist()) == set(range(64))


def test_failure_on_few_ranks_with_many_slots_each() -> None:
    """Found by the property test above: 2 ranks x 39 slots, rank 0 fails, 4 ranks after.
    Most experts need a replica on every rank, and the sticky fill left duplicates that no
    single swap could separate."""
    experts = 2 * 39 - 3
    current = plan_placement(zipf_load(2, experts, 1.5, 178), 2, 39)
    plan = plan_rescale(current, zipf_load(2, experts, 1.5, 179), 4, failed_ranks=(0,))
    assert_valid_placement(plan.placement, experts, 4, 39)
    assert_valid_plan(current, plan, (0,))


def test_screening_refines_in_full_only_options_that_could_still_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from eep_controller.planner import search
    from eep_controller.planner.placement import layer_balancedness
    from eep_controller.planner.search import _retarget_options, _screen

    # a short screening, so the screened options stop below the full refinement's goal
    monkeypatch.setattr(search, "SCREEN_FIRST", 2)
    monkeypatch.setattr(search, "SCREEN_STAGES", ((2, 2),))
    load, origin = skewed_shrink(2)
    plans, kind, row = _retarget_options(origin, load)
    partners = np.ones(2, dtype=bool)
    big = np.iinfo(np.int64).max
    # the current plan of each layer trails every option (refine in full) or beats it on
    # both balance and copies (the screened option cannot win: not refined further)
    trails = (np.full(2, -np.inf), np.full(2, big))
    beats = (np.full(2, 1.0), np.zeros(2, dtype=np.int64))
    full = _screen(plans, load, origin, kind, row, partners, trails)
    cut = _screen(plans, load, origin, kind, row, partners, beats)
    assert np.all(layer_balancedness(full, load) > layer_balancedness(cut, load))
    # per layer: layer 0 trails, layer 1 beats
    mixed = _screen(
        plans, load, origin, kind, row, partners, (np.array([-np.inf, 1.0]), np.array([big, 0]))
    )
    assert np.array_equal(mixed[0], full[0])
    assert np.array_equal(mixed[1], cut[1])


@pytest.mark.parametrize(
    ("experts", "slots", "old", "new", "skew", "seed"),
    [
        (10, 3, 7, 9, 1.0, 458),  # the fresh plan's relabelling raised a numpy ValueError
        (14, 3, 8, 10, 3.0, 753),  # ... or silently dropped an expert
        (15, 4, 6, 5, 2.0, 205),
    ],
)
def test_current_placement_repeating_an_expert_on_a_rank_gives_a_valid_plan(
    experts: int, slots: int, old: int, new: int, skew: float, seed: int
) -> None:
    """A Placement may hold an expert twice on one rank (another EPLB can make one). The
    re-planned layers of such a layer are relabelled to keep experts in place: the repeated
    slot must count once, or an expert of the fresh plan has no slot left."""
    load = zipf_load(2, experts, skew, seed)
    current = repeat_on_rank_zero(plan_placement(load, old, slots))
    assert np.any(
        np.sort(current.by_rank()[:, 0], axis=1)[:, 1:]
        == np.sort(current.by_rank()[:, 0], axis=1)[:, :-1]
    )
    plan = plan_rescale(current, load, new)
    assert_valid_placement(plan.placement, experts, new, slots)
    assert_valid_plan(current, plan, ())


@settings(max_examples=40, deadline=None)
@given(
    experts=st.integers(4, 16),
    slots=st.integers(2, 4),
    extra=st.integers(0, 3),
    grow=st.integers(-2, 3),
    skew=st.sampled_from([1.0, 2.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_any_current_placement_with_a_repeat_gives_a_valid_plan(
    experts: int, slots: int, extra: int, grow: int, skew: float, seed: int
) -> None:
    least = -(-experts // slots)
    old = least + extra
    load = zipf_load(2, experts, skew, seed)
    current = repeat_on_rank_zero(plan_placement(load, old, slots))
    new = max(least, old + grow)
    plan = plan_rescale(current, load, new)
    assert_valid_placement(plan.placement, experts, new, slots)
    assert_valid_plan(current, plan, ())


def test_failed_ranks_replaced_by_fewer_new_ones_fill_every_slot() -> None:
    """Two failed ranks and one new one: layers that orphan more than a rank's slots must
    drop replicas, the others have slots to spare. The hot-first start plan dropped only
    in the first kind and left the spare slots of the second empty."""
    from eep_controller.planner.packing import count_replicas
    from eep_controller.planner.starts import sticky_hot_plan, sticky_plan

    load = zipf_load(4, 12, 1.0, seed=0)
    current = plan_placement(load, 6, 3).by_rank()
    origin = np.full((4, 5, 3), -1)
    origin[:, :4] = current[:, [1, 2, 4, 5]]  # ranks 0 and 3 failed; one rank appended
    need = np.maximum(count_replicas(origin, 12), 1).sum(axis=1) - 5 * 3
    assert need.max() > 0 and need.min() < 0  # both kinds of layer in one batch
    hot = sticky_hot_plan(origin, load, 5 * 3)
    assert hot is not None and hot.min() >= 0
    assert np.all(count_replicas(hot, 12) >= 1)
    spare = need < 0
    assert np.array_equal(hot[spare], sticky_plan(origin, load, 5 * 3)[spare])


@settings(max_examples=80, deadline=None)
@given(
    layers=st.integers(1, 3),
    experts=st.integers(1, 12),
    slots=st.integers(1, 4),
    old=st.integers(1, 6),
    grow=st.integers(0, 5),
    skew=st.sampled_from([1, 3, 8]),
    failed=st.lists(st.integers(0, 5), max_size=2, unique=True),
    seed=st.integers(0, 2**16),
)
def test_any_current_placement_gives_a_valid_plan(
    layers: int,
    experts: int,
    slots: int,
    old: int,
    grow: int,
    skew: int,
    failed: list[int],
    seed: int,
) -> None:
    """Any Placement the API accepts, including ranks that repeat an expert and experts
    with no replica at all, is re-planned into a valid placement."""
    rng = np.random.default_rng(seed)
    slots = min(slots, experts)  # a rank holds distinct experts
    current = Placement(rng.integers(0, experts, (layers, old * slots)), slots, num_experts=experts)
    load = rng.random((layers, experts)) ** skew
    gone = tuple(r for r in failed if r < old)[: old - 1]  # one rank survives at least
    new = -(-experts // slots) + grow
    plan = plan_rescale(current, load, new, failed_ranks=gone)
    assert_valid_placement(plan.placement, experts, new, slots)
    assert_valid_plan(current, plan, gone)


def test_a_rank_repeating_an_expert_while_another_is_missing() -> None:
    """Found by the test above: a layer whose repeat leaves a slot to spare sat in one batch
    with a layer that must drop replicas, and its spare slot stayed empty."""
    phy = np.array(
        [
            [1, 0, 0, 2, 2, 2, 1, 1, 1, 0, 1, 0],
            [0, 0, 2, 0, 0, 2, 0, 2, 0, 0, 1, 2],
            [0, 0, 2, 1, 2, 2, 2, 2, 1, 0, 2, 1],
        ]
    )
    load = np.array([[0.011, 0.796, 0.077], [0.479, 0.894, 0.288], [1.9e-06, 0.083, 0.268]])
    current = Placement(phy, 2, num_experts=3)
    plan = plan_rescale(current, load, 2)
    assert_valid_placement(plan.placement, 3, 2, 2)
    assert_valid_plan(current, plan, ())


def _valid_rescale(load: np.ndarray, old: int, new: int, slots: int) -> RescalePlan:
    """`plan_rescale` from a fresh placement of `load` on `old` ranks to `new`, checked valid."""
    current = plan_placement(load, old, slots)
    plan = plan_rescale(current, load, new)
    assert_valid_plan(current, plan, ())
    return plan


def test_a_scale_down_at_five_slots_per_rank_reaches_the_balance_goal() -> None:
    """64 -> 60 ranks of 5 slots under Zipf 1.5: three light ranks offer refinement 15 slots
    and it stalls at 0.9885 (a fresh 60 x 5 plan reaches 0.9889); the sticky plans' and the
    rescue's refinements look at five light ranks with so few slots and reach 0.9905."""
    load = zipf_load(1, 256, 1.5, seed=0)
    plan = _valid_rescale(load, 64, 60, 5)
    assert plan.stats["balancedness_after"] >= 0.99


@pytest.mark.parametrize(
    ("layers", "skew", "seed", "old", "new", "slots", "copy_ratio"),
    [
        # 32 -> 64 ranks of 9 slots under Zipf 1.2: the priced refinement stalls at 0.973 on
        # every layer, with many ranks tied at the peak (unloading one does not lower the
        # peak, so no single move pays for its copies); the last, unpriced pass must get past
        # it, for copies close to the bound (the new ranks' slots, a few moves beyond them)
        pytest.param(2, 1.2, 3, 32, 64, 9, 1.2, id="peak-ranks-tie"),
        # 48 -> 64 ranks of 12 slots under Zipf 1.2: the sticky plan gives the hottest expert
        # (16 ranks' worth of load) 58 replicas; the 6 ranks without it stay light, and giving
        # one of them a replica would lift it above the peak, so refinement stalls at 0.969
        # and only the replica-count options reach the goal, at 2.16x the bound. Spread to
        # every rank, it refines to 0.993 at 1.19x
        pytest.param(1, 1.2, 0, 48, 64, 12, 1.3, id="hottest-expert-spread"),
        # 56 -> 64 ranks of 6 slots under Zipf 1.2: the spread plan reaches 0.990 but at 3.5x
        # the bound; taken before every option is refined in full, it would beat the 2.6x plan
        # that refinement finds, since the layer was short of the goal until then
        pytest.param(1, 1.2, 0, 56, 64, 6, 2.7, id="costly-spread-still-competes"),
    ],
)
def test_a_scale_up_that_stalls_still_reaches_the_balance_goal_near_the_bound(
    layers: int, skew: float, seed: int, old: int, new: int, slots: int, copy_ratio: float
) -> None:
    load = zipf_load(layers, 256, skew, seed=seed)
    plan = _valid_rescale(load, old, new, slots)
    assert plan.stats["balancedness_after"] >= 0.99
    assert plan.stats["copies"] <= copy_ratio * plan.stats["lower_bound"]


def test_a_halving_whose_search_stops_between_097_and_099_gets_every_target_in_full() -> None:
    # 64 -> 32 ranks of 9 slots under Zipf 1.5: the screened target leaves layers at
    # 0.975-0.988, where no unpriced move helps either; refining every replica-count target
    # in full (once reserved for layers below 0.97) reaches the goal on every layer
    load = zipf_load(4, 256, 1.5, seed=0)
    plan = _valid_rescale(load, 64, 32, 9)
    assert layer_balancedness(plan.placement.by_rank(), load).min() >= 0.99
    assert plan.stats["copies"] <= 1.3 * plan.stats["lower_bound"]


def _layer_of_a_mix(seed: int, layer: int) -> np.ndarray:
    """One layer [1, 256] of a 58-layer mix whose skew grows with depth (Zipf exponents
    0.2 to 1.5, lognormal noise per expert), as the planner's evaluation set builds it."""
    rng = np.random.default_rng(100 + seed)
    for index in range(layer + 1):
        skew = 0.2 + 1.3 * index / 57 + rng.normal(0, 0.1)
        base = 1.0 / np.arange(1, 257) ** max(skew, 0.0)
        row = rng.permutation(base) * rng.lognormal(0, 0.3, 256)
    return row[None, :] * 1e4


def test_a_layer_the_full_refinement_of_every_target_leaves_short_gets_the_unpriced_pass() -> None:
    # 48 -> 64 ranks of 9 slots: this layer's searched plan is refined for balance alone,
    # stays short, so every replica-count target is refined in full; the one kept is at
    # 0.981, and only the unpriced pass run after that refinement lifts it to the goal
    plan = _valid_rescale(_layer_of_a_mix(1, 55), 48, 64, 9)
    assert plan.stats["balancedness_after"] >= 0.99


def test_layers_the_search_leaves_below_the_goal_take_a_fresh_plan() -> None:
    # 64 -> 60 ranks of 5 slots under Zipf 1.0: the search's single moves leave four of six
    # layers at 0.955-0.979; re-planned from scratch (and relabelled to keep what it can)
    # every layer balances at 0.99 or above, for fewer copies than re-planning them all
    load = zipf_load(6, 256, 1.0, seed=1)
    plan = _valid_rescale(load, 64, 60, 5)
    assert layer_balancedness(plan.placement.by_rank(), load).min() >= 0.99
    assert plan.stats["copies"] < 6 * 60 * 5


def test_fallback_replans_only_layers_below_the_goal_that_a_fresh_plan_helps() -> None:
    load = zipf_load(2, 64, 1.2, seed=2)
    good = plan_placement(load, 8, 10).by_rank()
    # layer 1 placed for another load: its hot experts are wrong, so it balances badly
    bad = plan_placement(zipf_load(2, 64, 1.2, seed=9), 8, 10).by_rank()
    phy = np.stack([good[0], bad[1]])
    before = layer_balancedness(phy, load)
    assert before[0] >= 0.99 and before[1] < 0.9
    out = phy.copy()
    fallback(out, load, phy.copy())
    assert np.array_equal(out[0], phy[0])  # at the goal: untouched
    assert layer_balancedness(out, load)[1] >= 0.99
    placed = Placement(out.reshape(2, -1), 10, num_experts=64)
    assert_valid_placement(placed, 64, 8, 10)
