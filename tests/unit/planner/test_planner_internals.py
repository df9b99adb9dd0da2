"""Rescale internals the speed work rewrote: refinement, rank choice, start plans, replica-count
options, the fallback's relabelling. (Placement from scratch: `test_placement_internals`.)"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eep_controller.planner import Placement, choose_removed_ranks, plan_placement
from eep_controller.planner.packing import (
    count_replicas,
    holdings,
    slot_weights,
)
from eep_controller.planner.placement import layer_balancedness
from eep_controller.planner.refinement import refine
from eep_controller.planner.replication import filler_counts
from eep_controller.planner.search import _prefer_kept
from eep_controller.planner.starts import _target_counts, spread_plan, sticky_hot_plan
from tests.unit.planner.planner_checks import (
    distinct_per_rank,
    repeat_on_rank_zero,
    skewed_shrink,
    zipf_load,
)

# a shrink: the survivors of a placement planned for `ranks + removed` ranks (see `_shrink`)
SHRINKS = {
    "experts": st.integers(4, 40),
    "ranks": st.integers(2, 8),
    "removed": st.integers(1, 4),
    "skew": st.sampled_from([0.0, 0.5, 1.2, 2.0]),
    "seed": st.integers(0, 2**16),
}


def _shrink(
    experts: int, ranks: int, removed: int, skew: float, seed: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """Slots per rank, a Zipf load [3, E] and the first `ranks` ranks [3, ranks, S] of a
    placement for `ranks + removed` ranks (the others leave, orphaning some experts)."""
    slots = max(1, -(-experts // ranks)) + 1
    load = zipf_load(3, experts, skew, seed)
    survivors = plan_placement(load, ranks + removed, slots).by_rank()[:, :ranks]
    return slots, load, survivors


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(2, 8), st.integers(1, 6), st.integers(0, 2**16))
def test_refine_keeps_the_invariants_and_never_lowers_balance(
    layers: int, ranks: int, slots: int, seed: int
) -> None:
    experts = max(1, ranks * slots - int(np.random.default_rng(seed).integers(0, ranks + 1)))
    experts = min(experts, ranks * slots)
    load = zipf_load(layers, experts, 1.2, seed)
    start = plan_placement(load, ranks, slots).by_rank()
    origin = start.copy()
    for penalty in (0.0, 0.005):
        out = refine(start, load, origin, penalty=penalty, stop_at=1.0, max_steps=50)
        assert distinct_per_rank(out)
        counts = count_replicas(out, experts)
        assert counts.min() >= 1 and counts.max() <= ranks
        assert np.all(layer_balancedness(out, load) >= layer_balancedness(start, load) - 1e-12)


def test_refine_with_a_prohibitive_price_makes_only_free_moves() -> None:
    load = zipf_load(4, 64, 1.0, seed=3)
    start = plan_placement(load, 8, 9).by_rank()
    origin = start.copy()
    out = refine(start, load, origin, penalty=1e9, stop_at=1.0, max_steps=100)
    assert np.array_equal(out, start)  # every move from a settled plan adds copies


def test_refine_stops_a_row_after_a_move_that_gains_less_than_min_gain() -> None:
    load = zipf_load(4, 48, 1.0, seed=5)
    rng = np.random.default_rng(5)
    # a poor start: each expert once, on 8 ranks x 6 slots at random
    start = np.stack([rng.permutation(48).reshape(8, 6) for _ in range(4)])
    origin = start.copy()
    full = refine(start, load, origin, stop_at=1.0, max_steps=40)
    one_step = refine(start, load, origin, stop_at=1.0, max_steps=1)
    # no move gains an infinite share of the mean: one move per row, then it stops
    stopped = refine(start, load, origin, stop_at=1.0, max_steps=40, min_gain=np.inf)
    assert np.array_equal(stopped, one_step)
    assert not np.array_equal(full, one_step)  # without it the rows go on
    assert np.all(layer_balancedness(full, load) > layer_balancedness(stopped, load))
    # a finite min_gain: each row stops right after its first move that lowers the peak by
    # less than min_gain x the mean rank load (found here one step at a time)
    steps = [refine(start, load, origin, stop_at=1.0, max_steps=k) for k in range(41)]
    mean = load.sum(axis=1) / 8
    peaks = np.array([slot_weights(p, load, count_replicas(p, 48)).sum(2).max(1) for p in steps])
    drops = (peaks[:-1] - peaks[1:]) / mean  # [step, row]; 0 once a row stopped
    min_gain = float(np.median(drops[drops > 0]))
    cut = refine(start, load, origin, stop_at=1.0, max_steps=40, min_gain=min_gain)
    for row in range(4):
        small = np.flatnonzero(drops[:, row] < min_gain)
        last = int(small[0]) + 1 if small.size else 40
        assert np.array_equal(cut[row], steps[last][row])


def _partner_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """6 ranks x 2 slots, one replica each: rank 0 (A=6, B=4) is hot; ranks 1-3 (5, 5, 5.1)
    are the lightest; rank 5 (6) holds a new copy O=1 in slot 0 (its origin: a new slot)."""
    phy = np.array([[[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]])
    weight = np.array([[6.0, 4.0, 2.5, 2.5, 2.5, 2.5, 1.55, 3.55, 3.0, 3.0, 1.0, 5.0]])
    origin = phy.copy()
    origin[0, 5, 0] = -1
    return phy, weight, origin


def test_refine_swaps_with_a_partner_slot_for_one_copy() -> None:
    phy, weight, origin = _partner_case()
    one_step: dict[str, Any] = {"penalty": 0.005, "stop_at": 1.0, "max_steps": 1, "light_ranks": 3}
    alone = refine(phy, weight, origin, **one_step)
    # without partners: A for the 3.55 or B for the 1.55 of rank 3, the third lightest
    # (peak 10 -> 7.55), adds 2 copies: 1.225 per copy
    assert (alone != origin).sum() == 1 + 2
    assert np.isin(alone[0, 3], [0, 1]).sum() == 1
    with_partner = refine(phy, weight, origin, partners=np.array([True]), **one_step)
    # with them rank 3 is not looked at; B for the new copy O on rank 5 adds 1 copy and
    # gains 1 per copy (peak 10 -> 9), more than the 0.75 per copy of ranks 1 and 2
    assert (with_partner != origin).sum() == 1 + 1
    assert sorted(with_partner[0, 0].tolist()) == [0, 10]
    assert sorted(with_partner[0, 5].tolist()) == [1, 11]


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), st.integers(2, 12), st.integers(1, 6), st.integers(0, 2**16))
def test_refine_rows_do_not_depend_on_the_rest_of_the_batch(
    layers: int, ranks: int, slots: int, seed: int
) -> None:
    """Each row's result is the same refined alone or in a batch whose other rows do or do
    not have partners: the plan cannot depend on how layers are split between processes."""
    rng = np.random.default_rng(seed)
    experts = max(1, ranks * slots - int(rng.integers(0, ranks + 1)))
    load = zipf_load(layers, experts, 1.2, seed)
    start = plan_placement(load, ranks, slots).by_rank()
    origin = start.copy()
    # a third of the slots hold new copies (their origin is another expert or a new slot)
    fresh = rng.random(start.shape) < 0.33
    origin[fresh] = rng.integers(-1, experts, int(fresh.sum()))
    partners = rng.random(layers) < 0.5
    partners[0] = True
    out = refine(start, load, origin, penalty=0.005, stop_at=1.0, max_steps=30, partners=partners)
    for b in range(layers):
        solo = refine(
            start[b : b + 1],
            load[b : b + 1],
            origin[b : b + 1],
            penalty=0.005,
            stop_at=1.0,
            max_steps=30,
            partners=partners[b : b + 1],
        )
        assert np.array_equal(out[b], solo[0])
    assert distinct_per_rank(out)
    counts = count_replicas(out, experts)
    assert counts.min() >= 1 and counts.max() <= ranks
    assert np.all(layer_balancedness(out, load) >= layer_balancedness(start, load) - 1e-12)


def test_refine_partner_and_plain_rows_side_by_side() -> None:
    """The hand-checked case twice, with and without partners, in one batch: the partner
    row does not see rank 3, the other row's third light rank."""
    phy, weight, origin = _partner_case()
    both = refine(
        np.concatenate([phy, phy]),
        np.concatenate([weight, weight]),
        np.concatenate([origin, origin]),
        penalty=0.005,
        stop_at=1.0,
        max_steps=1,
        light_ranks=3,
        partners=np.array([True, False]),
    )
    assert sorted(both[0, 5].tolist()) == [1, 11]
    assert np.isin(both[1, 3], [0, 1]).sum() == 1


