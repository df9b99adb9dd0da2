"""Filling free slots with pending replicas: heaviest first onto the lightest rank (LPT).

Placements inside the planner are batched as int64 [B, R, S] arrays (B = layers, or layers x
candidates); -1 marks a free slot. Every function here keeps "no rank holds two replicas of
one expert" and exactly S slots per rank.
"""

from __future__ import annotations

import numpy as np

from eep_controller.planner.validation import BoolArray, FloatArray, IntArray


def count_replicas(phy: IntArray, num_experts: int) -> IntArray:
    """Replicas per expert [B, E] of a batched placement [B, R, S]; free slots (-1) ignored."""
    batch = phy.shape[0]
    flat = phy.reshape(batch, -1)
    offsets = (np.arange(batch, dtype=np.int64) * num_experts)[:, None]
    ids = np.where(flat >= 0, flat + offsets, batch * num_experts)
    counts = np.bincount(ids.ravel(), minlength=batch * num_experts + 1)
    return counts[: batch * num_experts].reshape(batch, num_experts).astype(np.int64)


def holdings(phy: IntArray, num_experts: int) -> BoolArray:
    """has[b, r, e]: rank r holds a replica of expert e in row b (free slots ignored)."""
    batch, ranks, _ = phy.shape
    has = np.zeros((batch, ranks, num_experts + 1), dtype=bool)
    b_idx = np.arange(batch)[:, None, None]
    r_idx = np.arange(ranks)[None, :, None]
    has[b_idx, r_idx, np.where(phy >= 0, phy, num_experts)] = True
    return has[:, :, :num_experts]


def holders(phy: IntArray, num_experts: int) -> BoolArray:
    """held[b, e, r] = has[b, r, e] of `holdings`, C-contiguous: the holders of one expert
    are one contiguous row."""
    batch, ranks, _ = phy.shape
    held = np.zeros((batch, num_experts + 1, ranks), dtype=bool)
    b_idx = np.arange(batch)[:, None, None]
    r_idx = np.arange(ranks)[None, :, None]
    held[b_idx, np.where(phy >= 0, phy, num_experts), r_idx] = True
    return np.ascontiguousarray(held[:, :num_experts])


def slot_weights(phy: IntArray, weight: FloatArray, counts: IntArray) -> FloatArray:
    """Load carried by each slot [B, R, S]: its expert's load split over the expert's replicas."""
    placed = phy >= 0
    # flat takes: faster than indexing [B, E] with a broadcast row index
    at = np.where(placed, phy, 0) + (np.arange(phy.shape[0]) * weight.shape[1])[:, None, None]
    w = np.ascontiguousarray(weight).reshape(-1).take(at)
    c = np.ascontiguousarray(counts).reshape(-1).take(at)
    return np.where(placed, w / np.maximum(c, 1), 0.0)


def least_copies(origin: IntArray, num_experts: int) -> IntArray:
    """Fewest weight copies [B] any plan of `origin`'s shape [B, R, S] needs per layer, S
    fixed per rank: every new slot (-1) must be written, and every expert `origin` lacks (an
    orphan) must be written somewhere; orphans can land in new slots, so a layer needs
    max(new slots, orphans)."""
    new_slots = (origin < 0).sum(axis=(1, 2))
    orphans = (count_replicas(origin, num_experts) == 0).sum(axis=1)
    least: IntArray = np.maximum(new_slots, orphans)
    return least


