"""Planning a placement from scratch, the parts the speed work rewrote: replica counts,
packing (LPT, duplicate separation) and which replica caps the search packs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eep_controller.planner import balancedness, placement, plan_placement, plan_rescale
from eep_controller.planner.packing import (
    _heaviest_first,
    count_replicas,
    fill_lpt,
    separate_duplicates,
)
from eep_controller.planner.placement import _cannot_reach, layer_balancedness, pack_scratch
from eep_controller.planner.replication import (
    _counts_above,
    even_counts,
    filler_counts,
    greedy_counts,
)
from tests.unit.planner.planner_checks import distinct_per_rank, zipf_load


def _count_packed_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on `plan_batch` records, per `pack_scratch` call, how many rows it packs."""
    packed: list[int] = []
    real_pack = placement.pack_scratch

    def counting_pack(weight: np.ndarray, counts: np.ndarray, ranks: int, slots: int) -> np.ndarray:
        packed.append(weight.shape[0])
        return real_pack(weight, counts, ranks, slots)

    monkeypatch.setattr(placement, "pack_scratch", counting_pack)
    return packed


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(2, 6),
    st.integers(1, 5),
    st.integers(0, 2**16),
)
def test_separate_duplicates_keeps_the_multiset_and_leaves_no_repeat(
    layers: int, ranks: int, slots: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    experts = max(slots, ranks * slots // 2)
    # counts <= ranks, so a separation exists; dealt in order, then shuffled into repeats
    counts = np.ones((layers, experts), dtype=np.int64)
    for row in counts:
        extra = ranks * slots - experts
        while extra:
            e = int(rng.integers(experts))
            if row[e] < ranks:
                row[e] += 1
                extra -= 1
    phy = np.stack([rng.permutation(np.repeat(np.arange(experts), c)) for c in counts]).reshape(
        layers, ranks, slots
    )
    weight = rng.random((layers, experts))
    before = count_replicas(phy, experts)
    separate_duplicates(phy, weight, counts)
    assert np.array_equal(count_replicas(phy, experts), before)
    assert distinct_per_rank(phy)


def test_skewed_placement_search_reaches_high_balance() -> None:
    load = zipf_load(6, 256, 1.5, seed=0)
    assert balancedness(plan_placement(load, 32, 9), load) >= 0.99


def test_cannot_reach_flags_only_provably_unpackable_counts() -> None:
    ranks = 4
    # mean rank load 1.5: five replicas of 0.8 (> half the 0.99 peak) on 4 ranks must pair up
    weight = np.array([[4.0, 0.5, 0.5, 0.5, 0.5]])
    counts = np.array([[5, 1, 1, 1, 1]])
    assert _cannot_reach(weight, counts, ranks, 0.99).tolist() == [True]
    # four of them fit one per rank, each with one 0.7 expert: every rank at the mean
    weight4 = np.array([[3.2, 0.7, 0.7, 0.7, 0.7]])
    counts4 = np.array([[4, 1, 1, 1, 1]])
    assert _cannot_reach(weight4, counts4, ranks, 0.99).tolist() == [False]
    ones = np.ones((1, 8), dtype=np.int64)
    assert _cannot_reach(np.ones((1, 8)), ones, ranks, 0.99).tolist() == [False]
    assert _cannot_reach(np.zeros((1, 8)), ones, ranks, 0.99).tolist() == [False]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 12),
    st.integers(1, 6),
    st.floats(0.0, 2.0),
    st.sampled_from((0.9, 1.0, 1.1)),
    st.integers(0, 2**16),
)
def test_cannot_reach_never_flags_a_balance_a_packing_achieves(
    ranks: int, slots: int, skew: float, cap: float, seed: int
) -> None:
    """The bound `plan_batch` skips packings by is sound: counts some packing balances to
    b are never flagged as unable to reach (just under) b."""
    experts = slots + seed % (ranks * slots - slots + 1)  # S <= E <= R * S
    weight = zipf_load(3, experts, skew, seed=seed)
    greedy = greedy_counts(weight, ranks * slots, ranks)
    filler = filler_counts(weight, ranks * slots, ranks, cap * weight.sum(axis=1) / ranks)
    for counts in (greedy, filler):
        reached = layer_balancedness(pack_scratch(weight, counts, ranks, slots), weight)
        assert not _cannot_reach(weight, counts, ranks, reached * (1 - 1e-9)).any()


