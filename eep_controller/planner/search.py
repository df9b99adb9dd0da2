"""Searching for the new placement of a rescale: refining the start plans (see
:mod:`eep_controller.planner.starts`), replica-count options, repair.

Pure numpy. :func:`eep_controller.planner.rescale.plan_rescale` calls :func:`best_candidate`
(then :func:`eep_controller.planner.fallback.fallback`); everything here works on placements
shaped ``[layers, ranks, slots]`` and never changes how many slots a rank has.
"""

from __future__ import annotations

import numpy as np

from eep_controller.planner.packing import (
    count_replicas,
    least_copies,
)
from eep_controller.planner.placement import REPLICA_CAPS, layer_balancedness
from eep_controller.planner.refinement import refine
from eep_controller.planner.replication import filler_counts
from eep_controller.planner.starts import (
    retargeted_plan,
    spread_plan,
    sticky_hot_plan,
    sticky_plan,
)
from eep_controller.planner.validation import BoolArray, FloatArray, IntArray

# Gain (in mean rank loads) a swap must bring for each weight copy it adds.
COPY_PENALTY = 0.005
# A layer stops buying balance with copies once it balances this well.
GOOD_ENOUGH = 0.9903
REFINE_STEPS = 150
LIGHT_RANKS = 3
# With at most FEW_SLOTS slots per rank, three light ranks offer refinement only 15-18 slots
# to move load onto: the sticky plans' and the rescue's refinements look at
# FEW_SLOTS_LIGHT_RANKS. Over 60 <-> 64 x 5 and 56 <-> 64 x 6 under the bench's seven loads
# this saves 1.6% of copies and 5% of time, and lifts 64 -> 60 x 5 under Zipf 1.5 from
# 0.9885 to 0.9905. (In every refinement it saved 1.2% but made one Zipf 1.2 layer of
# 56 -> 64 x 6 stop short of the rescue at 2.8x the bound instead of 2.6x; at 7 and 8 slots
# five light ranks save 1.5% of copies for 15% more time.)
FEW_SLOTS = 6
FEW_SLOTS_LIGHT_RANKS = 5
# A candidate plan balancing at least this well competes on copies alone.
CHOOSE_ABOVE = 0.99
# Layers still below CHOOSE_ABOVE after the search are refined to FINISH_AT with the copy
# penalty scaled by FINISH_DISCOUNT, looking at FINISH_LIGHT_RANKS light ranks (as many as
# `refine` allows at 9 slots per rank). A plan that stalls on LIGHT_RANKS often still has a
# move onto a few more: Zipf 1.5 scaled from 48 to 64 ranks stalls at 0.988 on three and
# gets past 0.99 on five, for ~2% more copies.
FINISH_AT = 0.9903
FINISH_DISCOUNT = 0.2
FINISH_LIGHT_RANKS = 7
# Layers the sticky plan balances at least this well skip the replica-count search when the
# finishing refinement lifts them to CHOOSE_ABOVE.
NEAR_ENOUGH = 0.98
# Refinement steps each replica-count option gets before the most promising is chosen.
SCREEN_STEPS = 40
# Screening: every option gets SCREEN_FIRST refinement steps; then, per stage of
# SCREEN_STAGES, (options per layer kept, steps they get).
SCREEN_FIRST = 14
SCREEN_STAGES = ((2, SCREEN_STEPS - SCREEN_FIRST),)
# Layers the search leaves below this get every option refined in full (see `_rescue`): the
# balance goal. (At the fallback's 0.97, layers between 0.97 and 0.99 kept a plan short of
# the goal; 64 -> 32 ranks under Zipf 1.5 ended at 0.985, and now at 0.9906 for 1.5% more
# copies. On the bench's layer mixes it also saves copies.)
RESCUE_BELOW = CHOOSE_ABOVE
# A layer the spread plan (see `spread_plan`) balances to CHOOSE_ABOVE with at most this many
# times its fewest possible copies takes it without the rescue's full refinement of every
# option; elsewhere the two compare by `_pick`.
SPREAD_ENOUGH = 1.3


