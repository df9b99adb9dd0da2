"""Keep every expert a surviving rank already holds in the slot it already occupies.

A plan may place an expert that stays on a rank into a different slot of that rank (a
"move to itself"), which costs a copy for nothing. :func:`pin_staying_experts` permutes the
slots of each surviving rank so such experts stay put and drops their transfers; the set of
experts per rank, hence the balance, is unchanged.
"""

from __future__ import annotations

import numpy as np

from eep_controller.planner.packing import keep_in_place
from eep_controller.planner.placement import Placement
from eep_controller.planner.rescale import RescalePlan, Transfer


def pin_staying_experts(old: Placement, plan: RescalePlan) -> RescalePlan:
    """``plan`` with no transfer into a rank that already held that expert."""
    S = old.slots_per_rank
    layers = old.num_layers
    new = plan.placement.phy2log.reshape(layers, plan.placement.num_ranks, S).copy()
    before = old.by_rank()
    kept = np.flatnonzero(plan.rank_map >= 0)
    # on each surviving rank, experts it keeps stay in their old slot (the first, if the old
    # rank repeats one)
    new[:, plan.rank_map[kept]] = keep_in_place(before[:, kept], new[:, plan.rank_map[kept]])
    held = np.zeros(
        (layers, plan.placement.num_ranks, int(max(new.max(), before.max())) + 1), dtype=bool
    )
    for src in np.flatnonzero(plan.rank_map >= 0).tolist():
        held[np.arange(layers)[:, None], plan.rank_map[src], before[:, src]] = True
    slot_of = np.full(held.shape, -1, dtype=np.int64)
    L_idx, R_idx, S_idx = np.indices(new.shape)
    slot_of[L_idx, R_idx, new] = S_idx
    transfers: list[Transfer] = []
    for t in plan.transfers:
        if held[t.layer, t.dst_rank, t.expert]:
            continue  # the destination already holds it: it stays where it is
        transfers.append(t._replace(dst_slot=int(slot_of[t.layer, t.dst_rank, t.expert])))
    stats = dict(plan.stats)
    stats["copies"] = len(transfers)
    stats["checkpoint_reloads"] = sum(1 for t in transfers if t.src_rank < 0)
    placement = Placement(new.reshape(layers, -1), S, num_experts=plan.placement.num_experts)
    return RescalePlan(
        placement=placement, rank_map=plan.rank_map, transfers=transfers, stats=stats
    )
