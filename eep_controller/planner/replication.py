"""How many replicas each logical expert gets: greedy apportionment of slots to load."""

from __future__ import annotations

import numpy as np

from eep_controller.planner.validation import FloatArray, IntArray


def greedy_counts(
    weight: FloatArray, total_slots: int, max_count: int, base: IntArray | None = None
) -> IntArray:
    """Replica counts [B, E] summing to `total_slots` per row, each in [1, max_count].

    Starting from `base` (default one replica each), every further slot goes to the expert with
    the largest load per replica that may still grow; ties go to the lowest expert id. The rows
    of `base` must not exceed `total_slots` and `total_slots <= E * max_count`.
    """
    start = _sure_counts(weight, total_slots, max_count) if base is None else base
    counts = start.astype(np.int64)
    remaining = total_slots - counts.sum(axis=1)
    rows = np.arange(counts.shape[0])
    for _ in range(int(remaining.max(initial=0))):
        todo = remaining > 0
        if not todo.any():
            break
        idx = rows[todo]
        sub = counts[idx]
        priority = np.where(sub < max_count, weight[idx] / sub, -1.0)
        pick = np.argmax(priority, axis=1)
        counts[idx, pick] += 1
        remaining[idx] -= 1
    return counts


# Steps `_sure_counts` takes at most, and the replicas it may leave to the greedy's
# one-at-a-time loop per row before it stops early.
SURE_STEPS = 12
SURE_SLACK = 4


def _sure_counts(weight: FloatArray, total_slots: int, max_count: int) -> IntArray:
    """Replicas the greedy surely hands out, so it need not loop over them one by one.

    Giving expert e its (c + 1)-th replica has priority w_e / c, and the greedy accepts the
    `total_slots - E` highest priorities, in order. So for any threshold p, if at most that
    many priorities exceed p, the greedy accepts every one of them. The count above p is
    close to linear in 1 / p, so a few interpolation steps per row find a p whose count falls
    short of the spare slots by at most SURE_SLACK (or stop after SURE_STEPS). The counts
    are those of exactly the priorities above p, computed with the greedy's own division, so
    the result does not depend on rounding.

    The search starts between 1 / p = spare / W, whose count surely fits (the greedy's last
    priority p* is at most W / spare, or its extra replicas, c_e - 1 <= w_e / p* each, would
    not add up to `spare`), and (spare + E) / W, whose count is at least `spare` unless
    the per-expert cap binds."""
    num_experts = weight.shape[1]
    best = np.ones_like(weight, dtype=np.int64)
    spare = total_slots - num_experts
    if spare <= 0 or max_count <= 1:
        return best
    total = weight.sum(axis=1)
    rows = np.flatnonzero(total > 0)
    # x = 1 / p; [fit_x, over_x] brackets the x where the count reaches `spare`: fit_x's
    # count fits, over_x's is larger (or is the farthest point tried while the cap binds)
    fit_x = spare / total[rows]
    over_x = (spare + num_experts) / total[rows]
    best[rows] = _counts_above(weight[rows], fit_x, max_count)
    fit_n = best[rows].sum(axis=1) - num_experts
    # a row whose start does not fit after all (rounding at exact ties) is left to the loop
    lost = fit_n > spare
    best[rows[lost]] = 1
    rows, fit_x, over_x, fit_n = rows[~lost], fit_x[~lost], over_x[~lost], fit_n[~lost]
    over_n = _counts_above(weight[rows], over_x, max_count).sum(axis=1) - num_experts
    fit_y, over_y = (fit_n - spare).astype(np.float64), (over_n - spare).astype(np.float64)
    side = np.zeros(rows.size, dtype=np.int64)  # which end moved last (Illinois rule)
    for _ in range(SURE_STEPS):
        todo = spare - fit_n > SURE_SLACK
        if not todo.any():
            break
        rows, fit_x, over_x, fit_n = rows[todo], fit_x[todo], over_x[todo], fit_n[todo]
        over_n, fit_y, over_y, side = over_n[todo], fit_y[todo], over_y[todo], side[todo]
        beyond = over_n <= spare  # the cap binds: the far end fits too, look further out
        # false position on the count, which is close to linear in x
        step = np.clip(-fit_y / np.maximum(over_y - fit_y, 1e-300), 0.01, 0.99)
        x = np.where(beyond, over_x * 2, fit_x + step * (over_x - fit_x))
        counts = _counts_above(weight[rows], x, max_count)
        n = counts.sum(axis=1) - num_experts
        fits = n <= spare
        best[rows[fits]] = counts[fits]
        # Illinois: an end kept twice in a row has its value halved, so the next point
        # moves toward it instead of creeping up from the other end
        fit_y = np.where(fits, n - spare, np.where(side == 1, fit_y / 2, fit_y))
        over_y = np.where(fits & ~beyond, np.where(side == -1, over_y / 2, over_y), n - spare)
        side = np.where(beyond, 0, np.where(fits, -1, 1))
        fit_x, fit_n = np.where(fits, x, fit_x), np.where(fits, n, fit_n)
        grown = beyond | ~fits
        over_x, over_n = np.where(grown, x, over_x), np.where(grown, n, over_n)
    return best


