"""Migration-aware rescale: from the current placement to one for a new rank count.

Surviving replicas stay in their slots ("sticky"); the planner only decides which redundant
replicas to drop, what goes into the free and new slots, and then buys balance with a
bounded number of swaps, each charged for the weight copies it adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from eep_controller.planner.packing import (
    count_replicas,
    fill_free_slots,
    holdings,
    slot_weights,
)
from eep_controller.planner.placement import (
    REPLICA_CAPS,
    Placement,
    layer_balancedness,
    plan_batch,
)
from eep_controller.planner.refinement import refine
from eep_controller.planner.replication import filler_counts, greedy_counts
from eep_controller.planner.validation import (
    FloatArray,
    IntArray,
    checked_capacity,
    checked_load,
    checked_positive,
    checked_ranks,
)

# Gain (in mean rank loads) a swap must bring for each weight copy it adds.
COPY_PENALTY = 0.005
# A layer stops buying balance with copies once it balances this well.
GOOD_ENOUGH = 0.991
REFINE_STEPS = 150
# Layers still below this after the sticky plan are re-planned from scratch and relabelled,
# and the fresh plan is kept when it balances better by more than FALLBACK_GAIN, within a
# total of FALLBACK_BUDGET x the copy lower bound.
FALLBACK_BELOW = 0.97
FALLBACK_GAIN = 0.01
FALLBACK_BUDGET = 3.0
LIGHT_RANKS = 3
# A candidate plan balancing at least this well competes on copies alone.
CHOOSE_ABOVE = 0.99
# Layers still below CHOOSE_ABOVE after the search are refined to FINISH_AT with the copy
# penalty scaled by FINISH_DISCOUNT.
FINISH_AT = 0.991
FINISH_DISCOUNT = 0.2
# Layers the sticky plan balances at least this well skip the replica-count search when the
# finishing refinement lifts them to CHOOSE_ABOVE.
NEAR_ENOUGH = 0.98
# Refinement steps each replica-count option gets before the most promising is chosen.
SCREEN_STEPS = 40
# Options per layer still screened after the first half of the screening steps.
SCREEN_KEEP = 2


@dataclass(frozen=True, order=True)
class Transfer:
    """One expert weight copy: `src_rank` in the old numbering (-1 = reload from checkpoint),
    `dst_rank` in the new numbering, `dst_slot` the slot index within the destination rank."""

    layer: int
    expert: int
    src_rank: int
    dst_rank: int
    dst_slot: int


@dataclass(frozen=True)
class RescalePlan:
    """A new placement (new numbering), where each old rank went, and the copies to make."""

    placement: Placement
    rank_map: IntArray  # int64 [old R]: new rank index, or -1 when the rank leaves
    transfers: list[Transfer]
    stats: dict[str, float] = field(default_factory=dict)


def choose_removed_ranks(
    current: Placement,
    load: npt.ArrayLike | None,
    count: int,
    failed_ranks: Sequence[int] = (),
) -> tuple[int, ...]:
    """The `count` ranks cheapest to remove (besides the failed ones), sorted.

    Greedy: each pick orphans the fewest (layer, expert) pairs given the ranks already gone;
    ties go to the rank carrying the least load, then to the highest index.
    """
    failed = checked_ranks("failed_ranks", failed_ranks, current.num_ranks)
    if count < 0 or count > current.num_ranks - len(failed) - 1:
        raise ValueError(
            f"cannot remove {count} ranks from {current.num_ranks} with {len(failed)} failed"
        )
    phy = current.by_rank()
    has = holdings(phy, current.num_experts)  # [L, R, E]
    if load is None:
        weight = np.zeros((current.num_layers, current.num_experts))
    else:
        weight = checked_load(load, num_layers=current.num_layers, num_experts=current.num_experts)
    rank_load = slot_weights(phy, weight, current.replica_counts()).sum(axis=(0, 2))
    gone = np.zeros(current.num_ranks, dtype=bool)
    gone[list(failed)] = True
    # per (layer, expert): how many live ranks hold it and the sum of their indices, which
    # for a pair with one live holder is that holder
    live = has & ~gone[None, :, None]
    live_count = live.sum(axis=1).ravel()
    rank_ids = np.arange(current.num_ranks)
    index_sum = (live * rank_ids[None, :, None]).sum(axis=1).ravel()
    by_rank = has.transpose(1, 0, 2).reshape(current.num_ranks, -1)
    chosen: list[int] = []
    for _ in range(count):
        alone = live_count == 1
        orphans = np.bincount(index_sum[alone], minlength=current.num_ranks)
        key = np.where(gone, np.inf, orphans.astype(np.float64))
        best = np.flatnonzero(key == key.min())
        tied_load = rank_load[best]
        best = best[tied_load == tied_load.min()]
        pick = int(best[-1])
        gone[pick] = True
        live_count -= by_rank[pick]
        index_sum -= pick * by_rank[pick]
        chosen.append(pick)
    return tuple(sorted(chosen))


def _departures(
    current: Placement,
    load: FloatArray,
    new_num_ranks: int,
    removed_ranks: Sequence[int] | None,
    failed_ranks: Sequence[int],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validated (removed, failed) ranks; chooses the removed ones when not given."""
    old = current.num_ranks
    failed = checked_ranks("failed_ranks", failed_ranks, old)
    if removed_ranks is None:
        need = max(0, old - len(failed) - new_num_ranks)
        removed = choose_removed_ranks(current, load, need, failed) if need else ()
    else:
        removed = checked_ranks("removed_ranks", removed_ranks, old)
        both = sorted(set(removed) & set(failed))
        if both:
            raise ValueError(f"removed_ranks and failed_ranks both name rank(s) {both}")
    survivors = old - len(removed) - len(failed)
    if survivors < 1:
        raise ValueError("removed_ranks and failed_ranks leave no surviving rank")
    if survivors > new_num_ranks:
        raise ValueError(
            f"{survivors} ranks survive, more than new_num_ranks={new_num_ranks}; "
            f"name more removed_ranks"
        )
    return removed, failed


