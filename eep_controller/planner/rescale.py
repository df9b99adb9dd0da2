"""Migration-aware rescale: from the current placement to one for a new rank count.

Surviving replicas stay in their slots ("sticky"); the planner only decides which redundant
replicas to drop, what goes into the free and new slots, and then buys balance with a
bounded number of swaps, each charged for the weight copies it adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from eep_controller.planner.fallback import fallback
from eep_controller.planner.packing import (
    holdings,
    least_copies,
    slot_weights,
)
from eep_controller.planner.placement import (
    Placement,
    layer_balancedness,
)
from eep_controller.planner.search import best_candidate
from eep_controller.planner.validation import (
    FloatArray,
    IntArray,
    checked_capacity,
    checked_load,
    checked_positive,
    checked_ranks,
)
from eep_controller.planner.workers import by_layers


class Transfer(NamedTuple):
    """One expert weight copy: `src_rank` in the old numbering (-1 = reload from checkpoint),
    `dst_rank` in the new numbering, `dst_slot` the slot index within the destination rank.

    Immutable, hashable and ordered by (layer, expert, src_rank, dst_rank, dst_slot); a
    tuple, so a plan of thousands of copies is cheap to build."""

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


def _repeats(phy: IntArray) -> npt.NDArray[np.bool_]:
    """Slots [L, R, S] holding an expert that an earlier slot of the same rank holds too
    (free slots, -1, never count)."""
    ordered = np.argsort(phy, axis=2, kind="stable")
    sorted_vals = np.take_along_axis(phy, ordered, axis=2)
    repeat = np.zeros_like(phy, dtype=bool)
    repeat[..., 1:] = (sorted_vals[..., 1:] == sorted_vals[..., :-1]) & (sorted_vals[..., 1:] >= 0)
    out = np.zeros_like(repeat)
    np.put_along_axis(out, ordered, repeat, axis=2)
    return out


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
    if load is None:
        weight = np.zeros((current.num_layers, current.num_experts))
    else:
        weight = checked_load(load, num_layers=current.num_layers, num_experts=current.num_experts)
    rank_load = slot_weights(phy, weight, current.replica_counts()).sum(axis=(0, 2))
    gone = np.zeros(current.num_ranks, dtype=bool)
    gone[list(failed)] = True
    # per rank, the (layer, expert) pair of each of its slots, a repeat within the rank
    # marked by the sentinel pair `pairs` (which no pair of a live holder is)
    pairs = current.num_layers * current.num_experts
    layer_base = np.arange(current.num_layers)[:, None, None] * current.num_experts
    key = np.where(_repeats(phy), pairs, phy + layer_base).transpose(1, 0, 2)
    key = key.reshape(current.num_ranks, -1)
    # how many live ranks hold each pair (the sentinel never counts as held alone)
    live_count = np.bincount(key[~gone].ravel(), minlength=pairs + 1)
    live_count[pairs] = 0
    chosen: list[int] = []
    for _ in range(count):
        # a pair held by one live rank is orphaned by removing that rank
        orphans = (live_count[key] == 1).sum(axis=1)
        rank_key = np.where(gone, np.inf, orphans.astype(np.float64))
        best = np.flatnonzero(rank_key == rank_key.min())
        tied_load = rank_load[best]
        best = best[tied_load == tied_load.min()]
        pick = int(best[-1])
        gone[pick] = True
        live_count[key[pick]] -= 1
        live_count[pairs] = 0
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
    added = np.full(
        (current.num_layers, new_num_ranks - len(survivors), current.slots_per_rank), -1
    )
    origin = np.concatenate([current.by_rank()[:, survivors], added], axis=1)
    return int(least_copies(origin, current.num_experts).sum())


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
    # rotated tie-breaks, so one chunk does not pile onto one rank
    ties = ((rank_ids[None, :] - np.arange(chunk)[:, None]) % num_old) / (2.0 * num_old)
    for start in range(0, order.size, chunk):
        idx = order[start : start + chunk]
        cost = np.where(holders[idx], sent[None, :] + ties[: idx.size], np.inf)
        pick = np.argmin(cost, axis=1)
        src[idx] = pick
        sent += np.bincount(pick, minlength=num_old)
    return src


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
    phy[_repeats(phy)] = -1

    phy = by_layers(best_candidate, phy, weight, origin)

    lower_bound = copy_lower_bound(current, new_ranks, removed, failed)
    fallback(phy, weight, origin)

    changed = np.argwhere(phy != origin)  # rows of (layer, dst_rank, dst_slot), sorted
    layer_of, dst_rank, dst_slot = changed[:, 0], changed[:, 1], changed[:, 2]
    expert_of = phy[layer_of, dst_rank, dst_slot]
    old_has = holdings(old, num_experts)
    if failed:
        old_has[:, list(failed), :] = False
    src = _choose_sources(old_has, layer_of, expert_of)
    transfers = list(
        map(
            Transfer,
            layer_of.tolist(),
            expert_of.tolist(),
            src.tolist(),
            dst_rank.tolist(),
            dst_slot.tolist(),
        )
    )
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
