"""Start plans for a rescale's search: the sticky plans and their variants.

Pure numpy, used by :mod:`eep_controller.planner.search`. A start keeps every surviving
replica it can in its slot and fills the free and new slots; placements are shaped
``[layers, ranks, slots]`` (-1 marks a free slot) and no function changes how many slots a
rank has.
"""

from __future__ import annotations

import numpy as np

from eep_controller.planner.packing import (
    count_replicas,
    fill_free_slots,
    holders,
    holdings,
    slot_weights,
)
from eep_controller.planner.validation import BoolArray, FloatArray, IntArray


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


def _target_counts(phy: IntArray, weight: FloatArray, total: int) -> IntArray:
    """Replica counts to aim for: every surviving replica (orphans get one), trimmed to
    `total` by the greedy in reverse (drop where the remaining share stays smallest).

    The greedy drops, one at a time, a replica of the expert whose share with one replica
    fewer, w / (c - 1), is smallest (the lowest expert id on ties). An expert's candidate
    shares w / d (d = c - 1 down to 1) only grow as it loses replicas, so the greedy drops
    exactly the `excess` smallest of all candidates in (share, expert) order: one sort."""
    num_experts = weight.shape[1]
    counts = np.maximum(count_replicas(phy, num_experts), 1)
    excess = counts.sum(axis=1) - total
    rows = np.flatnonzero(excess > 0)
    if rows.size == 0:
        return counts
    extra = (counts[rows] - 1).ravel()  # droppable replicas per (row, expert)
    pair = np.repeat(np.arange(extra.size), extra)  # one entry per candidate
    first = np.cumsum(extra) - extra
    divisor = np.arange(pair.size) - first[pair] + 1  # d = 1 .. c - 1
    row, expert = np.divmod(pair, num_experts)
    share = weight[rows[row], expert] / divisor
    order = np.lexsort((expert, share, row))
    row, expert = row[order], expert[order]
    nth = np.arange(row.size) - np.searchsorted(row, row)  # position within its row
    drop = nth < excess[rows[row]]
    np.subtract.at(counts, (rows[row[drop]], expert[drop]), 1)
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
    per_rank = over.sum(axis=2)  # surplus slots per rank, kept up to date with `over`
    todo = np.flatnonzero(left > 0)
    while todo.size:
        rank = np.argmax(np.where(per_rank[todo] > 0, loads[todo], -np.inf), axis=1)
        slot = np.argmax(np.where(over[todo, rank], share[todo, rank], -np.inf), axis=1)
        expert = phy[todo, rank, slot]
        phy[todo, rank, slot] = -1
        over[todo, rank, slot] = False
        per_rank[todo, rank] -= 1
        loads[todo, rank] -= share[todo, rank, slot]
        share[todo, rank, slot] = 0.0
        surplus[todo, expert] -= 1
        left[todo] -= 1
        # an expert back at its count: its other replicas are no longer surplus
        settled = surplus[todo, expert] == 0
        if settled.any():
            rows = todo[settled]
            i, r, at = np.nonzero(over[rows] & (phy[rows] == expert[settled][:, None, None]))
            over[rows[i], r, at] = False
            np.subtract.at(per_rank, (rows[i], r), 1)
        todo = todo[left[todo] > 0]


def sticky_plan(phy: IntArray, weight: FloatArray, total: int) -> IntArray:
    """Keep every surviving replica the trimmed counts still want, add replicas (see
    `_add_replicas`) until the counts fill `total` slots, and pack them into the free slots."""
    phy = phy.copy()
    counts = _target_counts(phy, weight, total)
    _drop_surplus(phy, weight, counts)
    _add_replicas(phy, weight, counts, total)
    return fill_free_slots(phy, weight, counts)