def copy_lower_bound(
    current: Placement,
    new_num_ranks: int,
    removed_ranks: Sequence[int] | None = None,
    failed_ranks: Sequence[int] = (),
) -> int:
    """Fewest weight copies any plan with S fixed per rank needs, summed over layers.

    Per layer: every slot of an appended rank must be written (new ranks x S), and every
    expert left with no replica on a surviving rank (an orphan) must be written somewhere;
    orphans can land in new slots, so the layer needs max(new ranks x S, orphans). Pure
    scale-up gives L x new ranks x S; scale-down or failure gives the orphan count. With
    `removed_ranks=None` the ranks `choose_removed_ranks` would pick (on zero load) are used.
    """
    zero = np.zeros((current.num_layers, current.num_experts))
    removed, failed = _departures(current, zero, new_num_ranks, removed_ranks, failed_ranks)
    gone = set(removed) | set(failed)
    survivors = [r for r in range(current.num_ranks) if r not in gone]
    new_slots = (new_num_ranks - len(survivors)) * current.slots_per_rank
    kept = count_replicas(current.by_rank()[:, survivors], current.num_experts)
    orphans = (kept == 0).sum(axis=1)
    return int(np.maximum(orphans, new_slots).sum())


def _add_replicas(phy: IntArray, weight: FloatArray, counts: IntArray, total: int) -> None:
    """Raise counts, in place, until each row wants `total` replicas (slots stay free).

    While the hottest placed rank is above the mean rank load, the next replica goes to one
    of its experts, which unloads it without moving anything; otherwise to any expert. Among
    those, the pick is the expert whose new share is closest to what each remaining free
    slot should carry for the free slots to end at the mean rank load. An expert never gets
    more pending replicas than there are ranks with a free slot that lack it.
    """
    batch, num_experts = weight.shape
    has = holdings(phy, num_experts)
    free_rank = np.any(phy < 0, axis=2)  # [B, R]
    free_count = free_rank.sum(axis=1).astype(np.float64)
    room = (free_rank[:, :, None] & ~has).sum(axis=1)  # [B, E]
    pending = counts - count_replicas(phy, num_experts)
    level = weight.sum(axis=1) / phy.shape[1]
    missing = total - counts.sum(axis=1)
    all_loads = slot_weights(phy, weight, counts).sum(axis=2)
    # kept up to date as counts grow: share now, share with one more replica, which experts
    # may still grow, and the load the pending replicas already claim
    share = weight / counts
    after = weight / (counts + 1)
    growable = pending < room
    claimed = (pending * share).sum(axis=1)
    rows = np.arange(batch)
    safe = np.maximum(phy, 0)
    placed = phy >= 0
    for _ in range(int(missing.max(initial=0))):
        todo = np.flatnonzero(missing > 0)
        if todo.size == 0:
            break
        hot = np.argmax(all_loads, axis=1)
        # the share each remaining free slot should carry for free slots to end at the mean
        target = np.maximum(free_count * level - claimed, 0.0) / np.maximum(missing, 1)
        fit = np.where(growable, -np.abs(after - target[:, None]), -np.inf)
        on_hot = safe[rows, hot]  # [B, S]
        local_fit = np.where(placed[rows, hot], np.take_along_axis(fit, on_hot, axis=1), -np.inf)
        best_local = np.argmax(local_fit, axis=1)
        usable = (all_loads[rows, hot] > level) & np.isfinite(local_fit[rows, best_local])
        expert = np.where(usable, on_hot[rows, best_local], np.argmax(fit, axis=1))[todo]
        # every placed replica of the expert now carries a smaller share
        old, new = share[todo, expert], after[todo, expert]
        all_loads[todo] -= has[todo, :, expert] * (old - new)[:, None]
        claimed[todo] += (pending[todo, expert] + 1) * new - pending[todo, expert] * old
        counts[todo, expert] += 1
        pending[todo, expert] += 1
        share[todo, expert] = new
        after[todo, expert] = weight[todo, expert] / (counts[todo, expert] + 1)
        growable[todo, expert] = pending[todo, expert] < room[todo, expert]
        missing[todo] -= 1