def _prefer_kept(
    counts: IntArray, kept: IntArray, weight: FloatArray, *, coldest: bool
) -> IntArray:
    """`counts` [B, E] with replicas moved, one at a time, from an orphan given more than one
    replica (each a new copy) to an expert whose surviving (`kept`) replicas would be dropped
    (keeping one costs no copy), while the orphan's replicas stay no heavier than the mean
    replica. The survivor taking it is the coldest, or with `coldest=False` the heaviest."""
    counts = counts.copy()
    cap = weight.sum(axis=1) / counts.sum(axis=1)  # the mean replica
    todo = np.arange(counts.shape[0])
    for _ in range(int(counts.sum(axis=1).max(initial=0))):
        c, k, w = counts[todo], kept[todo], weight[todo]
        n = np.arange(todo.size)
        grown = np.where((k == 0) & (c > 1), w / np.maximum(c - 1, 1), np.inf)
        give = np.argmin(grown, axis=1)
        relief = np.where(k > c, -w / c if coldest else w / c, -np.inf)
        take = np.argmax(relief, axis=1)
        ok = (grown[n, give] <= cap[todo]) & np.isfinite(relief[n, take])
        if not ok.any():
            break
        todo, give, take = todo[ok], give[ok], take[ok]
        counts[todo, give] -= 1
        counts[todo, take] += 1
    return counts


# Replica-count options per layer: per cap a filler split with replicas moved to surviving
# ones, coldest first (see `_prefer_kept`); the mildest cap also with the heaviest first.
# (Both ways at every cap balance the same loads with hardly fewer copies and take about
# 1.5x the time. The plain greedy counts were an option too, but won 1 layer in 2,600 over
# the bench loads and three layer mixes and another option did as well there.)
OPTIONS = 1 + len(REPLICA_CAPS)


def _retarget_options(phy: IntArray, weight: FloatArray) -> tuple[IntArray, IntArray, IntArray]:
    """`retargeted_plan` plans for the replica-count options planned for the new size (see
    OPTIONS): filler splits per cap of `REPLICA_CAPS` (see `filler_counts`).

    Returns the plans [N, R, S], the option index [N] and the row [N] of each; an option
    whose counts equal an earlier option's for the same row (same plan) is left out."""
    ranks, slots = phy.shape[1:]
    total = ranks * slots
    level = weight.sum(axis=1) / ranks
    options = []
    kept = count_replicas(phy, weight.shape[1])
    for cap in REPLICA_CAPS:
        filler = filler_counts(weight, total, ranks, cap * level)
        if cap == REPLICA_CAPS[0]:
            options.append(_prefer_kept(filler, kept, weight, coldest=False))
        options.append(_prefer_kept(filler, kept, weight, coldest=True))
    counts = np.stack(options)  # [K, B, E]
    repeat = np.zeros(counts.shape[:2], dtype=bool)
    for k in range(1, counts.shape[0]):
        for j in range(k):
            repeat[k] |= np.all(counts[k] == counts[j], axis=1)
    kind, row = np.nonzero(~repeat)
    return retargeted_plan(phy[row], weight[row], counts[kind, row]), kind, row


def _scores(
    plans: IntArray, weight: FloatArray, origin: IntArray, kind: IntArray, row: IntArray, kinds: int
) -> tuple[FloatArray, IntArray, IntArray]:
    """Balancedness and copies [K, B] of plans [N] for (option `kind`, layer `row`) pairs,
    and the index of each pair's plan; an absent pair scores -inf (never chosen)."""
    batch = weight.shape[0]
    bal = np.full((kinds, batch), -np.inf)
    copies = np.full((kinds, batch), np.iinfo(np.int64).max, dtype=np.int64)
    where = np.zeros((kinds, batch), dtype=np.int64)
    bal[kind, row] = layer_balancedness(plans, weight[row])
    copies[kind, row] = (plans != origin[row]).sum(axis=(1, 2))
    where[kind, row] = np.arange(row.size)
    return bal, copies, where