def _counts_above(weight: FloatArray, inverse: FloatArray, max_count: int) -> IntArray:
    """1 + how many of c = 1 .. max_count - 1 give weight / c > p, per expert, for the
    threshold p = 1 / `inverse` [B] (inverse > 0)."""
    threshold = (1.0 / inverse)[:, None]
    with np.errstate(over="ignore"):
        estimate = np.minimum(weight * inverse[:, None], max_count)
    # the largest c with c < weight / p, then checked with the greedy's own division (the
    # estimate is off by at most one, where weight / p is within rounding of an integer)
    above: IntArray = np.clip(np.ceil(estimate) - 1, 0, max_count - 1).astype(np.int64)
    above -= (above >= 1) & ~(weight / np.maximum(above, 1) > threshold)
    after = np.minimum(above + 1, max_count - 1)
    above += (above < max_count - 1) & (weight / after > threshold)
    return above + 1


def filler_counts(
    weight: FloatArray, total_slots: int, max_count: int, replica_cap: FloatArray
) -> IntArray:
    """Counts that keep every replica at most `replica_cap` [B] heavy, spare slots to the coldest.

    Under heavy skew the greedy makes many replicas of similar, large size that do not pack;
    splitting the hot experts just below a rank's share and spending the spare slots on extra
    replicas of the coldest experts leaves small items to fill each rank up. Rows whose floor
    does not fit in `total_slots` (or the count cap) fall back to the plain greedy.
    """
    safe_cap = np.where(replica_cap > 0, replica_cap, 1.0)[:, None]
    floor = np.clip(np.ceil(weight / safe_cap - 1e-9), 1, None).astype(np.int64)
    spare = total_slots - floor.sum(axis=1)
    num_experts = weight.shape[1]
    coldness = np.argsort(np.argsort(weight, axis=1, kind="stable"), axis=1, kind="stable")
    spread = np.maximum(spare, 0)[:, None]
    counts: IntArray = floor + spread // num_experts + (coldness < spread % num_experts)
    fits = (spare >= 0) & (counts.max(axis=1) <= max_count)
    if fits.all():
        return counts
    fallback = greedy_counts(weight[~fits], total_slots, max_count)
    counts[~fits] = fallback
    return counts


def even_counts(num_experts: int, num_ranks: int, slots: int) -> IntArray | None:
    """Counts [E] that let experts of equal load fill every rank to exactly its share, or
    None when no counts up to `num_ranks` do.

    With equal loads a replica of an expert with k replicas weighs 1/k, so a rank holding
    a_k replicas of each count k carries sum(a_k / k). Counts whose replicas give every rank
    the same a_k (S slots, and E / R load each) balance perfectly, and packing in rounds of
    R finds that packing. The greedy gives every tied expert the same count, which at
    16 experts on 3 ranks of 8 slots leaves only halves and wholes (a rank's 16/3 cannot be
    reached: 0.9697); 4 experts with 3 replicas and 12 with 1 reach it. Each count k used
    needs R * a_k / k experts (a whole number); among the solutions, the one with the
    smallest largest count is chosen, and the lowest expert ids get the most replicas, as
    in the greedy.
    """
    if num_experts < 1 or num_ranks < 1 or slots < 1:
        return None
    # reach[k][s, e]: with counts 1..k, s slots of a rank and e experts can be filled;
    # per count, a_k is how many slots of every rank hold a replica of a k-replica expert
    reach = np.zeros((slots + 1, num_experts + 1), dtype=bool)
    reach[0, 0] = True
    stages = [reach]
    for k in range(1, num_ranks + 1):
        prev, now = stages[-1], stages[-1].copy()
        for a in range(1, slots + 1):
            if (num_ranks * a) % k:
                continue
            m = num_ranks * a // k
            if m > num_experts:
                break
            now[a:, m:] |= prev[: slots + 1 - a, : num_experts + 1 - m]
        stages.append(now)
        if now[slots, num_experts]:
            break
    else:
        return None
    # walk back from the largest count, taking for each count the most slots that still
    # leaves the rest reachable with smaller counts
    per_count: list[int] = []
    s, e = slots, num_experts
    for k in range(len(stages) - 1, 0, -1):
        prev = stages[k - 1]
        for a in range(s, -1, -1):
            if (num_ranks * a) % k:
                continue
            m = num_ranks * a // k
            if m <= e and prev[s - a, e - m]:
                per_count.append(num_ranks * a // k)
                s, e = s - a, e - m
                break
    counts = np.repeat(
        np.arange(len(stages) - 1, 0, -1, dtype=np.int64), np.array(per_count, dtype=np.int64)
    )
    return counts