@pytest.mark.parametrize("repeat", [False, True])
def test_choose_removed_ranks_matches_a_plain_greedy_on_orphans(repeat: bool) -> None:
    """Also when a rank holds an expert twice: that rank is still one holder of it."""
    load = zipf_load(3, 40, 1.0, seed=5)
    current = plan_placement(load, 10, 6)
    if repeat:
        current = repeat_on_rank_zero(current)
    has = holdings(current.by_rank(), current.num_experts)
    gone: list[int] = [2]
    for _ in range(3):
        keys = []
        for r in range(10):
            if r in gone:
                continue
            live = has.copy()
            live[:, gone] = False
            alone = live.sum(axis=1) == 1
            # fewest orphans; without load every rank ties on load, so the highest index
            keys.append((int((live[:, r] & alone).sum()), -r))
        gone.append(-min(keys)[1])
    assert choose_removed_ranks(current, None, 3, failed_ranks=(2,)) == tuple(sorted(gone[1:]))


def test_choose_removed_ranks_counts_a_rank_holding_an_expert_twice_once() -> None:
    """Rank 0 holds expert 0 twice and nobody else holds it: removing rank 0 orphans it, as
    removing rank 1 orphans expert 1 and rank 2 expert 3. All tie, so the highest index goes;
    counted twice, expert 0 would look safe and rank 0 would go instead."""
    current = Placement(np.array([[0, 0, 1, 2, 3, 2]]), 2)
    assert choose_removed_ranks(current, None, 1) == (2,)