def test_counts_that_cannot_beat_a_layers_best_are_not_packed_and_plans_stay_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 64 x 5 under Zipf 1.5 the strictest replica cap provably cannot beat the layers'
    best plans so far, so it is not packed; skipping it changes no plan."""
    load = zipf_load(4, 256, 1.5, seed=3)
    packed = _count_packed_rows(monkeypatch)
    # every cap is reached (these layers reach SEARCH_DONE before the strictest one)
    monkeypatch.setattr(placement, "SEARCH_DONE", 1.0)
    pruned = placement.plan_batch(load, 64, 5)
    rows_pruned = sum(packed)
    packed.clear()
    monkeypatch.setattr(placement, "NO_BETTER", 1e-300)  # a level near 0: nothing skipped
    full = placement.plan_batch(load, 64, 5)
    assert np.array_equal(pruned, full)
    assert rows_pruned == sum(packed) - 4  # one cap of every layer skipped


def test_a_layer_that_balances_search_done_tries_no_further_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 64 x 5 under Zipf 1.5 the 0.93 cap balances every layer past SEARCH_DONE: the
    caps after it are not packed, and the plans are those of trying every cap."""
    load = zipf_load(4, 256, 1.5, seed=3)
    packed = _count_packed_rows(monkeypatch)
    early = placement.plan_batch(load, 64, 5)
    rows_early = sum(packed)
    assert (placement.layer_balancedness(early, load) >= placement.SEARCH_DONE).all()
    packed.clear()
    monkeypatch.setattr(placement, "SEARCH_DONE", 1.0)  # never done: every cap is tried
    every = placement.plan_batch(load, 64, 5)
    assert np.array_equal(early, every)
    assert rows_early < sum(packed)


def _lpt_one_at_a_time(
    weight: np.ndarray, counts: np.ndarray, ranks: int, slots: int
) -> np.ndarray:
    """`fill_lpt` written plainly, one row and one replica at a time."""
    items, item_w = _heaviest_first(weight, counts)
    phy = np.full((weight.shape[0], ranks, slots), -1, dtype=np.int64)
    for b in range(weight.shape[0]):
        loads = [0.0] * ranks
        filled = [0] * ranks
        for e, w in zip(items[b].tolist(), item_w[b].tolist(), strict=True):
            open_ranks = [r for r in range(ranks) if filled[r] < slots]
            lacking = [r for r in open_ranks if e not in phy[b, r, : filled[r]]]
            r = min(lacking or open_ranks, key=lambda q: (loads[q], q))
            phy[b, r, filled[r]] = e
            filled[r] += 1
            loads[r] += w
    separate_duplicates(phy, weight, counts)
    return phy


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(2, 7),
    st.integers(1, 5),
    st.sampled_from([0.0, 1.0, 2.5]),
    st.integers(0, 2**16),
)
def test_fill_lpt_places_each_replica_as_the_plain_loop_does(
    layers: int, ranks: int, slots: int, skew: float, seed: int
) -> None:
    """The vectorised LPT equals the plain loop, including rows where a replica finds every
    open rank holding its expert (hot experts on nearly every rank)."""
    rng = np.random.default_rng(seed)
    experts = int(rng.integers(slots, ranks * slots + 1))
    weight = zipf_load(layers, experts, skew, seed)
    counts = np.ones((layers, experts), dtype=np.int64)
    for row in counts:
        for _ in range(ranks * slots - experts):
            # mostly onto the first experts, so counts near `ranks` are common
            room = np.flatnonzero(row < ranks)
            row[room[min(int(rng.integers(0, 3)), room.size - 1)]] += 1
    got = fill_lpt(weight, counts, ranks, slots)
    assert np.array_equal(got, _lpt_one_at_a_time(weight, counts, ranks, slots))
    assert np.array_equal(count_replicas(got, experts), counts)
    assert distinct_per_rank(got)


def test_separate_duplicates_when_the_only_rank_lacking_the_expert_holds_nothing_new() -> None:
    """Rank 0 holds expert 0 twice; rank 1 is the only rank without expert 0 and holds only
    experts rank 0 has, so no single fitting swap exists. Swapping with one of rank 1's own
    duplicates and passing again must still leave every rank with distinct experts."""
    phy = np.array([[[0, 0, 1, 2], [1, 1, 2, 2], [0, 3, 4, 5], [0, 6, 7, 8]]])
    weight = np.arange(1.0, 10.0)[None]
    counts = count_replicas(phy, 9)
    separate_duplicates(phy, weight, counts)
    for rank in phy[0]:
        assert len(set(rank.tolist())) == 4
    assert np.array_equal(count_replicas(phy, 9), counts)


def _greedy_reference(weight: np.ndarray, total: int, cap: int) -> np.ndarray:
    """The apportionment greedy, one replica at a time, written as plainly as possible."""
    out = np.ones_like(weight, dtype=np.int64)
    for b in range(weight.shape[0]):
        for _ in range(total - weight.shape[1]):
            priority = [
                weight[b, e] / out[b, e] if out[b, e] < cap else -1.0
                for e in range(weight.shape[1])
            ]
            out[b, int(np.argmax(priority))] += 1
    return out


