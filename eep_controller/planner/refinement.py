"""Local search that unloads the hottest rank of every layer, vectorised across layers.

Two moves are tried each step, both against the hottest rank h and one of the few lightest
ranks q:

* swap a slot of h with a slot of q;
* re-purpose a slot of q (whose expert x has >= 2 replicas) as one more replica of an expert
  b held by h, which lowers h by b's share and changes the replica counts.

A move is taken when it lowers h without raising any rank it touches to h's load, and its
gain beats `penalty` x mean rank load per weight copy it adds; the copy count compares each
slot's expert with `origin` (the expert the slot held before, -1 when the slot is new).
"""

from __future__ import annotations

import numpy as np

from eep_controller.planner.packing import count_replicas, holdings, slot_weights
from eep_controller.planner.validation import FloatArray, IntArray

LIGHT_RANKS = 2
FREE_BONUS = 1e6
CANDIDATE_SLOTS = 64


def refine(
    phy: IntArray,
    weight: FloatArray,
    origin: IntArray,
    *,
    penalty: float = 0.0,
    stop_at: float = 1.0,
    max_steps: int = 200,
    light_ranks: int = LIGHT_RANKS,
) -> IntArray:
    """Improve a full batched placement [B, R, S]; returns a new array.

    A row stops when its balancedness reaches `stop_at`, when no move pays, or after
    `max_steps` steps. Keeps S slots per rank, distinct experts per rank, >= 1 replica each.
    """
    phy = phy.copy()
    batch, ranks, slots = phy.shape
    if ranks < 2 or batch == 0:
        return phy
    num_experts = weight.shape[1]
    counts = count_replicas(phy, num_experts)
    has = holdings(phy, num_experts)
    loads = slot_weights(phy, weight, counts).sum(axis=2)
    mean = loads.mean(axis=1)
    price = penalty * mean
    top = loads.max(axis=1)
    active = np.flatnonzero((top > 0) & (mean < stop_at * top))
    # with many slots per rank each candidate rank is costly: look at fewer of them
    light = max(1, min(light_ranks, ranks - 1, CANDIDATE_SLOTS // slots))
    slot_idx = np.tile(np.arange(slots), light)
    all_ranks = np.arange(ranks)

    for _ in range(max_steps):
        if active.size == 0:
            break
        n = active.size
        a_col = active[:, None]
        row_loads = loads[active]
        hot = np.argmax(row_loads, axis=1)
        hot_load = row_loads[np.arange(n), hot]
        # lightest ranks other than the hottest (ties broken by rank id, so deterministic)
        order = np.argsort(np.where(all_ranks[None, :] == hot[:, None], np.inf, row_loads), axis=1)
        lightest = order[:, :light]
        q_rank = np.repeat(lightest, slots, axis=1)  # [n, J]
        q_slot = np.broadcast_to(slot_idx, q_rank.shape)
        e_j = phy[a_col, q_rank, q_slot]
        o_j = origin[a_col, q_rank, q_slot]
        l_q = row_loads[np.arange(n)[:, None], q_rank]
        e_i = phy[active, hot, :]  # [n, S]
        o_i = origin[active, hot, :]
        cnt = counts[active]
        w_row = weight[active]
        w_i = w_row[np.arange(n)[:, None], e_i]
        c_i = cnt[np.arange(n)[:, None], e_i]
        w_j = w_row[np.arange(n)[:, None], e_j]
        c_j = cnt[np.arange(n)[:, None], e_j]
        share_i = w_i / c_i
        share_j = w_j / c_j
        tol = 1e-9 * hot_load[:, None, None]
        h3 = hot_load[:, None, None]
        lq3 = l_q[:, None, :]
        q_has_i = has[active[:, None, None], q_rank[:, None, :], e_i[:, :, None]]  # [n, S, J]
        h_has_j = has[a_col, hot[:, None], e_j]  # [n, J]

        # swap slot i of h with slot j of q
        new_h = h3 - share_i[:, :, None] + share_j[:, None, :]
        new_q = lq3 + share_i[:, :, None] - share_j[:, None, :]
        gain_swap = h3 - np.maximum(new_h, new_q)
        ne = np.not_equal
        d_swap = (
            ne(e_j[:, None, :], o_i[:, :, None]).astype(np.int64)
            + ne(e_i[:, :, None], o_j[:, None, :])
            - ne(e_i, o_i)[:, :, None]
            - ne(e_j, o_j)[:, None, :]
        )
        ok_swap = ~q_has_i & ~h_has_j[:, None, :] & (gain_swap > tol)
        score_swap = np.where(ok_swap, _value(gain_swap, d_swap, price[active]), -np.inf)

        # slot j of q becomes one more replica of expert e_i (held by h)
        drop_rise = np.where(c_j >= 2, w_j / np.maximum(c_j - 1, 1) - share_j, 0.0)
        add_cut = share_i - w_i / (c_i + 1)
        new_h = h3 - add_cut[:, :, None] + (drop_rise * h_has_j)[:, None, :]
        new_q = lq3 - share_j[:, None, :] + (w_i / (c_i + 1))[:, :, None]
        x_holders = has[active[:, None, None], all_ranks[None, None, :], e_j[:, :, None]]
        x_holders &= all_ranks[None, None, :] != q_rank[:, :, None]
        x_holders &= all_ranks[None, None, :] != hot[:, None, None]
        x_peak = np.max(np.where(x_holders, row_loads[:, None, :], -np.inf), axis=2) + drop_rise
        peak = np.maximum(np.maximum(new_h, new_q), x_peak[:, None, :])
        gain_rep = h3 - peak
        d_rep = ne(e_i[:, :, None], o_j[:, None, :]).astype(np.int64) - ne(e_j, o_j)[:, None, :]
        ok_rep = ~q_has_i & (c_j >= 2)[:, None, :] & (gain_rep > tol)
        score_rep = np.where(ok_rep, _value(gain_rep, d_rep, price[active]), -np.inf)

        flat_swap = score_swap.reshape(n, -1)
        flat_rep = score_rep.reshape(n, -1)
        best_swap = np.argmax(flat_swap, axis=1)
        best_rep = np.argmax(flat_rep, axis=1)
        v_swap = flat_swap[np.arange(n), best_swap]
        v_rep = flat_rep[np.arange(n), best_rep]
        use_rep = v_rep > v_swap
        value = np.where(use_rep, v_rep, v_swap)
        moving = value > 0
        if not moving.any():
            break
        pick = np.where(use_rep, best_rep, best_swap)
        i_pick, j_pick = np.divmod(pick, q_rank.shape[1])
        rows = np.arange(n)
        b_row = active
        h_r = hot
        q_r = q_rank[rows, j_pick]
        q_s = q_slot[rows, j_pick]
        ei = e_i[rows, i_pick]
        ej = e_j[rows, j_pick]

        sw = moving & ~use_rep
        if sw.any():
            br, hr, qr, qs, ii, a, b = (
                b_row[sw],
                h_r[sw],
                q_r[sw],
                q_s[sw],
                i_pick[sw],
                ei[sw],
                ej[sw],
            )
            phy[br, hr, ii] = b
            phy[br, qr, qs] = a
            has[br, hr, a] = False
            has[br, qr, b] = False
            has[br, hr, b] = True
            has[br, qr, a] = True
        rp = moving & use_rep
        if rp.any():
            br, qr, qs, a, x = b_row[rp], q_r[rp], q_s[rp], ei[rp], ej[rp]
            phy[br, qr, qs] = a
            has[br, qr, x] = False
            has[br, qr, a] = True
            counts[br, x] -= 1
            counts[br, a] += 1
        changed = b_row[moving]
        loads[changed] = slot_weights(phy[changed], weight[changed], counts[changed]).sum(axis=2)
        top = loads[changed].max(axis=1)
        still = mean[changed] < stop_at * top
        active = changed[still]
    return phy


def _value(gain: FloatArray, copies: IntArray, price: FloatArray) -> FloatArray:
    """How much a move is worth: free moves (no added copy) by their gain, ranked above
    every paid move; paid moves by gain per copy, worth nothing below `price` per copy."""
    per_copy = gain / np.maximum(copies, 1) - price[:, None, None]
    free = gain + FREE_BONUS * price[:, None, None] + 1e-300
    out: FloatArray = np.where(copies <= 0, free, np.where(per_copy > 0, per_copy, -1.0))
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
    has = holdings(phy, num_experts)
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
        a = share[rows, hot]  # [A, P, S]
        b = share[rows, cold]
        e_h = phy[rows, hot]
        e_c = phy[rows, cold]
        delta = a[:, :, :, None] - b[:, :, None, :]  # load moved from hot to cold
        after = np.abs(gap[:, :, None, None] - 2 * delta)
        ok = (delta > 0) & (after < gap[:, :, None, None] * (1 - 1e-9))
        ok &= ~has[r3, cold[:, :, None], e_h][:, :, :, None]
        ok &= ~has[r3, hot[:, :, None], e_c][:, :, None, :]
        flat = np.where(ok, after, np.inf).reshape(active.size, pairs, slots * slots)
        best = np.argmin(flat, axis=2)
        take = np.isfinite(np.take_along_axis(flat, best[:, :, None], axis=2)[:, :, 0])
        moved = take.any(axis=1)
        if not moved.any():
            break
        ai, pj = np.nonzero(take)
        bi = active[ai]
        si, sj = np.divmod(best[ai, pj], slots)
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