def _preference(bal: FloatArray, copies: IntArray) -> IntArray:
    """Options [K, B] ordered per column as `_pick` prefers them (best first)."""
    good = bal >= CHOOSE_ABOVE
    key = np.where(good, copies.astype(np.float64), np.inf)
    index = np.broadcast_to(np.arange(bal.shape[0])[:, None], bal.shape)
    order: IntArray = np.lexsort((index, -bal, key), axis=0)
    return order


def _pick(bal: FloatArray, copies: IntArray) -> IntArray:
    """Per column of [K, B] scores: fewest copies among options balancing at least
    CHOOSE_ABOVE (lowest index on ties), else the best balanced."""
    good = bal >= CHOOSE_ABOVE
    key = np.where(good, copies.astype(np.float64), np.inf)
    pick: IntArray = np.where(good.any(axis=0), np.argmin(key, axis=0), np.argmax(bal, axis=0))
    return pick


def _second_wins(
    bal_a: FloatArray, plan_a: IntArray, bal_b: FloatArray, plan_b: IntArray, origin: IntArray
) -> BoolArray:
    """Per layer: `_pick` prefers plan b to plan a (balancedness `bal_*`, copies counted
    against `origin`)."""
    copies = np.stack([(plan_a != origin).sum(axis=(1, 2)), (plan_b != origin).sum(axis=(1, 2))])
    wins: BoolArray = _pick(np.stack([bal_a, bal_b]), copies) == 1
    return wins


def _polish(
    phy: IntArray,
    weight: FloatArray,
    origin: IntArray,
    *,
    steps: int = REFINE_STEPS,
    stop_at: float = GOOD_ENOUGH,
    partners: BoolArray | None = None,
    wider: bool = False,
) -> IntArray:
    """`refine` with the rescale settings: copy penalty, stop at GOOD_ENOUGH (screening
    stops at CHOOSE_ABOVE, all `_pick` asks of a candidate); `wider` looks at
    FEW_SLOTS_LIGHT_RANKS light ranks when a rank has at most FEW_SLOTS slots."""
    return refine(
        phy,
        weight,
        origin,
        penalty=COPY_PENALTY,
        stop_at=stop_at,
        max_steps=steps,
        light_ranks=FEW_SLOTS_LIGHT_RANKS if wider and phy.shape[2] <= FEW_SLOTS else LIGHT_RANKS,
        partners=partners,
    )