def fill_free_slots(phy: IntArray, weight: FloatArray, counts: IntArray) -> IntArray:
    """Fill every free slot of `phy` so that expert e ends with `counts[b, e]` replicas.

    Pending replicas go heaviest first to the lightest rank that has a free slot and does not
    hold the expert yet; the rare dead end is fixed afterwards by `separate_duplicates`. The
    number of free slots of each row must equal its number of pending replicas.
    """
    phy = phy.copy()
    batch = phy.shape[0]
    num_experts = weight.shape[1]
    pending = counts - count_replicas(phy, num_experts)
    if np.any(pending < 0):
        raise AssertionError("placement holds more replicas than the target counts")
    per_row = pending.sum(axis=1)
    if per_row.max(initial=0) == 0:
        return phy
    row_of = np.repeat(np.repeat(np.arange(batch), num_experts), pending.ravel())
    expert_of = np.repeat(np.tile(np.arange(num_experts), batch), pending.ravel())
    item_w = weight[row_of, expert_of] / counts[row_of, expert_of]
    starts = np.concatenate(([0], np.cumsum(per_row)[:-1]))
    pos = np.arange(row_of.size) - starts[row_of]
    width = int(per_row.max())
    items = np.full((batch, width), -1, dtype=np.int64)
    items_w = np.zeros((batch, width))
    items[row_of, pos] = expert_of
    items_w[row_of, pos] = item_w
    # each row heaviest first; a stable sort keeps equal shares in expert order, and the
    # padding goes last
    order = np.argsort(np.where(items >= 0, -items_w, np.inf), axis=1, kind="stable")
    items = np.take_along_axis(items, order, axis=1)
    items_w = np.take_along_axis(items_w, order, axis=1)

    # rows by pending replicas, most first, so the rows still filling are always a prefix
    by_need = np.argsort(-per_row, kind="stable")
    need = per_row[by_need]
    items, items_w = items[by_need], items_w[by_need]
    work = phy[by_need]
    # expert-major holdings [B, E, R]: the holders of one expert are one contiguous row
    held = holders(work, num_experts)
    held_rows = held.reshape(-1, held.shape[2])  # a view: one expert's holders per row
    loads = slot_weights(work, weight[by_need], counts[by_need]).sum(axis=2)
    free = (work < 0).sum(axis=2)
    # the load of each rank with a free slot, inf for full ones (kept up to date)
    avail = np.where(free > 0, loads, np.inf)
    # each rank fills its free slots in slot order: the n-th replica it takes goes to the
    # n-th free slot (a stable sort puts the free slots first, in order)
    free_slots = np.argsort(work >= 0, axis=2, kind="stable")
    taken = np.zeros_like(free)
    stuck_rows = np.zeros(batch, dtype=bool)  # in `by_need` order
    for k in range(width):
        m = int(np.count_nonzero(need > k))
        if m == 0:
            break
        n = np.arange(m)
        expert = items[:m, k]
        cost = np.where(held_rows.take(n * num_experts + expert, axis=0), np.inf, avail[:m])
        rank = np.argmin(cost, axis=1)
        stuck = np.isinf(cost[n, rank])
        if stuck.any():
            stuck_rows[:m] |= stuck
            rank = np.where(stuck, np.argmin(avail[:m], axis=1), rank)
        slot = free_slots[n, rank, taken[n, rank]]
        work[n, rank, slot] = expert
        loads[n, rank] += items_w[:m, k]
        free[n, rank] -= 1
        avail[n, rank] = np.where(free[n, rank] > 0, loads[n, rank], np.inf)
        taken[n, rank] += 1
        held[n, expert, rank] = True
    phy[by_need] = work
    if stuck_rows.any():
        rows = np.sort(by_need[stuck_rows])
        sub = phy[rows]
        separate_duplicates(sub, weight[rows], counts[rows])
        phy[rows] = sub
    return phy


def fill_empty(weight: FloatArray, counts: IntArray, num_ranks: int, slots: int) -> IntArray:
    """Place `counts` [B, E] replicas on empty ranks, one replica per rank per round.

    Replicas sorted heaviest first are dealt in rounds of R: in each round the heaviest goes
    to the rank with the least load so far. Each rank ends with exactly `slots` replicas.
    """
    batch, num_experts = weight.shape
    items, item_w = _heaviest_first(weight, counts)
    phy = np.empty((batch, num_ranks, slots), dtype=np.int64)
    loads = np.zeros((batch, num_ranks))
    has = np.zeros((batch, num_ranks, num_experts), dtype=bool)
    rows = np.arange(batch)[:, None]
    for k in range(slots):
        ranks = np.argsort(loads, axis=1, kind="stable")
        chunk = slice(k * num_ranks, (k + 1) * num_ranks)
        dealt = items[:, chunk]
        _untangle_round(ranks, dealt, has)
        phy[rows, ranks, k] = dealt
        loads[rows, ranks] += item_w[:, chunk]
        has[rows, ranks, dealt] = True
    separate_duplicates(phy, weight, counts)
    return phy


def _heaviest_first(weight: FloatArray, counts: IntArray) -> tuple[IntArray, FloatArray]:
    """Every replica of `counts` [B, E] as (expert [B, N], share [B, N]), heaviest share
    first; the expert id breaks ties."""
    share = weight / np.maximum(counts, 1)
    order = np.lexsort((np.broadcast_to(np.arange(weight.shape[1]), share.shape), -share), axis=1)
    reps = np.take_along_axis(counts, order, axis=1)
    items = np.repeat(order.ravel(), reps.ravel()).reshape(weight.shape[0], -1)
    return items, np.take_along_axis(share, items, axis=1)