@settings(max_examples=80, deadline=None)
@given(
    experts=st.integers(1, 30),
    cap=st.integers(1, 12),
    extra=st.integers(0, 200),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["zipf", "ties", "zeros", "spike", "lognormal", "fractions"]),
)
def test_greedy_counts_equals_the_one_at_a_time_greedy(
    experts: int, cap: int, extra: int, seed: int, kind: str
) -> None:
    rng = np.random.default_rng(seed)
    total = min(experts + extra, experts * cap)
    if kind == "zipf":
        weight = zipf_load(2, experts, 1.3, seed)
    elif kind == "ties":
        weight = rng.integers(0, 4, (2, experts)).astype(np.float64) * 6.0
    elif kind == "zeros":
        weight = np.zeros((2, experts))
    elif kind == "lognormal":
        weight = rng.lognormal(0.0, 1.5, (2, experts))
    elif kind == "fractions":
        # small ratios tie exactly: w / c of one expert equals w' / c' of another
        weight = rng.integers(1, 7, (2, experts)) / rng.integers(1, 7, (2, experts))
    else:
        weight = np.full((2, experts), 1.0)
        weight[:, 0] = 1e6
    # many spare slots exercise the threshold search that skips most of the one-at-a-time loop
    assert np.array_equal(greedy_counts(weight, total, cap), _greedy_reference(weight, total, cap))


def test_counts_above_match_the_greedys_own_division() -> None:
    # ratios of small integers put weight / p within rounding of an integer, where a
    # product-based estimate is off by one in both directions
    rng = np.random.default_rng(1)
    weight = rng.integers(1, 30, (500, 64)) / rng.integers(1, 30, (500, 64))
    inverse = rng.integers(1, 30, 500) / rng.integers(1, 30, 500)
    cap = 64
    got = _counts_above(weight, inverse, cap)
    threshold = 1.0 / inverse
    c = np.arange(1, cap)
    above = (weight[:, :, None] / c > threshold[:, None, None]).sum(axis=2)
    assert np.array_equal(got, 1 + above)
    estimate = np.minimum(np.ceil(weight * inverse[:, None]) - 1, cap - 1)
    # the set-up reaches both corrections
    assert (estimate > above).any() and (estimate < above).any()


@pytest.mark.parametrize(
    ("experts", "ranks", "slots"), [(16, 3, 8), (256, 48, 6), (256, 48, 9), (64, 6, 12), (3, 8, 2)]
)
def test_equal_loads_fill_every_rank_exactly(experts: int, ranks: int, slots: int) -> None:
    # the greedy gives every tied expert the same count: these shapes balanced 0.9697
    # (0.9375 at 3 experts on 8 ranks of 2), where other counts fill each rank exactly
    load = np.full((3, experts), 5.0)
    plan = plan_placement(load, ranks, slots)
    assert balancedness(plan, load) == pytest.approx(1.0, abs=1e-12)
    assert distinct_per_rank(plan.by_rank())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 9), st.integers(1, 12))
def test_even_counts_give_every_rank_its_share(experts: int, ranks: int, slots: int) -> None:
    slots = min(slots, experts)
    counts = even_counts(experts, ranks, slots)
    if ranks * slots < experts or counts is None:
        return
    assert counts.shape == (experts,) and counts.sum() == ranks * slots
    assert counts.min() >= 1 and counts.max() <= ranks
    load = np.ones((1, experts))
    assert balancedness(plan_placement(load, ranks, slots), load) == pytest.approx(1.0, abs=1e-12)


def test_even_counts_none_when_no_counts_fill_ranks_alike() -> None:
    # 35 experts on 4 ranks of 9: a rank holds 8.75 experts' load in 9 slots, and any split
    # replica takes at least half an expert off a rank
    assert even_counts(35, 4, 9) is None
    load = np.ones((1, 35))
    assert balancedness(plan_placement(load, 4, 9), load) == pytest.approx(35 / 36)


def test_rescale_of_equal_loads_is_not_evened_out_afresh() -> None:
    # equal loads stand in for a missing load window: the rescale keeps its sticky plan
    # (0.9697 at 16 experts on 3 ranks of 8, 20 copies) rather than rewrite most slots for
    # an even one (48 copies)
    load = np.ones((4, 16))
    plan = plan_rescale(plan_placement(load, 4, 8), load, 3)
    assert plan.stats["copies"] <= 24
    assert plan.stats["balancedness_after"] == pytest.approx(32 / 33)