def best_candidate(phy: IntArray, weight: FloatArray, origin: IntArray) -> IntArray:
    """The sticky plan (see `sticky_plan`) and the hot-first one (see `sticky_hot_plan`), refined
    with the copy penalty. Layers both leave below CHOOSE_ABOVE (skewed ones) also get the
    replica-count search: the distinct `_retarget_options` not already refined, screened by
    a short refinement, the most promising refined fully; per layer the better plan by
    `_pick` is kept. Layers still short of CHOOSE_ABOVE get an unpriced refinement (see
    `_unstall`), then the sticky plan with spread experts on every rank (see `spread_plan`),
    then every option refined in full (see `_rescue`)."""
    total = phy.shape[1] * phy.shape[2]
    batch = phy.shape[0]
    # layers with orphans write copies onto surviving ranks anyway: their refinement may
    # swap with those slots for one copy (see `refine`'s partners); the screening does not
    orphaned = count_replicas(phy, weight.shape[1]).min(axis=1) == 0
    sticky = sticky_plan(phy, weight, total)
    hot_start = sticky_hot_plan(phy, weight, total)
    starts = [sticky]
    if hot_start is None:
        best = _polish(sticky, weight, origin, partners=orphaned, wider=True)
        hot_first = None
    else:
        # both refined in one call: refinement is row by row, so one call gives the same
        # plans as two and pays the per-step overhead once
        both = _polish(
            np.concatenate([sticky, hot_start]),
            np.concatenate([weight, weight]),
            np.concatenate([origin, origin]),
            partners=np.concatenate([orphaned, orphaned]),
            wider=True,
        )
        best, hot_first = both[:batch], both[batch:]
        starts.append(hot_start)
    bal = layer_balancedness(best, weight)
    weak = np.flatnonzero(bal < CHOOSE_ABOVE)
    # layers the sticky plan left close to CHOOSE_ABOVE buy the rest at a lower price
    near = weak[bal[weak] >= NEAR_ENOUGH]
    if near.size:
        done = _finish(best[near], weight[near], origin[near], orphaned[near])
        bal_done = layer_balancedness(done, weight[near])
        reached = bal_done >= CHOOSE_ABOVE
        best[near[reached]] = done[reached]
        bal[near[reached]] = bal_done[reached]
        weak = np.flatnonzero(bal < CHOOSE_ABOVE)
    if hot_first is not None:
        _merge_hot_first(best, bal, hot_first, weight, origin)
    if weak.size == 0:
        return best
    searched, plans, kind, row = _new_options(phy, weight, weak, starts)
    bal_searched = bal.copy()
    if searched.size:
        here = (bal[searched], (best[searched] != origin[searched]).sum(axis=(1, 2)))
        other = _screen(
            plans, weight[searched], origin[searched], kind, row, orphaned[searched], here
        )
        bal_other = layer_balancedness(other, weight[searched])
        take = _second_wins(bal[searched], best[searched], bal_other, other, origin[searched])
        best[searched[take]] = other[take]
        bal_searched[searched] = np.maximum(bal[searched], bal_other)
    # layers the copy penalty left just short of CHOOSE_ABOVE buy the rest at a lower price
    short = weak[bal_searched[weak] < CHOOSE_ABOVE]
    if short.size:
        best[short] = _finish(best[short], weight[short], origin[short], orphaned[short])
    # the cheap unpriced pass first: the rescue then refines every option of the layers it
    # leaves short, and the pass again takes what the rescue leaves short
    _unstall(best, weight, origin, orphaned)
    # before refining every option in full: the sticky plan with spread experts completed
    # (see `spread_plan`); a layer it balances cheaply enough skips that, the rest compare after
    spread_at, spread = _spread_refined(best, sticky, weight, origin, orphaned)
    if spread_at.size:
        cheap = _cheap_enough(spread, weight[spread_at], origin[spread_at])
        best[spread_at[cheap]] = spread[cheap]
        spread_at, spread = spread_at[~cheap], spread[~cheap]
    if searched.size and _rescue(best, weight, origin, searched, plans, kind, row, orphaned):
        _unstall(best, weight, origin, orphaned)
    if spread_at.size:
        bal_best = layer_balancedness(best[spread_at], weight[spread_at])
        bal_spread = layer_balancedness(spread, weight[spread_at])
        take = _second_wins(bal_best, best[spread_at], bal_spread, spread, origin[spread_at])
        best[spread_at[take]] = spread[take]
    return best


def _spread_refined(
    best: IntArray, sticky: IntArray, weight: FloatArray, origin: IntArray, orphaned: BoolArray
) -> tuple[IntArray, IntArray]:
    """For layers `best` leaves below CHOOSE_ABOVE whose `sticky` plan lacks a spread expert
    somewhere: those layers and that plan with spread experts completed (see `spread_plan`),
    refined [N, R, S]."""
    short = np.flatnonzero(layer_balancedness(best, weight) < CHOOSE_ABOVE)
    if short.size == 0:
        return short, best[:0]
    spread, changed = spread_plan(sticky[short], weight[short], origin[short])
    at = short[changed]
    if at.size == 0:
        return at, best[:0]
    return at, _polish(spread[changed], weight[at], origin[at], partners=orphaned[at])


