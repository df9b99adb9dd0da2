"""Local search that unloads the hottest rank of every layer, vectorised across layers.

Two moves are tried each step, both against the hottest rank h and one of the few lightest
ranks q:

* swap a slot of h with a slot of q;
* re-purpose a slot of q (whose expert x has >= 2 replicas) as one more replica of an expert
  b held by h, which lowers h by b's share and changes the replica counts.

A move is taken when it lowers h without raising any rank it touches to h's load, and its
gain beats `penalty` x mean rank load per weight copy it adds; the copy count compares each
slot's expert with `origin` (the expert the slot held before, -1 when the slot is new).

Rows given partner slots give up their last light rank (when they have more than one) for up
to PARTNER_SLOTS slots that already hold a new copy (an orphan, say), on the next-lightest
ranks: swapping a replica of h with one of those adds one copy instead of two, so a rescale
that must write orphans anyway can move load where it lands for half the price.
"""

from __future__ import annotations

import numpy as np

from eep_controller.planner.packing import count_replicas, holders, holdings, slot_weights
from eep_controller.planner.validation import BoolArray, FloatArray, IntArray

LIGHT_RANKS = 2
FREE_BONUS = 1e6
CANDIDATE_SLOTS = 64
# Slots of the hottest rank considered per step: its heaviest ones.
HOT_SLOTS = 12
# From this many slots per rank `pair_swaps` sorts instead of forming all S x S sums.
SORTED_SUMS_FROM = 56
# Below that, the sums are formed for at most this many at once (4M: 32 MB).
SUMS_CHUNK = 1 << 22
# Slots already holding a new copy that rows with partners also look at (see module doc).
PARTNER_SLOTS = 9
# ... found on this many ranks next in lightness after the light ranks.
PARTNER_RANKS = 8