def _choose_sources(old_has: npt.NDArray[np.bool_], layer: IntArray, expert: IntArray) -> IntArray:
    """A live old holder for each copy, spreading the sends; -1 when no live rank holds it."""
    num_old = old_has.shape[1]
    holders = old_has[layer, :, expert]  # [T, R_old]
    count = holders.sum(axis=1)
    src = np.full(layer.size, -1, dtype=np.int64)
    sent = np.zeros(num_old)
    order = np.lexsort((np.arange(layer.size), count))
    order = order[count[order] > 0]
    # a copy with one live holder has no choice
    forced = order[count[order] == 1]
    src[forced] = np.argmax(holders[forced], axis=1)
    sent += np.bincount(src[forced], minlength=num_old)
    order = order[count[order] > 1]
    chunk = max(1, num_old // 2)
    rank_ids = np.arange(num_old)
    for start in range(0, order.size, chunk):
        idx = order[start : start + chunk]
        # rotate tie-breaks so one chunk does not pile onto one rank
        tie = ((rank_ids[None, :] - np.arange(idx.size)[:, None]) % num_old) / (2.0 * num_old)
        cost = np.where(holders[idx], sent[None, :] + tie, np.inf)
        pick = np.argmin(cost, axis=1)
        src[idx] = pick
        sent += np.bincount(pick, minlength=num_old)
    return src


def _target_counts(phy: IntArray, weight: FloatArray, total: int) -> IntArray:
    """Replica counts to aim for: every surviving replica (orphans get one), trimmed to
    `total` by the greedy in reverse (drop where the remaining share stays smallest)."""
    counts = np.maximum(count_replicas(phy, weight.shape[1]), 1)
    excess = counts.sum(axis=1) - total
    for _ in range(int(excess.max(initial=0))):
        rows = np.flatnonzero(excess > 0)
        if rows.size == 0:
            break
        cnt = counts[rows]
        loss = np.where(cnt >= 2, weight[rows] / np.maximum(cnt - 1, 1), np.inf)
        counts[rows, np.argmin(loss, axis=1)] -= 1
        excess[rows] -= 1
    return counts


def _drop_surplus(phy: IntArray, weight: FloatArray, counts: IntArray) -> None:
    """Free, in place, the slots of replicas beyond `counts`: on the hottest rank holding a
    surplus replica, the one carrying the largest share, until no surplus is left."""
    batch = phy.shape[0]
    surplus = count_replicas(phy, weight.shape[1]) - counts
    left = np.maximum(surplus, 0).sum(axis=1)
    share = slot_weights(phy, weight, counts)  # fixed: the counts are the target ones
    loads = share.sum(axis=2)
    safe = np.maximum(phy, 0).reshape(batch, -1)
    # over[b, r, s]: the slot holds a replica its expert has too many of
    over = (phy >= 0) & (np.take_along_axis(surplus, safe, axis=1).reshape(phy.shape) > 0)
    todo = np.flatnonzero(left > 0)
    while todo.size:
        n = np.arange(todo.size)
        sub = over[todo]
        rank = np.argmax(np.where(sub.any(axis=2), loads[todo], -np.inf), axis=1)
        slot = np.argmax(np.where(sub[n, rank], share[todo, rank], -np.inf), axis=1)
        expert = phy[todo, rank, slot]
        phy[todo, rank, slot] = -1
        over[todo, rank, slot] = False
        loads[todo, rank] -= share[todo, rank, slot]
        share[todo, rank, slot] = 0.0
        surplus[todo, expert] -= 1
        left[todo] -= 1
        # an expert back at its count: its other replicas are no longer surplus
        settled = surplus[todo, expert] == 0
        if settled.any():
            rows = todo[settled]
            over[rows] &= phy[rows] != expert[settled][:, None, None]
        todo = todo[left[todo] > 0]


def _sticky(phy: IntArray, weight: FloatArray, total: int) -> IntArray:
    """Keep every surviving replica the trimmed counts still want, add replicas (see
    `_add_replicas`) until the counts fill `total` slots, and pack them into the free slots."""
    phy = phy.copy()
    counts = _target_counts(phy, weight, total)
    _drop_surplus(phy, weight, counts)
    _add_replicas(phy, weight, counts, total)
    return fill_free_slots(phy, weight, counts)


def _retargeted(phy: IntArray, weight: FloatArray, counts: IntArray) -> IntArray:
    """Reach the replica `counts` planned for the new size with the fewest slot changes:
    keep the surviving replicas still wanted, free the surplus (hottest ranks first), and
    pack only the missing replicas into the free slots."""
    phy = phy.copy()
    _drop_surplus(phy, weight, counts)
    return fill_free_slots(phy, weight, counts)


def _retarget_options(phy: IntArray, weight: FloatArray) -> tuple[IntArray, IntArray, IntArray]:
    """`_retargeted` plans for the replica-count options planned for the new size: the
    greedy and one filler split per cap of `REPLICA_CAPS` (see `filler_counts`).

    Returns the plans [N, R, S], the option index [N] and the row [N] of each; an option
    whose counts equal an earlier option's for the same row (same plan) is left out."""
    ranks, slots = phy.shape[1:]
    total = ranks * slots
    level = weight.sum(axis=1) / ranks
    options = [greedy_counts(weight, total, ranks)]
    options += [filler_counts(weight, total, ranks, cap * level) for cap in REPLICA_CAPS]
    counts = np.stack(options)  # [K, B, E]
    repeat = np.zeros(counts.shape[:2], dtype=bool)
    for k in range(1, counts.shape[0]):
        for j in range(k):
            repeat[k] |= np.all(counts[k] == counts[j], axis=1)
    kind, row = np.nonzero(~repeat)
    return _retargeted(phy[row], weight[row], counts[kind, row]), kind, row


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


def _polish(
    phy: IntArray,
    weight: FloatArray,
    origin: IntArray,
    *,
    steps: int = REFINE_STEPS,
    stop_at: float = GOOD_ENOUGH,
) -> IntArray:
    """`refine` with the rescale settings: copy penalty, stop at GOOD_ENOUGH (screening
    stops at CHOOSE_ABOVE, all `_pick` asks of a candidate)."""
    return refine(
        phy,
        weight,
        origin,
        penalty=COPY_PENALTY,
        stop_at=stop_at,
        max_steps=steps,
        light_ranks=LIGHT_RANKS,
    )


def _best_candidate(phy: IntArray, weight: FloatArray, origin: IntArray) -> IntArray:
    """The sticky plan (see `_sticky`), refined with the copy penalty. Layers it leaves below
    CHOOSE_ABOVE (skewed ones) also get the replica-count search: the distinct
    `_retarget_options`, screened by a short refinement, the most promising refined fully;
    per layer the better plan by `_pick` is kept."""
    total = phy.shape[1] * phy.shape[2]
    best = _polish(_sticky(phy, weight, total), weight, origin)
    bal = layer_balancedness(best, weight)
    weak = np.flatnonzero(bal < CHOOSE_ABOVE)
    if weak.size == 0:
        return best
    # layers the sticky plan left close to CHOOSE_ABOVE buy the rest at a lower price
    near = weak[bal[weak] >= NEAR_ENOUGH]
    if near.size:
        done = _finish(best[near], weight[near], origin[near])
        reached = layer_balancedness(done, weight[near]) >= CHOOSE_ABOVE
        best[near[reached]] = done[reached]
        bal[near[reached]] = CHOOSE_ABOVE
        weak = np.flatnonzero(bal < CHOOSE_ABOVE)
        if weak.size == 0:
            return best
    w_weak, o_weak = weight[weak], origin[weak]
    plans, kind, row = _retarget_options(phy[weak], w_weak)
    kinds = len(REPLICA_CAPS) + 1
    # screening by successive halving: every option a few steps, the best SCREEN_KEEP of
    # each layer as many again, then the best of those
    first = SCREEN_STEPS // 2
    screened = _polish(plans, w_weak[row], o_weak[row], steps=first, stop_at=CHOOSE_ABOVE)
    bal_k, copies_k, where = _scores(screened, w_weak, o_weak, kind, row, kinds)
    order = _preference(bal_k, copies_k)[:SCREEN_KEEP]  # [keep, B]
    present = np.isfinite(np.take_along_axis(bal_k, order, axis=0))
    kept_kind, kept_row = order[present], np.nonzero(present)[1]
    again = screened[where[kept_kind, kept_row]]
    screened = _polish(
        again, w_weak[kept_row], o_weak[kept_row], steps=SCREEN_STEPS - first, stop_at=CHOOSE_ABOVE
    )
    bal_k, copies_k, where = _scores(screened, w_weak, o_weak, kept_kind, kept_row, kinds)
    choice = _pick(bal_k, copies_k)
    other = _polish(screened[where[choice, np.arange(weak.size)]], w_weak, o_weak)
    bal2 = np.stack([bal[weak], layer_balancedness(other, w_weak)])
    copies2 = np.stack([(x != o_weak).sum(axis=(1, 2)) for x in (best[weak], other)])
    take = _pick(bal2, copies2) == 1
    best[weak[take]] = other[take]
    # layers the copy penalty left just short of CHOOSE_ABOVE buy the rest at a lower price
    short = weak[np.maximum(bal2[0], bal2[1]) < CHOOSE_ABOVE]
    if short.size:
        best[short] = _finish(best[short], weight[short], origin[short])
    return best


def _finish(phy: IntArray, weight: FloatArray, origin: IntArray) -> IntArray:
    """`refine` to FINISH_AT with the copy penalty scaled by FINISH_DISCOUNT."""
    return refine(
        phy,
        weight,
        origin,
        penalty=COPY_PENALTY * FINISH_DISCOUNT,
        stop_at=FINISH_AT,
        max_steps=REFINE_STEPS,
        light_ranks=LIGHT_RANKS,
    )


def _relabel(fresh: IntArray, origin: IntArray) -> IntArray:
    """`fresh` [B, R, S] with its ranks re-ordered, and slots within a rank permuted, to
    keep as many experts as possible where `origin` already has them (greedy matching of
    ranks by overlap, then each kept expert back in its old slot)."""
    batch, ranks = fresh.shape[:2]
    num_experts = int(max(fresh.max(), origin.max())) + 1
    f_has = holdings(fresh, num_experts).astype(np.float32)
    o_has = holdings(origin, num_experts).astype(np.float32)
    overlap = np.einsum("bie,bje->bij", f_has, o_has)  # fresh rank i vs current rank j
    out = np.empty_like(fresh)
    for b in range(batch):
        score = overlap[b].copy()
        for _ in range(ranks):
            i, j = divmod(int(np.argmax(score)), ranks)
            score[i, :] = -1.0
            score[:, j] = -1.0
            wanted = fresh[b, i]
            old = origin[b, j]
            stay = np.isin(old, wanted) & (old >= 0)
            row = np.where(stay, old, -1)
            row[~stay] = wanted[~np.isin(wanted, old[stay])]
            out[b, j] = row
    return out


def _fallback(phy: IntArray, weight: FloatArray, origin: IntArray, lower_bound: int) -> None:
    """Re-plan, in place, layers the sticky plan balanced below FALLBACK_BELOW, keeping a
    fresh (relabelled) plan where it balances better, best gain per extra copy first, while
    the total stays within FALLBACK_BUDGET x the copy lower bound."""
    before = layer_balancedness(phy, weight)
    weak = np.flatnonzero(before < FALLBACK_BELOW)
    if weak.size == 0:
        return
    fresh = _relabel(plan_batch(weight[weak], phy.shape[1], phy.shape[2]), origin[weak])
    gain = layer_balancedness(fresh, weight[weak]) - before[weak]
    copies = (phy != origin).sum(axis=(1, 2))
    extra = (fresh != origin[weak]).sum(axis=(1, 2)) - copies[weak]
    budget = FALLBACK_BUDGET * max(lower_bound, 1) - int(copies.sum())
    for k in np.lexsort((np.arange(weak.size), -gain / np.maximum(extra, 1))):
        if gain[k] <= FALLBACK_GAIN or extra[k] > budget:
            continue
        phy[weak[k]] = fresh[k]
        budget -= int(extra[k])


def plan_rescale(
    current: Placement,
    load: npt.ArrayLike,
    new_num_ranks: int,
    *,
    removed_ranks: Sequence[int] | None = None,
    failed_ranks: Sequence[int] = (),
    num_nodes: int = 1,
    num_groups: int | None = None,
) -> RescalePlan:
    """Plan the move from `current` to `new_num_ranks` ranks with S slots each.

    Surviving ranks (neither removed nor failed) are renumbered compactly in order; new ranks
    are appended. `removed_ranks` (graceful; still able to send) are chosen when None.
    `failed_ranks` cannot send: an expert whose every live copy is gone is reloaded from the
    checkpoint (src_rank -1). Same rank count and no departures is a rebalance. Surviving
    replicas keep their slots unless moving them buys enough balance. Deterministic.
    `num_nodes` and `num_groups` are accepted for symmetry with `plan_placement`; the
    rescale itself is global (locality is not enforced).
    """
    if not isinstance(current, Placement):
        raise ValueError("current must be a Placement")
    weight = checked_load(load, num_layers=current.num_layers, num_experts=current.num_experts)
    new_ranks = checked_positive("new_num_ranks", new_num_ranks)
    checked_positive("num_nodes", num_nodes)
    if num_groups is not None:
        checked_positive("num_groups", num_groups)
    slots = current.slots_per_rank
    num_experts = current.num_experts
    checked_capacity(new_ranks, slots, num_experts)
    removed, failed = _departures(current, weight, new_ranks, removed_ranks, failed_ranks)
    gone = set(removed) | set(failed)
    survivors = np.array([r for r in range(current.num_ranks) if r not in gone], dtype=np.int64)
    rank_map = np.full(current.num_ranks, -1, dtype=np.int64)
    rank_map[survivors] = np.arange(survivors.size)
    layers = current.num_layers

    old = current.by_rank()
    origin = np.full((layers, new_ranks, slots), -1, dtype=np.int64)
    origin[:, : survivors.size] = old[:, survivors]
    phy = origin.copy()
    # a rank holding one expert twice keeps only the first
    ordered = np.argsort(phy, axis=2, kind="stable")
    sorted_vals = np.take_along_axis(phy, ordered, axis=2)
    repeat = np.zeros_like(phy, dtype=bool)
    repeat[..., 1:] = (sorted_vals[..., 1:] == sorted_vals[..., :-1]) & (sorted_vals[..., 1:] >= 0)
    dup = np.zeros_like(repeat)
    np.put_along_axis(dup, ordered, repeat, axis=2)
    phy[dup] = -1

    phy = _best_candidate(phy, weight, origin)

    lower_bound = copy_lower_bound(current, new_ranks, removed, failed)
    _fallback(phy, weight, origin, lower_bound)

    changed = np.argwhere(phy != origin)  # rows of (layer, dst_rank, dst_slot), sorted
    layer_of, dst_rank, dst_slot = changed[:, 0], changed[:, 1], changed[:, 2]
    expert_of = phy[layer_of, dst_rank, dst_slot]
    old_has = holdings(old, num_experts)
    if failed:
        old_has[:, list(failed), :] = False
    src = _choose_sources(old_has, layer_of, expert_of)
    transfers = [
        Transfer(int(lay), int(exp), int(s), int(dr), int(ds))
        for lay, exp, s, dr, ds in zip(
            layer_of.tolist(),
            expert_of.tolist(),
            src.tolist(),
            dst_rank.tolist(),
            dst_slot.tolist(),
            strict=True,
        )
    ]
    placement = Placement(phy.reshape(layers, -1), slots, num_experts=num_experts)
    stats: dict[str, float] = {
        "copies": len(transfers),
        "lower_bound": lower_bound,
        "balancedness_before": float(layer_balancedness(old, weight).mean()),
        "balancedness_after": float(layer_balancedness(phy, weight).mean()),
        "checkpoint_reloads": int((src < 0).sum()),
        "removed_ranks": len(removed),
        "failed_ranks": len(failed),
        "new_ranks": int(new_ranks - survivors.size),
    }
    return RescalePlan(placement, rank_map, transfers, stats)


def apply_transfers(old: Placement, plan: RescalePlan) -> IntArray:
    """The old placement re-indexed through `plan.rank_map` with every transfer written.

    Returns int64 [L, new R * S]; a slot nobody wrote stays -1. Equals
    `plan.placement.phy2log` for a correct plan.
    """
    new_ranks = plan.placement.num_ranks
    slots = old.slots_per_rank
    out = np.full((old.num_layers, new_ranks, slots), -1, dtype=np.int64)
    keep = np.flatnonzero(plan.rank_map >= 0)
    out[:, plan.rank_map[keep]] = old.by_rank()[:, keep]
    for t in plan.transfers:
        out[t.layer, t.dst_rank, t.dst_slot] = t.expert
    return out.reshape(old.num_layers, -1)