def fill_lpt(weight: FloatArray, counts: IntArray, num_ranks: int, slots: int) -> IntArray:
    """Place `counts` [B, E] replicas on empty ranks by plain LPT: heaviest first, each to
    the lightest rank with a free slot that lacks its expert (any rank with a free slot when
    none lacks it; `separate_duplicates` then swaps the repeats away).

    Unlike `fill_empty`'s rounds, a light rank may take several replicas in a row, which
    packs better when a few large replicas must share ranks (heavy skew, few spare slots).
    """
    batch, num_experts = weight.shape
    items, item_w = _heaviest_first(weight, counts)
    # flat views throughout: one `take` beats a two-index gather in this per-replica loop
    phy = np.empty((batch, num_ranks, slots), dtype=np.int64)
    phy_flat = phy.reshape(-1)
    # each rank's load, +inf once its slots are full
    open_loads = np.zeros((batch, num_ranks))
    open_flat = open_loads.reshape(-1)
    filled = np.zeros(batch * num_ranks, dtype=np.int64)
    # barred[b * E + e, r]: +inf where rank r holds expert e already (expert-major)
    barred = np.zeros((batch * num_experts, num_ranks))
    barred_flat = barred.reshape(-1)
    rank_base = np.arange(batch) * num_ranks
    expert_base = np.arange(batch) * num_experts
    by_item = np.ascontiguousarray(items.T)
    w_by_item = np.ascontiguousarray(item_w.T)
    # a replica can find every open rank holding its expert only when an earlier replica of
    # the same expert came just before it (replicas of one expert are consecutive)
    repeats = np.zeros(items.shape[1], dtype=bool)
    repeats[1:] = np.any(items[:, 1:] == items[:, :-1], axis=0)
    for k in range(num_ranks * slots):
        at = expert_base + by_item[k]
        lacking = barred.take(at, axis=0)
        lacking += open_loads
        rank = lacking.argmin(axis=1)
        pos = rank_base + rank
        if repeats[k]:
            stuck = np.isinf(lacking.reshape(-1).take(pos))
            if stuck.any():
                rank[stuck] = np.argmin(open_loads[stuck], axis=1)
                pos = rank_base + rank
        slot = filled.take(pos)
        phy_flat[pos * slots + slot] = by_item[k]
        slot += 1
        filled[pos] = slot
        grown = open_flat.take(pos)
        grown += w_by_item[k]
        grown[slot >= slots] = np.inf
        open_flat[pos] = grown
        barred_flat[at * num_ranks + rank] = np.inf
    separate_duplicates(phy, weight, counts)
    return phy


def _untangle_round(ranks: IntArray, dealt: IntArray, has: BoolArray) -> None:
    """Re-pair, in place, ranks of one round so no rank gets an expert it already holds.

    Each conflict swaps ranks with the nearest position of the round that takes both
    replicas; conflicts left (rare) are fixed by `separate_duplicates` afterwards.
    """
    positions = np.arange(ranks.shape[1])
    for _ in range(ranks.shape[1]):
        conflict = has[np.arange(ranks.shape[0])[:, None], ranks, dealt]
        rows = np.flatnonzero(conflict.any(axis=1))
        if rows.size == 0:
            return
        t = np.argmax(conflict[rows], axis=1)
        expert = dealt[rows, t]
        rank_t = ranks[rows, t]
        their = dealt[rows]
        fits = (their != expert[:, None]) & ~has[rows[:, None], rank_t[:, None], their]
        fits &= ~has[rows[:, None], ranks[rows], expert[:, None]]
        distance = np.where(fits, np.abs(positions[None, :] - t[:, None]), ranks.shape[1] + 1)
        u = np.argmin(distance, axis=1)
        movable = fits[np.arange(rows.size), u]
        if not movable.any():
            return
        rows, t, u = rows[movable], t[movable], u[movable]
        ranks[rows, t], ranks[rows, u] = ranks[rows, u], ranks[rows, t]


def separate_duplicates(phy: IntArray, weight: FloatArray, counts: IntArray) -> None:
    """Swap away, in place, every second replica of an expert on one rank.

    While each count is <= R, a rank q lacking the expert exists. Best partner: a slot of
    such a q whose expert the crowded rank lacks (the swap removes one duplicate and makes
    none), the one of most similar load. When every such q only holds experts the crowded
    rank has, q holds a duplicate itself (it has S slots, the crowded rank fewer than S
    distinct experts); swapping with one of q's duplicates still removes one duplicate
    overall, so passes repeat until none is left.
    """
    for _ in range(phy.shape[1] * phy.shape[2] + 1):
        if not _separate_pass(phy, weight, counts):
            return
    raise AssertionError("duplicate replicas left after every pass")


