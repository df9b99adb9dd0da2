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


def _sure_counts(weight: FloatArray, total_slots: int, max_count: int) -> IntArray:
    """Replicas the greedy surely hands out, so it need not loop over them one by one.

    The greedy's last accepted priority (load per replica) p* is at most W / (T - E) (load
    W, T slots, E experts): every expert ends with c - 1 <= w / p* replicas beyond its first.
    Each of an expert's first floor(w / (W / (T - E))) replicas has a priority above p*, so the
    greedy gives them all; starting from them it picks the rest in the same order."""
    num_experts = weight.shape[1]
    spare = total_slots - num_experts
    ones = np.ones_like(weight, dtype=np.int64)
    if spare <= 0:
        return ones
    bound = weight.sum(axis=1, keepdims=True) / spare
    with np.errstate(divide="ignore", invalid="ignore"):
        sure = np.where(bound > 0, np.floor(weight / np.where(bound > 0, bound, 1.0)), 1.0)
    # strictly above p*: drop the last replica when w / floor is exactly the bound
    counts = np.clip(sure, 1, max_count).astype(np.int64)
    exact = (counts > 1) & (weight / np.maximum(counts - 1, 1) <= bound)
    counts = np.where(exact, counts - 1, counts)
    return np.maximum(counts, ones)


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