def _cheap_enough(plans: IntArray, weight: FloatArray, origin: IntArray) -> BoolArray:
    """Plans [N, R, S] that balance to CHOOSE_ABOVE with at most SPREAD_ENOUGH x the
    layer's fewest possible copies (every new slot and every orphan written)."""
    least = least_copies(origin, weight.shape[1])
    copies = (plans != origin).sum(axis=(1, 2))
    ok: BoolArray = (layer_balancedness(plans, weight) >= CHOOSE_ABOVE) & (
        copies <= SPREAD_ENOUGH * np.maximum(least, 1)
    )
    return ok


def _new_options(
    phy: IntArray, weight: FloatArray, weak: IntArray, starts: list[IntArray]
) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """The `_retarget_options` of layers `weak` but those equal to a plan of `starts` (each
    [B, R, S], refined already). Returns the layers left with at least one option, the plans
    [N, R, S], the option index [N] and the row [N] of each, rows indexing those layers."""
    plans, kind, row = _retarget_options(phy[weak], weight[weak])
    new = np.ones(row.size, dtype=bool)
    for start in starts:
        new &= np.any(plans != start[weak[row]], axis=(1, 2))
    plans, kind, row = plans[new], kind[new], row[new]
    present = np.unique(row)
    renumber = np.zeros(weak.size, dtype=np.int64)
    renumber[present] = np.arange(present.size)
    return weak[present], plans, kind, renumber[row]


def _screen(
    plans: IntArray,
    weight: FloatArray,
    origin: IntArray,
    kind: IntArray,
    row: IntArray,
    partners: BoolArray,
    here: tuple[FloatArray, IntArray],
) -> IntArray:
    """Successive halving over the option plans [N] of layers [B] (every layer has one at
    least): every option SCREEN_FIRST refinement steps, then per stage of SCREEN_STAGES only
    the best of each layer go on; the best of the last is refined in full (with `partners`)
    and returned [B, R, S].

    `here` is the balancedness and copies [B] of each layer's current plan. An option that
    trails it on both after the screening is returned as screened, not refined in full:
    refinement buys balance with copies, and the search picks such layers by balance, so it
    would rarely win. (Zipf 1.5 48->64: the options stall below the sticky plan after
    another 110 steps on every layer; over the bench loads and three layer mixes this cuts
    0.1% of copies too.)"""
    screened = _polish(plans, weight[row], origin[row], steps=SCREEN_FIRST, stop_at=CHOOSE_ABOVE)
    bal_k, copies_k, where = _scores(screened, weight, origin, kind, row, OPTIONS)
    for keep, steps in SCREEN_STAGES:
        order = _preference(bal_k, copies_k)[:keep]  # [keep, B]
        present = np.isfinite(np.take_along_axis(bal_k, order, axis=0))
        s_kind, s_row = order[present], np.nonzero(present)[1]
        screened = _polish(
            screened[where[s_kind, s_row]],
            weight[s_row],
            origin[s_row],
            steps=steps,
            stop_at=CHOOSE_ABOVE,
        )
        bal_k, copies_k, where = _scores(screened, weight, origin, s_kind, s_row, OPTIONS)
    cols = np.arange(weight.shape[0])
    choice = _pick(bal_k, copies_k)
    out = screened[where[choice, cols]]
    live = (bal_k[choice, cols] >= here[0]) | (copies_k[choice, cols] <= here[1])
    if live.any():
        out[live] = _polish(out[live], weight[live], origin[live], partners=partners[live])
    return out


def _merge_hot_first(
    best: IntArray, bal: FloatArray, alt: IntArray, weight: FloatArray, origin: IntArray
) -> None:
    """Per layer, keep (in place) the refined `sticky_hot_plan` plan `alt` where `_pick` prefers
    it to `best` (balancedness `bal`, updated too)."""
    bal_alt = layer_balancedness(alt, weight)
    take = _second_wins(bal, best, bal_alt, alt, origin)
    best[take] = alt[take]
    bal[take] = bal_alt[take]


