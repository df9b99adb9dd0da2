"""Reference baseline: the published DeepSeek EPLB greedy, re-implemented in numpy.

1. Replication: every slot beyond one per expert goes to the expert with the highest load
   per replica.
2. Packing: replicas heaviest first, each to the lightest rank that still has a free slot
   (two replicas of one expert may share a rank, as in the original).
3. Hierarchical when num_groups % num_nodes == 0: expert groups are spread over nodes with
   equal group counts (heaviest group to the lightest node), then steps 1-2 run per node.
4. Rescale: re-plan from scratch at the new size and move the difference; an expert the
   same rank already held keeps its slot.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def replicate(load: FloatArray, total_slots: int) -> IntArray:
    """Replica counts [L, E] by repeatedly splitting the expert with the largest share."""
    counts = np.ones(load.shape, dtype=np.int64)
    rows = np.arange(load.shape[0])
    for _ in range(total_slots - load.shape[1]):
        counts[rows, np.argmax(load / counts, axis=1)] += 1
    return counts


def pack(load: FloatArray, counts: IntArray, num_ranks: int, slots: int) -> IntArray:
    """LPT: replicas heaviest first onto the lightest rank with a free slot; [L, R, S]."""
    layers = load.shape[0]
    share = load / counts
    order = np.argsort(-share, axis=1, kind="stable")
    reps = np.take_along_axis(counts, order, axis=1)
    items = np.repeat(order.ravel(), reps.ravel()).reshape(layers, num_ranks * slots)
    weights = np.take_along_axis(share, items, axis=1)
    rank_load = np.zeros((layers, num_ranks))
    filled = np.zeros((layers, num_ranks), dtype=np.int64)
    out = np.empty((layers, num_ranks, slots), dtype=np.int64)
    rows = np.arange(layers)
    for k in range(num_ranks * slots):
        rank = np.argmin(np.where(filled < slots, rank_load, np.inf), axis=1)
        out[rows, rank, filled[rows, rank]] = items[:, k]
        rank_load[rows, rank] += weights[:, k]
        filled[rows, rank] += 1
    return out


def plan(
    load: FloatArray,
    num_ranks: int,
    slots: int,
    num_nodes: int = 1,
    num_groups: int | None = None,
) -> IntArray:
    """Baseline placement [L, R, S]."""
    layers, experts = load.shape
    if (
        num_groups is None
        or num_nodes <= 1
        or num_groups % num_nodes
        or experts % num_groups
        or num_ranks % num_nodes
    ):
        return pack(load, replicate(load, num_ranks * slots), num_ranks, slots)
    size = experts // num_groups
    per_node = num_groups // num_nodes
    group_load = load.reshape(layers, num_groups, size).sum(axis=2)
    node_of = np.zeros((layers, num_groups), dtype=np.int64)
    for layer in range(layers):
        totals = np.zeros(num_nodes)
        taken = np.zeros(num_nodes, dtype=np.int64)
        for g in np.argsort(-group_load[layer], kind="stable"):
            node = int(np.argmin(np.where(taken < per_node, totals, np.inf)))
            node_of[layer, g] = node
            totals[node] += group_load[layer, g]
            taken[node] += 1
    ranks_per_node = num_ranks // num_nodes
    out = np.empty((layers, num_ranks, slots), dtype=np.int64)
    for layer in range(layers):
        for node in range(num_nodes):
            groups = np.flatnonzero(node_of[layer] == node)
            ids = (groups[:, None] * size + np.arange(size)).ravel()
            sub = load[layer : layer + 1, ids]
            placed = pack(sub, replicate(sub, ranks_per_node * slots), ranks_per_node, slots)
            out[layer, node * ranks_per_node : (node + 1) * ranks_per_node] = ids[placed[0]]
    return out


def balancedness(phy: IntArray, load: FloatArray) -> float:
    """Mean over layers of mean rank load / max rank load."""
    layers, experts = load.shape
    counts = np.zeros((layers, experts))
    np.add.at(counts, (np.arange(layers)[:, None, None], phy), 1)
    share = (
        load[np.arange(layers)[:, None, None], phy] / counts[np.arange(layers)[:, None, None], phy]
    )
    rank = share.sum(axis=2)
    top = rank.max(axis=1)
    return float(np.where(top > 0, rank.mean(axis=1) / np.where(top > 0, top, 1), 1).mean())


def rescale(
    old: IntArray, load: FloatArray, new_ranks: int, gone: list[int]
) -> tuple[IntArray, IntArray]:
    """Re-plan from scratch; survivors keep experts they already hold in the same slot.

    Returns (new placement [L, R', S], per-slot copy mask [L, R', S]).
    """
    layers, old_ranks, slots = old.shape
    fresh = plan(load, new_ranks, slots)
    survivors = [r for r in range(old_ranks) if r not in gone]
    out = fresh.copy()
    copied = np.ones(fresh.shape, dtype=bool)
    for new_rank, old_rank in enumerate(survivors):
        for layer in range(layers):
            before = old[layer, old_rank]
            wanted = list(fresh[layer, new_rank])
            row = np.full(slots, -1, dtype=np.int64)
            keep = np.zeros(slots, dtype=bool)
            for s, e in enumerate(before):
                if e in wanted:
                    wanted.remove(e)
                    row[s], keep[s] = e, True
            row[row < 0] = wanted
            out[layer, new_rank] = row
            copied[layer, new_rank] = ~keep
    return out, copied