@settings(max_examples=60, deadline=None)
@given(**SHRINKS, coldest=st.booleans())
def test_prefer_kept_trades_new_copies_for_surviving_replicas(
    experts: int, ranks: int, removed: int, skew: float, seed: int, coldest: bool
) -> None:
    slots, load, survivors = _shrink(experts, ranks, removed, skew, seed)
    kept = count_replicas(survivors, experts)
    level = load.sum(axis=1) / ranks
    counts = filler_counts(load, ranks * slots, ranks, 0.9 * level)
    out = _prefer_kept(counts, kept, load, coldest=coldest)
    assert np.array_equal(out, _prefer_kept(counts, kept, load, coldest=coldest))
    assert np.array_equal(out.sum(axis=1), counts.sum(axis=1))
    assert out.min() >= 1 and out.max() <= ranks

    def writes(c: np.ndarray) -> np.ndarray:
        return np.asarray(np.maximum(c - kept, 0).sum(axis=1))

    moves = np.abs(out - counts).sum(axis=1) // 2
    # every move keeps a surviving replica instead of writing a new one
    assert np.array_equal(writes(out), writes(counts) - moves)
    # replicas only grow where survivors hold them; only orphans give replicas away
    grew, shrank = out > counts, out < counts
    assert np.all(out[grew] <= kept[grew])
    assert np.all(kept[shrank] == 0)
    # and none of their replicas gets heavier than the mean replica
    mean_replica = (load.sum(axis=1) / counts.sum(axis=1))[:, None]
    share = load / out
    assert np.all(share[shrank] <= np.broadcast_to(mean_replica, share.shape)[shrank] + 1e-12)


def test_prefer_kept_moves_an_orphans_second_replica_to_a_surviving_duplicate() -> None:
    weight = np.array([[1.0, 1.0, 30.0, 4.0]])
    kept = np.array([[0, 1, 1, 3]])  # expert 0 is an orphan, expert 3 has 3 survivors
    counts = np.array([[2, 1, 2, 1]])  # a plan that writes the orphan twice
    out = _prefer_kept(counts, kept, weight, coldest=True)
    assert out.tolist() == [[1, 1, 2, 2]]


@settings(max_examples=60, deadline=None)
@given(**SHRINKS)
def test_sticky_hot_frees_only_duplicates_and_places_every_orphan(
    experts: int, ranks: int, removed: int, skew: float, seed: int
) -> None:
    slots, load, survivors = _shrink(experts, ranks, removed, skew, seed)
    kept = count_replicas(survivors, experts)
    total = ranks * slots
    need = np.maximum(kept, 1).sum(axis=1) - total
    out = sticky_hot_plan(survivors, load, total)
    if need.max() <= 0:
        assert out is None
        return
    assert out is not None
    again = sticky_hot_plan(survivors, load, total)
    assert again is not None and np.array_equal(out, again)  # deterministic
    # a valid full placement: every expert placed, none twice on a rank
    counts = count_replicas(out, experts)
    assert counts.min() >= 1 and counts.max() <= ranks
    assert distinct_per_rank(out)
    # per layer exactly max(need, 0) slots are rewritten (as many as there are orphans
    # when surviving replicas must go), and only replicas that had a sibling were dropped
    changed = out != survivors
    assert np.array_equal(changed.sum(axis=(1, 2)), np.where(need > 0, (kept == 0).sum(axis=1), 0))
    for layer in range(3):
        dropped = survivors[layer][changed[layer]]
        if need[layer] > 0:
            assert np.all(kept[layer, dropped] >= 2)