def sticky_hot_plan(phy: IntArray, weight: FloatArray, total: int) -> IntArray | None:
    """Like `sticky_plan` when replicas must go (more survivors and orphans than slots), but the
    replicas dropped are chosen by rank load, not by count: each drop frees, on the hottest
    rank holding a replica with a sibling, the one leaving the lowest peak among that rank
    and the siblings that take over its share. None when nothing must be dropped in any
    row; a row with more free slots than orphans drops nothing and grows as `sticky_plan`
    does."""
    num_experts = weight.shape[1]
    counts = count_replicas(phy, num_experts)
    need = np.maximum(counts, 1).sum(axis=1) - total
    if need.max(initial=0) <= 0:
        return None
    phy = phy.copy()
    loads = slot_weights(phy, weight, counts).sum(axis=2)
    held = holders(phy, num_experts)  # [B, E, R]
    held_rows = held.reshape(-1, held.shape[2])  # a view: one expert's holders per row
    safe = np.maximum(phy, 0)  # a freed slot keeps its old expert here; `cand` masks it
    # cand[b, r, s]: the slot holds a replica with a sibling (kept up to date, as is the
    # number of such slots per rank)
    slot_counts = np.take_along_axis(counts, safe.reshape(phy.shape[0], -1), axis=1)
    cand = (phy >= 0) & (slot_counts.reshape(phy.shape) >= 2)
    per_rank = cand.sum(axis=2)
    todo = np.flatnonzero(need > 0)
    while todo.size:
        n = np.arange(todo.size)
        row_loads = loads[todo]
        hot = np.argmax(np.where(per_rank[todo] > 0, row_loads, -np.inf), axis=1)
        e = safe[todo, hot]  # [n, S]
        c = counts[todo[:, None], e]
        w = weight[todo[:, None], e]
        share = w / np.maximum(c, 1)
        rise = np.where(c >= 2, w / np.maximum(c - 1, 1) - share, 0.0)
        sib = held_rows.take(todo[:, None] * num_experts + e, axis=0)  # [n, S, R]
        sib[n, :, hot] = False
        sib_max = np.max(
            np.broadcast_to(row_loads[:, None, :], sib.shape), axis=2, where=sib, initial=-np.inf
        )
        score = np.maximum(row_loads[n, hot][:, None] - share, sib_max + rise)
        score = np.where(cand[todo, hot], score, np.inf)
        slot = np.argmin(score, axis=1)
        x = e[n, slot]
        phy[todo, hot, slot] = -1
        cand[todo, hot, slot] = False
        per_rank[todo, hot] -= 1
        loads[todo] += held[todo, x] * rise[n, slot][:, None]
        loads[todo, hot] -= rise[n, slot] + share[n, slot]
        held[todo, x, hot] = False
        counts[todo, x] -= 1
        # an expert down to one replica: that replica has no sibling any more
        alone = counts[todo, x] == 1
        if alone.any():
            rows, xs = todo[alone], x[alone]
            rank = np.argmax(held[rows, xs], axis=1)
            at = np.argmax(phy[rows, rank] == xs[:, None], axis=1)
            cand[rows, rank, at] = False
            per_rank[rows, rank] -= 1
        need[todo] -= 1
        todo = todo[need[todo] > 0]
    counts = np.maximum(counts, 1)
    # rows with more free slots than orphans (a failed rank replaced by a new one, say)
    # drop nothing: they grow replicas into the spare slots as `sticky_plan` does
    grow = np.flatnonzero(need < 0)
    if grow.size:
        grown = counts[grow]
        _add_replicas(phy[grow], weight[grow], grown, total)
        counts[grow] = grown
    return fill_free_slots(phy, weight, counts)


def spread_plan(phy: IntArray, weight: FloatArray, origin: IntArray) -> tuple[IntArray, BoolArray]:
    """`phy` [B, R, S] with every spread expert (load at least a slot's worth on every rank,
    w_e >= W / S, so the greedy would give it a replica on each) put on every rank that
    lacks it, heaviest expert first; and which rows changed.

    Each such rank gives up the slot lightest to lose: a slot holding a new copy before one
    that keeps its old expert (which would add a copy), then the smallest share; never a
    spread expert's slot or an expert's last replica. Without this, a layer whose hottest
    expert misses a few ranks stalls: those ranks stay light, and the one move that would
    give them a replica raises them above the peak (48 -> 64 ranks of 12 slots under Zipf
    1.2 stalls at 0.969; spread, it refines to 0.993 with half the copies of any other
    option)."""
    phy = phy.copy()
    batch, ranks, slots = phy.shape
    num_experts = weight.shape[1]
    spread = weight * slots >= weight.sum(axis=1, keepdims=True)  # [B, E]
    spread &= weight > 0
    changed = np.zeros(batch, dtype=bool)
    if not spread.any():
        return phy, changed
    counts = count_replicas(phy, num_experts)
    has = holdings(phy, num_experts)
    # spread experts of each row, heaviest first (-1 pads rows with fewer)
    order = np.argsort(-np.where(spread, weight, -1.0), axis=1, kind="stable")
    width = int(spread.sum(axis=1).max())
    chosen = np.where(np.take_along_axis(spread, order[:, :width], axis=1), order[:, :width], -1)
    keeps_old = phy == origin  # losing such a slot adds a copy
    rows = np.arange(batch)
    for k in range(width):
        expert = chosen[:, k]
        for r in range(ranks):
            need = (expert >= 0) & ~has[rows, r, np.maximum(expert, 0)]
            if not need.any():
                continue
            b = np.flatnonzero(need)
            e_s = phy[b, r]  # [n, S]
            c_s = counts[b[:, None], e_s]
            share = weight[b[:, None], e_s] / c_s
            barred = (c_s < 2) | spread[b[:, None], e_s]
            key = np.where(barred, np.inf, share + keeps_old[b, r] * weight[b].sum(axis=1)[:, None])
            slot = np.argmin(key, axis=1)
            ok = np.isfinite(key[np.arange(b.size), slot])
            b, slot = b[ok], slot[ok]
            gone = phy[b, r, slot]
            e = expert[b]
            counts[b, gone] -= 1
            counts[b, e] += 1
            has[b, r, gone] = False
            has[b, r, e] = True
            phy[b, r, slot] = e
            keeps_old[b, r, slot] = origin[b, r, slot] == e
            changed[b] = True
    return phy, changed


def retargeted_plan(phy: IntArray, weight: FloatArray, counts: IntArray) -> IntArray:
    """Reach the replica `counts` planned for the new size with the fewest slot changes:
    keep the surviving replicas still wanted, free the surplus (hottest ranks first), and
    pack only the missing replicas into the free slots."""
    phy = phy.copy()
    _drop_surplus(phy, weight, counts)
    return fill_free_slots(phy, weight, counts)