def refine(
    phy: IntArray,
    weight: FloatArray,
    origin: IntArray,
    *,
    penalty: float = 0.0,
    stop_at: float = 1.0,
    max_steps: int = 200,
    light_ranks: int = LIGHT_RANKS,
    partners: BoolArray | None = None,
    min_gain: float = 0.0,
) -> IntArray:
    """Improve a full batched placement [B, R, S]; returns a new array.

    A row stops when its balancedness reaches `stop_at`, when no move pays, after a move
    that lowers its peak by less than `min_gain` x its mean rank load, or after `max_steps`
    steps. Keeps S slots per rank, distinct experts per rank, >= 1 replica each.
    Rows where `partners` [B] is set also consider partner slots (see the module doc). Each
    row's result depends on that row alone.
    """
    phy = phy.copy()
    batch, ranks, slots = phy.shape
    if ranks < 2 or batch == 0:
        return phy
    num_experts = weight.shape[1]
    counts = np.ascontiguousarray(count_replicas(phy, num_experts))
    # expert-major holdings [B, E, R]: the holders of one expert are one contiguous row
    held = holders(phy, num_experts)
    held_flat = held.reshape(batch * num_experts, ranks)  # a view: updates to held show
    held_bits = held.reshape(-1)  # also a view; one flat take beats a three-index gather
    # flat views for the same reason (phy is this call's own copy, so updates show)
    phy_bits = phy.reshape(-1)
    origin = np.ascontiguousarray(origin)  # once: `_partner_slots` views it every step
    origin_bits = origin.reshape(-1)
    weight_bits = np.ascontiguousarray(weight).reshape(-1)
    counts_bits = counts.reshape(-1)
    loads = slot_weights(phy, weight, counts).sum(axis=2)
    mean = loads.mean(axis=1)
    price = penalty * mean
    top = loads.max(axis=1)
    active = np.flatnonzero((top > 0) & (mean < stop_at * top))
    # with many slots per rank each candidate rank is costly: look at fewer of them
    light = max(1, min(light_ranks, ranks - 1, CANDIDATE_SLOTS // slots))
    # rows with partners: one light rank fewer, and partner slots beyond the light ranks
    light_p = max(1, light - 1)
    if partners is None or ranks - 1 - light_p < 1:
        partners = np.zeros(batch, dtype=bool)
    partner_ranks = min(PARTNER_RANKS, ranks - 1 - light_p)
    slot_cols = {k: np.tile(np.arange(slots), k)[None, :] for k in (light, light_p)}
    hot_width = min(slots, HOT_SLOTS)
    all_slots = np.broadcast_to(np.arange(slots), (batch, slots))

    for _ in range(max_steps):
        if active.size == 0:
            break
        n = active.size
        rows = np.arange(n)
        r_col = rows[:, None]
        a_col = active[:, None]
        row_loads = loads[active]
        hot = np.argmax(row_loads, axis=1)
        hot_load = row_loads[rows, hot]
        # lightest ranks other than the hottest (ties broken by rank id, so deterministic)
        masked = row_loads.copy()
        masked[rows, hot] = np.inf
        by_load = np.argsort(masked, axis=1)
        mine = partners[active]
        # the same candidates, in the same order, whether or not other rows have partners:
        # with some (not all) rows having them, the others' partner columns and their own
        # last light ranks are barred
        some, every = bool(mine.any()), bool(mine.all())
        step_light = light_p if every else light
        lightest = by_load[:, :step_light]
        q_rank = np.repeat(lightest, slots, axis=1)  # [n, J]
        q_slot = np.broadcast_to(slot_cols[step_light], q_rank.shape)
        if some:
            p_rank, p_slot, p_ok = _partner_slots(
                phy, origin, active, by_load[:, light_p : light_p + partner_ranks]
            )
            q_rank = np.concatenate([q_rank, p_rank], axis=1)
            q_slot = np.concatenate([q_slot, p_slot], axis=1)
        width = q_rank.shape[1]
        at_j = (a_col * ranks + q_rank) * slots + q_slot
        e_j = phy_bits.take(at_j)
        o_j = origin_bits.take(at_j)
        l_q = row_loads[r_col, q_rank]
        if some:
            # a barred candidate rank counts as infinitely loaded: no move onto it gains
            l_q[:, step_light * slots :][~(p_ok & mine[:, None])] = np.inf
            if not every:
                l_q[mine, light_p * slots : light * slots] = np.inf
        at_i = (a_col * ranks + hot[:, None]) * slots + all_slots[:n]
        e_i = phy_bits.take(at_i)  # [n, S]
        o_i = origin_bits.take(at_i)
        e_at_i = a_col * num_experts + e_i
        w_i = weight_bits.take(e_at_i)
        c_i = counts_bits.take(e_at_i)
        if hot_width < slots:
            # only the hottest rank's heaviest slots are candidates
            pick_i = np.argsort(-(w_i / c_i), axis=1, kind="stable")[:, :hot_width]
            e_i = np.take_along_axis(e_i, pick_i, axis=1)
            o_i = np.take_along_axis(o_i, pick_i, axis=1)
            w_i = np.take_along_axis(w_i, pick_i, axis=1)
            c_i = np.take_along_axis(c_i, pick_i, axis=1)
            e_at_i = a_col * num_experts + e_i
        else:
            pick_i = all_slots
        e_at_j = a_col * num_experts + e_j
        w_j = weight_bits.take(e_at_j)
        c_j = counts_bits.take(e_at_j)
        share_i = w_i / c_i
        share_j = w_j / c_j
        tol = 1e-9 * hot_load[:, None, None]
        h3 = hot_load[:, None, None]
        lq3 = l_q[:, None, :]
        # q_has_i[n, i, j]: the rank of candidate slot j holds expert e_i; without partners
        # computed per light rank and broadcast over its slots (j = light rank j // S, slot j % S)
        if some:
            q_has_i = held_bits.take((e_at_i * ranks)[:, :, None] + q_rank[:, None, :])
        else:
            q_has = held_bits.take((e_at_i * ranks)[:, :, None] + lightest[:, None, :])  # [n, S, L]
            q_has_i = np.broadcast_to(q_has[..., None], (n, hot_width, step_light, slots)).reshape(
                n, hot_width, -1
            )
        h_has_j = held_bits.take(e_at_j * ranks + hot[:, None])  # [n, J]
        fresh_i = e_i != o_i
        fresh_j = e_j != o_j
        price3 = price[active][:, None, None]

        # swap slot i of h with slot j of q
        moved = share_i[:, :, None] - share_j[:, None, :]
        gain_swap = np.minimum(moved, (h3 - lq3) - moved)
        d_swap = (
            np.not_equal(e_j[:, None, :], o_i[:, :, None]).astype(np.int8)
            + np.not_equal(e_i[:, :, None], o_j[:, None, :])
            - fresh_i[:, :, None]
            - fresh_j[:, None, :]
        )
        bar_swap = q_has_i | h_has_j[:, None, :] | (gain_swap <= tol)
        score_swap = _value(gain_swap, d_swap, price3, bar_swap)

        # slot j of q becomes one more replica of expert e_i (held by h)
        drop_rise = np.where(c_j >= 2, w_j / np.maximum(c_j - 1, 1) - share_j, 0.0)
        add_cut = share_i - w_i / (c_i + 1)
        new_h = h3 - add_cut[:, :, None] + (drop_rise * h_has_j)[:, None, :]
        new_q = lq3 - share_j[:, None, :] + (w_i / (c_i + 1))[:, :, None]
        # heaviest other holder of e_j (not q, not h), which takes on part of its load. Only
        # needed where e_j has >= 2 replicas (the move is barred elsewhere) and where even
        # the heaviest rank but h could raise the peak of some move of slot j: elsewhere it
        # is below max(new_h, new_q) for every i and leaves the peak as it is
        peak = np.maximum(new_h, new_q)
        others = row_loads + 1.0
        others[rows, hot] = 0.0
        bound = others.max(axis=1)[:, None] - 1.0 + drop_rise  # >= x_peak (same rounding)
        near = (c_j >= 2) & (bound > peak.min(axis=1))
        if near.any():
            # holders [n, J, R] of every candidate's expert, q excepted; the max of their
            # loads + 1 over them (0: no holder) is taken without gathering the loads
            x_holders = held_flat.take(a_col * num_experts + e_j, axis=0)
            x_holders[r_col, np.arange(width), q_rank] = False
            x_max = np.max(
                np.broadcast_to(others[:, None, :], x_holders.shape),
                axis=2,
                where=x_holders,
                initial=0.0,
            )
            x_peak = np.where(near, x_max - 1.0 + drop_rise, -np.inf)
            np.maximum(peak, x_peak[:, None, :], out=peak)
        gain_rep = h3 - peak
        d_rep = np.not_equal(e_i[:, :, None], o_j[:, None, :]).astype(np.int8) - fresh_j[:, None, :]
        bar_rep = q_has_i | (c_j < 2)[:, None, :] | (gain_rep <= tol)
        score_rep = _value(gain_rep, d_rep, price3, bar_rep)

        flat_swap = score_swap.reshape(n, -1)
        flat_rep = score_rep.reshape(n, -1)
        best_swap = np.argmax(flat_swap, axis=1)
        best_rep = np.argmax(flat_rep, axis=1)
        v_swap = flat_swap[rows, best_swap]
        v_rep = flat_rep[rows, best_rep]
        use_rep = v_rep > v_swap
        value = np.where(use_rep, v_rep, v_swap)
        moving = value > 0
        if not moving.any():
            break
        pick = np.where(use_rep, best_rep, best_swap)
        i_pick, j_pick = np.divmod(pick, width)
        hot_slot = pick_i[rows, i_pick]
        q_r = q_rank[rows, j_pick]
        q_s = q_slot[rows, j_pick]
        ei = e_i[rows, i_pick]
        ej = e_j[rows, j_pick]
        si = share_i[rows, i_pick]
        sj = share_j[rows, j_pick]

        sw = moving & ~use_rep
        if sw.any():
            br, hr, qr, qs, ii, a, b = (
                active[sw], hot[sw], q_r[sw], q_s[sw], hot_slot[sw], ei[sw], ej[sw]
            )  # fmt: skip
            phy[br, hr, ii] = b
            phy[br, qr, qs] = a
            held[br, a, hr] = False
            held[br, b, qr] = False
            held[br, b, hr] = True
            held[br, a, qr] = True
            loads[br, hr] += sj[sw] - si[sw]
            loads[br, qr] += si[sw] - sj[sw]
        rp = moving & use_rep
        if rp.any():
            br, qr, qs, a, x = active[rp], q_r[rp], q_s[rp], ei[rp], ej[rp]
            w_a, w_x = weight[br, a], weight[br, x]
            c_a, c_x = counts[br, a], counts[br, x]
            # holders of x (q excepted) carry more of it, holders of a less, q swaps x for a
            x_rise = w_x / (c_x - 1) - w_x / c_x
            a_cut = w_a / (c_a + 1) - w_a / c_a
            loads[br] += held[br, x] * x_rise[:, None] + held[br, a] * a_cut[:, None]
            loads[br, qr] += w_a / (c_a + 1) - w_x / c_x - x_rise
            phy[br, qr, qs] = a
            held[br, x, qr] = False
            held[br, a, qr] = True
            counts[br, x] -= 1
            counts[br, a] += 1
        changed = active[moving]
        top = loads[changed].max(axis=1)
        still = mean[changed] < stop_at * top
        if min_gain > 0:
            still &= hot_load[moving] - top >= min_gain * mean[changed]
        active = changed[still]
    return phy


def _partner_slots(
    phy: IntArray, origin: IntArray, active: IntArray, ranks: IntArray
) -> tuple[IntArray, IntArray, BoolArray]:
    """Per active row, the first PARTNER_SLOTS slots holding a new copy (expert differs from
    `origin`) on `ranks` [n, K] (lightest first): their rank and slot [n, PARTNER_SLOTS], and
    whether each was found (a row may have fewer)."""
    n, slots = active.size, phy.shape[2]
    rows = active[:, None]
    at = rows * phy.shape[1] + ranks  # [n, K] rows of the [B * R, S] views
    found = (  # [n, K * S], in order
        phy.reshape(-1, slots).take(at, axis=0) != origin.reshape(-1, slots).take(at, axis=0)
    ).reshape(n, -1)
    seen = np.cumsum(found, axis=1)
    rr, cc = np.nonzero(found & (seen <= PARTNER_SLOTS))
    nth = seen[rr, cc] - 1
    flat = np.zeros((n, PARTNER_SLOTS), dtype=np.int64)
    ok = np.zeros((n, PARTNER_SLOTS), dtype=bool)
    flat[rr, nth] = cc
    ok[rr, nth] = True
    rank: IntArray = np.take_along_axis(ranks, flat // slots, axis=1)
    return rank, flat % slots, ok


def _value(gain: FloatArray, copies: IntArray, price: FloatArray, barred: BoolArray) -> FloatArray:
    """How much a move is worth (-inf when `barred`): free moves (no added copy) by their
    gain, ranked above every paid move; paid moves by gain per copy less `price` [n, 1, 1],
    so a paid move is worth taking only when it is positive. `copies` is in [-2, 2].
    Overwrites `gain` (returned as the value)."""
    # gain x 1 or x 0.5 is exact, so halving in place equals the per-copy product; adding
    # -inf where barred equals overwriting (gains are finite)
    add = np.where(copies > 0, -price, FREE_BONUS * price + 1e-300)
    np.copyto(add, -np.inf, where=barred)
    out: FloatArray = np.multiply(gain, 0.5, out=gain, where=copies == 2)
    out += add
    return out


def pair_swaps(phy: IntArray, weight: FloatArray, *, steps: int = 12) -> IntArray:
    """Balance a full batched placement [B, R, S] by rounds of simultaneous pairwise swaps.

    Each round pairs the k-th hottest rank with the k-th lightest and makes, in every pair,
    the one swap that brings the two loads closest. Pairs are disjoint and replica counts do
    not change, so all swaps of a round apply at once. Returns a new array.
    """
    phy = phy.copy()
    batch, ranks, slots = phy.shape
    if ranks < 2 or batch == 0:
        return phy
    num_experts = weight.shape[1]
    counts = count_replicas(phy, num_experts)
    has = np.ascontiguousarray(holdings(phy, num_experts))
    has_flat = has.reshape(-1)  # a view: has[b, r, e] = has_flat[(b * R + r) * E + e]
    share = slot_weights(phy, weight, counts)
    pairs = ranks // 2
    active = np.arange(batch)
    for _ in range(steps):
        if active.size == 0:
            break
        rows = active[:, None]
        r3 = active[:, None, None]
        loads = share[active].sum(axis=2)
        order = np.argsort(loads, axis=1, kind="stable")
        cold = order[:, :pairs]
        hot = order[:, ::-1][:, :pairs]
        n = np.arange(active.size)[:, None]
        gap = loads[n, hot] - loads[n, cold]  # [A, P]
        e_h = phy[rows, hot]  # [A, P, S]
        e_c = phy[rows, cold]
        # a swap of hot slot i with cold slot j moves a_i - b_j from hot to cold and leaves the
        # pair |gap - 2 (a_i - b_j)| apart; it helps iff that is below gap. A slot is barred
        # when the other rank of the pair already holds its expert (separable in i and j).
        base = r3 * ranks
        cold_has = has_flat.take(((base + cold[:, :, None]) * num_experts + e_h).ravel())
        hot_has = has_flat.take(((base + hot[:, :, None]) * num_experts + e_c).ravel())
        u = np.where(cold_has.reshape(e_h.shape), np.inf, gap[:, :, None] - 2 * share[rows, hot])
        v = np.where(hot_has.reshape(e_c.shape), np.inf, 2 * share[rows, cold])
        if slots >= SORTED_SUMS_FROM:
            best_i, best_j, best_after = closest_sums(u, v)
        else:
            best_i, best_j, best_after = _all_sums(u, v)
        take = best_after < gap * (1 - 1e-9)
        moved = take.any(axis=1)
        if not moved.any():
            break
        ai, pj = np.nonzero(take)
        bi = active[ai]
        si, sj = best_i[ai, pj], best_j[ai, pj]
        hr, cr = hot[ai, pj], cold[ai, pj]
        x, y = phy[bi, hr, si], phy[bi, cr, sj]
        phy[bi, hr, si], phy[bi, cr, sj] = y, x
        share[bi, hr, si], share[bi, cr, sj] = share[bi, cr, sj], share[bi, hr, si]
        has[bi, hr, x] = False
        has[bi, cr, y] = False
        has[bi, hr, y] = True
        has[bi, cr, x] = True
        active = active[moved]
    return phy


def _all_sums(
    u: FloatArray, v: FloatArray, chunk: int = SUMS_CHUNK
) -> tuple[IntArray, IntArray, FloatArray]:
    """`closest_sums` by forming all S x S sums |u[i] + v[j]| (the first minimum in (i, j)
    order), for rows in chunks of at most `chunk` sums, so memory stays bounded."""
    rows, pairs, slots = u.shape
    best_i = np.empty((rows, pairs), dtype=np.int64)
    best_j = np.empty((rows, pairs), dtype=np.int64)
    best_after = np.empty((rows, pairs))
    step = max(1, chunk // (pairs * slots * slots))
    for lo in range(0, rows, step):
        part = slice(lo, lo + step)
        flat = (u[part, :, :, None] + v[part, :, None, :]).reshape(-1, pairs, slots * slots)
        np.abs(flat, out=flat)
        best = np.argmin(flat, axis=2)
        best_after[part] = np.take_along_axis(flat, best[:, :, None], axis=2)[:, :, 0]
        best_i[part], best_j[part] = np.divmod(best, slots)
    return best_i, best_j, best_after


def closest_sums(u: FloatArray, v: FloatArray) -> tuple[IntArray, IntArray, FloatArray]:
    """For each row of u, v [..., S]: the (i, j) minimising |u[i] + v[j]| and that minimum.

    Sorts instead of forming all S x S sums: for each i the best j is a neighbour of where
    -u[i] falls among the sorted v. That place is found by sorting each row's v and -u
    together (a v equal to -u[i] sorts after it) and counting the v before each -u[i], so
    each row's answer depends on that row alone. Entries may be +inf (never chosen unless
    all are)."""
    slots = u.shape[-1]
    order_v = np.argsort(v, axis=-1, kind="stable")
    v_sorted = np.take_along_axis(v, order_v, axis=-1)
    # queries first: a stable sort keeps them before any v of equal value, so "v before"
    # counts v < -u[i]
    both = np.concatenate([-u, v_sorted], axis=-1)
    merged = np.argsort(both, axis=-1, kind="stable")
    v_before = np.cumsum(merged >= slots, axis=-1)
    place = np.empty_like(merged)  # where each element of `both` sits in the merged order
    np.put_along_axis(place, merged, np.arange(2 * slots), axis=-1)
    below = np.take_along_axis(v_before, place[..., :slots], axis=-1)
    lo = np.clip(below - 1, 0, slots - 1)
    hi = np.clip(below, 0, slots - 1)
    d_lo = np.abs(u + np.take_along_axis(v_sorted, lo, axis=-1))
    d_hi = np.abs(u + np.take_along_axis(v_sorted, hi, axis=-1))
    j_sorted = np.where(d_hi < d_lo, hi, lo)
    dist = np.minimum(d_lo, d_hi)
    k = np.argmin(dist, axis=-1)[..., None]
    best_after = np.take_along_axis(dist, k, axis=-1)[..., 0]
    best_j = np.take_along_axis(order_v, np.take_along_axis(j_sorted, k, axis=-1), axis=-1)[..., 0]
    return k[..., 0], best_j, best_after