def test_sticky_hot_unloads_the_hottest_rank_first() -> None:
    # two ranks of 2 slots; expert 0 (heavy) is on both, expert 1 on rank 0 with it,
    # expert 2 on rank 1; expert 3 lost its only replica and must come back
    survivors = np.array([[[0, 1], [0, 2]]])
    weight = np.array([[10.0, 1.0, 2.0, 1.5]])
    out = sticky_hot_plan(survivors, weight, 4)
    assert out is not None
    # rank 1 (5 + 2) is hotter than rank 0 (5 + 1); its only replica with a sibling is
    # expert 0's, which makes way for the orphan
    assert out.tolist() == [[[0, 1], [3, 2]]]


def test_options_equal_to_a_refined_start_are_not_searched_again() -> None:
    from eep_controller.planner.search import _new_options, _retarget_options

    load, origin = skewed_shrink(3)
    plans, _, row = _retarget_options(origin, load)
    weak = np.arange(3)
    per_layer = [plans[row == b] for b in range(3)]
    assert all(len(options) >= 2 for options in per_layer)
    # a start equal to each layer's first option: that option goes, the others stay
    first = np.stack([options[0] for options in per_layer])
    searched, left, _, left_row = _new_options(origin, load, weak, [first])
    assert searched.tolist() == [0, 1, 2]
    assert left.shape[0] == plans.shape[0] - 3
    assert not any(np.array_equal(p, first[r]) for p, r in zip(left, left_row, strict=True))
    # starts covering every option of layer 1 (and only the first of the others): layer 1
    # is left out and the rows renumber the layers that stay
    starts = [
        np.stack([per_layer[b][min(k, len(per_layer[b]) - 1) if b == 1 else 0] for b in range(3)])
        for k in range(len(per_layer[1]))
    ]
    searched, left, _, left_row = _new_options(origin, load, weak, starts)
    assert searched.tolist() == [0, 2]
    assert sorted(set(left_row.tolist())) == [0, 1]
    for p, r in zip(left, left_row, strict=True):
        assert any(np.array_equal(p, q) for q in per_layer[int(searched[r])][1:])