def _repeats(phy: IntArray) -> BoolArray:
    """[..., S] True where a slot repeats an expert an earlier slot of its rank holds."""
    ordered = np.argsort(phy, axis=-1, kind="stable")
    values = np.take_along_axis(phy, ordered, axis=-1)
    repeat = np.zeros(phy.shape, dtype=bool)
    repeat[..., 1:] = values[..., 1:] == values[..., :-1]
    later = np.zeros(phy.shape, dtype=bool)
    np.put_along_axis(later, ordered, repeat, axis=-1)
    return later


def _separate_pass(phy: IntArray, weight: FloatArray, counts: IntArray) -> bool:
    """One pass of `separate_duplicates`; False when there was no duplicate to separate."""
    batch, _, slots = phy.shape
    earlier = np.tri(slots, slots, -1, dtype=bool)  # earlier[s, t]: slot t comes before s
    share = weight / np.maximum(counts, 1)
    # slots repeating an expert an earlier slot of their rank holds, in (row, rank, slot)
    # order; a swap with a fitting partner never makes a duplicate, so within the pass the
    # list only needs checking, not refreshing
    todo = np.argwhere(_repeats(phy))
    if todo.size == 0:
        return False
    per_row = np.bincount(todo[:, 0], minlength=batch)
    start = np.concatenate(([0], np.cumsum(per_row)[:-1]))
    for k in range(int(per_row.max())):
        rows = np.flatnonzero(per_row > k)
        rank, slot = todo[start[rows] + k, 1], todo[start[rows] + k, 2]
        expert = phy[rows, rank, slot]
        # still a repeat: an earlier partner swap may have taken the other copy away
        still = np.any((phy[rows, rank] == expert[:, None]) & earlier[slot], axis=1)
        rows, rank, slot, expert = rows[still], rank[still], slot[still], expert[still]
        if rows.size == 0:
            continue
        n = np.arange(rows.size)
        sub = phy[rows]
        # partner slots: their rank lacks the expert, and the crowded rank lacks theirs
        crowded = np.zeros((rows.size, weight.shape[1] + 1), dtype=bool)
        crowded[n[:, None], phy[rows, rank]] = True
        lacks = ~np.any(sub == expert[:, None, None], axis=2)
        fits = lacks[:, :, None] & ~crowded[n[:, None, None], sub]
        sub_share = share[rows[:, None, None], sub]
        gap = np.where(fits, np.abs(sub_share - share[rows, expert][:, None, None]), np.inf)
        stuck = ~np.isfinite(gap.reshape(rows.size, -1).min(axis=1))
        if stuck.any():
            # no fitting partner: a duplicate of a rank lacking the expert will do
            dup = lacks[stuck][:, :, None] & _repeats(sub[stuck])
            gap[stuck] = np.where(
                dup,
                np.abs(sub_share[stuck] - share[rows[stuck], expert[stuck]][:, None, None]),
                np.inf,
            )
        best = np.argmin(gap.reshape(rows.size, -1), axis=1)
        if not np.all(np.isfinite(gap.reshape(rows.size, -1)[n, best])):
            raise AssertionError("no swap separates a duplicate replica")
        other, other_slot = np.divmod(best, slots)
        moved = sub[n, other, other_slot]
        phy[rows, rank, slot] = moved
        phy[rows, other, other_slot] = expert
    return True


def keep_in_place(old: IntArray, wanted: IntArray) -> IntArray:
    """Rows [..., S] holding the experts of `wanted` (distinct per row), each expert that
    `old` already holds in that row in its old slot, the others in the remaining slots in
    their order in `wanted`. `old` may repeat an expert (only its first slot counts) and may
    hold -1 (an empty slot)."""
    slots = old.shape[-1]
    same = old[..., :, None] == wanted[..., None, :]  # [..., S old, S wanted]
    first = np.ones(old.shape, dtype=bool)  # the first slot of its expert in the row
    first[..., 1:] = ~np.any(
        (old[..., :, None] == old[..., None, :]) & np.tri(slots, k=-1, dtype=bool), axis=-1
    )[..., 1:]
    stay = same.any(axis=-1) & (old >= 0) & first  # old slots that keep their expert
    kept = np.any(same & stay[..., :, None], axis=-2)  # wanted experts already in place
    out = np.where(stay, old, -1)
    # the other wanted experts, in order, fill the other slots, in order
    free_slots = np.argsort(stay, axis=-1, kind="stable")
    new_items = np.take_along_axis(wanted, np.argsort(kept, axis=-1, kind="stable"), axis=-1)
    todo = (~stay).sum(axis=-1, keepdims=True)
    values = np.where(
        np.arange(slots) < todo, new_items, np.take_along_axis(out, free_slots, axis=-1)
    )
    np.put_along_axis(out, free_slots, values, axis=-1)
    return out