def _rescue(
    best: IntArray,
    weight: FloatArray,
    origin: IntArray,
    weak: IntArray,
    plans: IntArray,
    kind: IntArray,
    row: IntArray,
    orphaned: BoolArray,
) -> bool:
    """Layers of `weak` (each with an option of `plans`) still below RESCUE_BELOW after the
    search get every option refined in full (screening can drop the one option that does
    not stall), kept where `_pick` prefers it. Only layers all options leave short reach
    `fallback.fallback`, whose fresh plans cost several times the copies. Returns whether
    a layer took an option."""
    short = layer_balancedness(best[weak], weight[weak]) < RESCUE_BELOW
    if not short.any():
        return False
    at = np.full(weak.size, -1)
    at[np.flatnonzero(short)] = np.arange(int(short.sum()))
    mine = at[row] >= 0
    sub_rows = weak[row[mine]]
    w_sub, o_sub, p_sub = weight[sub_rows], origin[sub_rows], orphaned[sub_rows]
    tried = refine_fully(plans[mine], w_sub, o_sub, p_sub)
    layers = weak[short]
    bal_k, copies_k, where = _scores(
        tried, weight[layers], origin[layers], kind[mine], at[row[mine]], OPTIONS
    )
    # every layer has at least one option, so each pick is a real plan
    choice = _pick(bal_k, copies_k)
    cols = np.arange(layers.size)
    candidate = tried[where[choice, cols]]
    here = layer_balancedness(best[layers], weight[layers])
    take = _second_wins(here, best[layers], bal_k[choice, cols], candidate, origin[layers])
    best[layers[take]] = candidate[take]
    return bool(take.any())


def refine_fully(
    plans: IntArray, weight: FloatArray, origin: IntArray, partners: BoolArray
) -> IntArray:
    """Start plans [N, R, S] refined as the rescue refines every option: with the copy
    penalty (FEW_SLOTS_LIGHT_RANKS light ranks when a rank has few slots), then to FINISH_AT
    at the discounted penalty. `partners` [N] marks rows with orphans (see `refine`)."""
    return _finish(
        _polish(plans, weight, origin, partners=partners, wider=True), weight, origin, partners
    )


def _unstall(best: IntArray, weight: FloatArray, origin: IntArray, orphaned: BoolArray) -> None:
    """Layers still below CHOOSE_ABOVE refined, in place, for balance alone (no copy price)
    to FINISH_AT, kept where that balances better.

    A priced refinement takes a move only when it lowers the layer's peak by more than the
    move's copies cost, so it stalls when several ranks tie at the peak: unloading one of
    them does not lower the peak yet. Scaling 32 ranks of 9 slots to 64 under Zipf 1.2
    stalls so at 0.973 on every layer; unpriced moves reach 0.990 for 9% more copies."""
    short = np.flatnonzero(layer_balancedness(best, weight) < CHOOSE_ABOVE)
    if short.size == 0:
        return
    tried = refine(
        best[short],
        weight[short],
        origin[short],
        stop_at=FINISH_AT,
        max_steps=REFINE_STEPS,
        light_ranks=FINISH_LIGHT_RANKS,
        partners=orphaned[short],
    )
    gain = layer_balancedness(tried, weight[short]) > layer_balancedness(best[short], weight[short])
    best[short[gain]] = tried[gain]


def _finish(
    phy: IntArray, weight: FloatArray, origin: IntArray, partners: BoolArray | None = None
) -> IntArray:
    """`refine` to FINISH_AT with the copy penalty scaled by FINISH_DISCOUNT."""
    return refine(
        phy,
        weight,
        origin,
        penalty=COPY_PENALTY * FINISH_DISCOUNT,
        stop_at=FINISH_AT,
        max_steps=REFINE_STEPS,
        light_ranks=FINISH_LIGHT_RANKS,
        partners=partners,
    )