def _relabel_one_layer(fresh: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Reference for `fallback._relabel` on one layer [R, S], written plainly: match ranks greedily
    by overlap (largest first, first in row-major order on ties), then keep each matched
    expert in its old slot (the first, if the old rank repeats it) and fill the other
    slots with the other experts, in order."""
    ranks = fresh.shape[0]
    overlap = np.array(
        [[len(set(fresh[i]) & set(origin[j])) for j in range(ranks)] for i in range(ranks)]
    )
    overlap = overlap.astype(float)
    out = np.full_like(origin, -1)
    for _ in range(ranks):
        i, j = divmod(int(np.argmax(overlap)), ranks)
        overlap[i, :] = -1.0
        overlap[:, j] = -1.0
        wanted = [int(e) for e in fresh[i]]
        placed: set[int] = set()
        for s, e in enumerate(origin[j]):
            if e >= 0 and e in wanted and e not in placed:
                out[j, s] = e
                placed.add(int(e))
        rest = iter(e for e in wanted if e not in placed)
        for s in range(out.shape[1]):
            if out[j, s] < 0:
                out[j, s] = next(rest)
    return out


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 3),
    ranks=st.integers(1, 7),
    slots=st.integers(1, 5),
    new_ranks=st.integers(0, 3),
    repeat=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_relabel_matches_a_plain_reference_and_places_every_expert_once(
    layers: int, ranks: int, slots: int, new_ranks: int, repeat: bool, seed: int
) -> None:
    from eep_controller.planner.fallback import _relabel

    rng = np.random.default_rng(seed)
    experts = int(rng.integers(slots, ranks * slots + 1))
    fresh = plan_placement(rng.random((layers, experts)) ** 3, ranks, slots).by_rank()
    origin = plan_placement(rng.random((layers, experts)), ranks, slots).by_rank()
    origin = origin[:, rng.permutation(ranks)].copy()
    origin[:, ranks - min(new_ranks, ranks) :] = -1  # appended ranks hold nothing yet
    if repeat and slots > 1:
        origin[:, 0, 1] = origin[:, 0, 0]  # a current rank may repeat an expert
    out = _relabel(fresh, origin)
    for layer in range(layers):
        assert np.array_equal(out[layer], _relabel_one_layer(fresh[layer], origin[layer]))
        # the same ranks as the fresh plan, re-ordered, each with its slots permuted
        assert sorted(map(sorted, out[layer].tolist())) == sorted(
            map(sorted, fresh[layer].tolist())
        )


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 3),
    ranks=st.integers(2, 12),
    slots=st.integers(2, 8),
    skew=st.floats(0.0, 2.5),
    seed=st.integers(0, 10_000),
)
def test_spread_puts_every_spread_expert_on_every_rank_it_can(
    layers: int, ranks: int, slots: int, skew: float, seed: int
) -> None:
    experts = min(40, ranks * slots)
    load = zipf_load(layers, experts, skew, seed=seed)
    # placed for another load (other hot experts): this load's spread experts miss ranks
    start = plan_placement(zipf_load(layers, experts, skew, seed=seed + 1), ranks, slots).by_rank()
    origin = start.copy()
    origin[:, ranks // 2 :] = -1  # half the ranks new, as after a scale-up
    out, changed = spread_plan(start, load, origin)
    before, counts = count_replicas(start, experts), count_replicas(out, experts)
    assert counts.min() >= 1  # never an expert's last replica
    assert all(len(set(rank)) == slots for row in out for rank in row)  # distinct per rank
    spread = load * slots >= load.sum(axis=1, keepdims=True)
    has = holdings(out, experts)
    for b in range(layers):
        assert changed[b] == (not np.array_equal(out[b], start[b]))
        grown = counts[b] - before[b]
        assert (grown[~spread[b]] <= 0).all() and (grown[spread[b]] >= 0).all()
        for e in np.flatnonzero(spread[b]):
            for r in np.flatnonzero(~has[b, :, e]):
                # a rank still lacking a spread expert had no slot it could give up
                held = out[b, r]
                assert ((counts[b, held] < 2) | spread[b, held]).all()


def test_spread_gives_up_a_new_copy_before_a_kept_replica() -> None:
    # expert 0 carries 2/3 of the load, at least a slot's worth on every rank, but rank 3
    # lacks it; experts 2 (share 0.5) and 3 (share 1.0) have a second replica elsewhere
    load = np.array([[8.0, 1.0, 1.0, 2.0]])
    start = np.array([[[0, 2], [0, 3], [0, 1], [2, 3]]])
    new_copy = np.array([[[0, 2], [0, 3], [0, 1], [2, -1]]])  # rank 3's expert 3 is new
    out, changed = spread_plan(start, load, new_copy)
    assert changed.tolist() == [True]
    assert out[0, 3].tolist() == [2, 0]  # the new copy goes, though its share is larger
    kept = start.copy()  # both of rank 3's replicas are old: the lighter one goes
    out, _ = spread_plan(start, load, kept)
    assert out[0, 3].tolist() == [0, 3]
    assert np.array_equal(out[0, :3], start[0, :3])


def _target_counts_one_at_a_time(phy: np.ndarray, weight: np.ndarray, total: int) -> np.ndarray:
    """The reverse greedy as a loop: drop a replica of the expert whose share with one
    replica fewer is smallest (the lowest id on ties) until the counts fill `total`."""
    counts = np.maximum(count_replicas(phy, weight.shape[1]), 1)
    for b in range(counts.shape[0]):
        while counts[b].sum() > total:
            loss = np.where(counts[b] >= 2, weight[b] / np.maximum(counts[b] - 1, 1), np.inf)
            counts[b, int(np.argmin(loss))] -= 1
    return counts


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(2, 10),
    st.integers(1, 6),
    st.integers(1, 8),
    st.sampled_from(["zipf", "ties", "zeros"]),
    st.integers(0, 2**16),
)
def test_target_counts_equals_the_one_at_a_time_reverse_greedy(
    layers: int, ranks: int, slots: int, removed: int, kind: str, seed: int
) -> None:
    """Survivors of a placement on `ranks + removed` ranks, trimmed to `ranks` x `slots`:
    the one-sort `_target_counts` drops exactly the replicas the loop drops, ties (equal
    loads, zero loads) included."""
    rng = np.random.default_rng(seed)
    experts = max(1, ranks * slots - int(rng.integers(0, ranks + 1)))
    load = zipf_load(layers, experts, 1.2, seed)
    if kind == "ties":
        load = np.round(load / load.max(axis=1, keepdims=True) * 4)
    elif kind == "zeros":
        load[:, rng.random(experts) < 0.5] = 0.0
    old = plan_placement(load, ranks + removed, slots).by_rank()
    survivors = old[:, rng.permutation(ranks + removed)[:ranks]]
    total = ranks * slots
    assert np.array_equal(
        _target_counts(survivors, load, total),
        _target_counts_one_at_a_time(survivors, load, total),
    )
