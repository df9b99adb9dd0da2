"""Turning a scale request into an :class:`OpPlan`: which devices, which placement, which copies.

Pure: everything it needs is passed in (spec, committed layout, live nodes, devices used by
other deployments, load); the service reads those from etcd and stores the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from eep_controller.errors import InsufficientDevices, Invalid
from eep_controller.planner import (
    Placement,
    RescalePlan,
    Transfer,
    balancedness,
    choose_removed_ranks,
    plan_placement,
    plan_rescale,
    schedule_transfers,
)
from eep_controller.planner.pinning import pin_staying_experts
from eep_controller.protocol import (
    DeploymentSpec,
    EncodedArray,
    Layout,
    NodeInfo,
    OpKind,
    OpPlan,
    Participant,
    PlanStats,
    Rank,
    ScaleRequest,
)


@dataclass(frozen=True)
class PlanInputs:
    spec: DeploymentSpec
    layout: Layout
    nodes: Sequence[NodeInfo]
    used_elsewhere: frozenset[str]  # Rank.key of devices held by other deployments or ops
    load: np.ndarray | None  # float [L, E] or None for uniform
    link_bandwidth: float
    # old ranks whose restarted worker holds no active group (see GrouplessRank): a
    # scale-down cannot carry copies over the active world then
    groupless: frozenset[int] = frozenset()


@dataclass(frozen=True)
class PlannedOperation:
    kind: OpKind
    plan: OpPlan
    schedule_rounds: int


def uniform_load(spec: DeploymentSpec) -> np.ndarray:
    return np.ones((spec.model.num_moe_layers, spec.model.num_experts), dtype=np.float64)


def recover_dp(spec: DeploymentSpec, layout: Layout, lost: Sequence[int]) -> int:
    """The dp a recover operation aims at: what the surviving ranks fill, but never fewer
    than the smallest dp that holds every expert (free devices then join; without them the
    recover waits). Fewer than ``min_dp`` is fine: serving on fewer ranks beats not serving,
    but a layout missing experts cannot serve at all."""
    survivors = len(layout.ranks) - len(set(lost))
    return max(spec.smallest_dp(), survivors // (spec.tp * spec.pcp))


def lost_ranks(layout: Layout, nodes: Iterable[NodeInfo]) -> list[int]:
    """Indices of the layout's ranks whose node has no live lease."""
    alive = {n.node_id for n in nodes}
    return [i for i, r in enumerate(layout.ranks) if r.node_id not in alive]


def free_devices(inputs: PlanInputs, exclude: set[str]) -> list[Rank]:
    """Devices a new rank may use: live, of the right kind, not used by anyone.

    Nodes that already host this deployment come first (locality), then by node id.
    """
    hosting = {r.node_id for r in inputs.layout.ranks}
    kind = inputs.spec.device_kind
    out: list[Rank] = []
    for node in sorted(inputs.nodes, key=lambda n: (n.node_id not in hosting, n.node_id)):
        for dev in sorted(node.devices, key=lambda d: d.index):
            if kind is not None and dev.kind != kind:
                continue
            rank = Rank(node_id=node.node_id, device_index=dev.index)
            if rank.key in exclude or rank.key in inputs.used_elsewhere:
                continue
            out.append(rank)
    return out


def _check_target(spec: DeploymentSpec, request: ScaleRequest, allow_below_min: bool) -> None:
    dp = request.dp_size
    if not (spec.min_dp <= dp or allow_below_min) or dp > spec.max_dp:
        raise Invalid(
            f"dp_size {dp} is outside [min_dp, max_dp] = [{spec.min_dp}, {spec.max_dp}]",
            min_dp=spec.min_dp,
            max_dp=spec.max_dp,
        )
    if spec.slots(dp) < spec.model.num_experts:
        raise Invalid(
            f"dp_size {dp} gives {spec.slots(dp)} expert slots for {spec.model.num_experts} experts",
            smallest_dp=spec.smallest_dp(),
        )


def _check_removed(spec: DeploymentSpec, layout: Layout, request: ScaleRequest) -> list[int] | None:
    if request.remove_ranks is None:
        return None
    old, new = len(layout.ranks), spec.ep_size(request.dp_size)
    ranks = list(request.remove_ranks)
    if new >= old:
        raise Invalid(
            f"remove_ranks is only for scaling down; dp_size {request.dp_size} does not shrink the deployment"
        )
    if len(set(ranks)) != len(ranks):
        raise Invalid(f"remove_ranks names a rank twice: {ranks}")
    bad = [r for r in ranks if not 0 <= r < old]
    if bad:
        raise Invalid(f"remove_ranks {bad} out of range: the deployment has ranks 0..{old - 1}")
    if len(ranks) != old - new:
        raise Invalid(
            f"dp_size {request.dp_size} means {old - new} of {old} EP ranks leave, but remove_ranks names {len(ranks)}"
        )
    return sorted(ranks)


def _initial_plan(
    spec: DeploymentSpec, load: np.ndarray, num_ranks: int, old_ranks: int = 0
) -> RescalePlan:
    """Bring-up from nothing (or after every old rank was lost): plan from scratch; every
    slot reads from the checkpoint; no old rank keeps a place."""
    placement = plan_placement(load, num_ranks, spec.slots_per_rank)
    S = spec.slots_per_rank
    transfers = [
        Transfer(
            layer=int(layer),
            expert=int(placement.phy2log[layer, col]),
            src_rank=-1,
            dst_rank=col // S,
            dst_slot=col % S,
        )
        for layer in range(placement.num_layers)
        for col in range(placement.phy2log.shape[1])
    ]
    return RescalePlan(
        placement=placement,
        rank_map=np.full(old_ranks, -1, dtype=np.int64),
        transfers=transfers,
        stats={
            "copies": len(transfers),
            "lower_bound": len(transfers),
            "balancedness_before": 0.0,
            "balancedness_after": balancedness(placement, load),
            "checkpoint_reloads": len(transfers),
        },
    )


def plan_operation(
    inputs: PlanInputs,
    request: ScaleRequest,
    *,
    failed: Sequence[int] = (),
    allow_below_min: bool = False,
) -> PlannedOperation:
    """Validate ``request`` against the deployment and plan it. Raises Invalid/InsufficientDevices.

    ``failed`` names ranks of the committed layout that cannot send (their node is gone):
    they are removed and their orphaned experts reloaded from the checkpoint. Recovery may
    leave fewer ranks than ``min_dp`` asks for (``allow_below_min``): serving on fewer ranks
    beats not serving.
    """
    spec, layout = inputs.spec, inputs.layout
    _check_target(spec, request, allow_below_min)
    removed = _check_removed(spec, layout, request)
    old_r = len(layout.ranks)
    new_r = spec.ep_size(request.dp_size)
    load = inputs.load if inputs.load is not None else uniform_load(spec)
    if load.shape != (spec.model.num_moe_layers, spec.model.num_experts):
        load = uniform_load(spec)
    failed = sorted(set(failed))
    survivors = old_r - len(failed)
    if removed is not None and set(removed) & set(failed):
        raise Invalid(f"remove_ranks {sorted(set(removed) & set(failed))} are already lost")
    if removed is not None and failed:
        # remove_ranks counts old - new leavers; with ranks lost, too few would be left
        raise Invalid(
            f"remove_ranks cannot be combined with lost ranks {failed}: recover them first"
        )

    joining: list[Rank] = []
    if new_r > survivors:
        used = {r.key for r in layout.ranks}
        pool = free_devices(inputs, used)
        need = new_r - survivors
        if len(pool) < need:
            raise InsufficientDevices(
                f"scaling to dp_size {request.dp_size} needs {need} free healthy "
                f"device{'s' if need != 1 else ''}; "
                f"{len(pool)} available, {need - len(pool)} missing",
                needed=need,
                available=len(pool),
                missing=need - len(pool),
            )
        joining = pool[:need]

    if old_r == 0 or survivors == 0:
        # nothing to copy from: every rank (all of them new) loads from the checkpoint
        rplan = _initial_plan(spec, load, new_r, old_r)
    else:
        phy = layout.phy2log()
        if phy is None:
            raise Invalid(f"deployment {spec.name!r} has ranks but no placement")
        current = Placement(phy, layout.slots_per_rank, num_experts=spec.model.num_experts)
        to_remove: Sequence[int] | None = removed
        if new_r >= survivors:
            to_remove = ()
        silent: tuple[int, ...] = tuple(failed)
        if (failed or inputs.groupless) and new_r < survivors:
            # with a rank lost, or one without an active group, copies travel in the standby
            # world, which holds only the new ranks: a live rank that leaves cannot send
            # there, so it counts as failed for sourcing (its experts come from another
            # holder or the checkpoint)
            if to_remove is None:
                to_remove = choose_removed_ranks(current, load, survivors - new_r, failed)
            silent = tuple(sorted(set(failed) | set(to_remove)))
            to_remove = ()
        rplan = plan_rescale(current, load, new_r, removed_ranks=to_remove, failed_ranks=silent)
        rplan = pin_staying_experts(current, rplan)

    rank_map = [int(x) for x in rplan.rank_map]
    participants: list[Participant] = []
    for old, rank in enumerate(layout.ranks):
        if old in failed:
            continue
        new = rank_map[old]
        participants.append(
            Participant(
                node_id=rank.node_id,
                device_index=rank.device_index,
                old_rank=old,
                new_rank=None if new < 0 else new,
            )
        )
    taken = {p.new_rank for p in participants if p.new_rank is not None}
    free_new = [r for r in range(new_r) if r not in taken]
    if len(free_new) != len(joining):
        raise RuntimeError(
            f"planner left {len(free_new)} new ranks for {len(joining)} joining devices"
        )
    for new, rank in zip(free_new, joining, strict=True):
        participants.append(
            Participant(
                node_id=rank.node_id, device_index=rank.device_index, old_rank=None, new_rank=new
            )
        )

    schedule = schedule_transfers(
        rplan, float(spec.model.expert_bytes), link_bandwidth=inputs.link_bandwidth
    )
    rows = [
        (t.layer, t.expert, t.src_rank, t.dst_rank, t.dst_slot, rnd, schedule.tag_of(t))
        for rnd, transfers in enumerate(schedule.rounds)
        for t in transfers
    ]
    table = np.asarray(rows, dtype=np.int64).reshape(-1, 7)
    # copies between old ranks travel over the active world only when every old rank has it
    graceful_down = new_r < old_r and not failed and not inputs.groupless
    bytes_per = spec.model.expert_bytes
    stats = rplan.stats
    lower = int(stats["lower_bound"])
    plan = OpPlan(
        from_dp=layout.dp_size,
        to_dp=request.dp_size,
        participants=participants,
        rank_map=rank_map,
        placement=EncodedArray.encode(rplan.placement.phy2log.astype(np.int64)),
        transfers=EncodedArray.encode(table),
        transfer_world="active" if graceful_down else "standby",
        stats=PlanStats(
            copies=len(rplan.transfers),
            lower_bound=lower,
            checkpoint_reloads=sum(1 for t in rplan.transfers if t.src_rank < 0),
            bytes=len(rplan.transfers) * bytes_per,
            max_rank_bytes_in=int(max(schedule.rank_bytes_in.values(), default=0)),
            max_rank_bytes_out=int(max(schedule.rank_bytes_out.values(), default=0)),
            balancedness_before=float(stats.get("balancedness_before", 0.0)),
            balancedness_after=float(stats.get("balancedness_after", 0.0)),
            rounds=len(schedule.rounds),
            est_transfer_s=float(schedule.makespan),
            makespan_lower_bound_s=float(schedule.makespan_lower_bound),
        ),
    )
    if failed:
        kind = OpKind.RECOVER
    elif new_r > old_r:
        kind = OpKind.SCALE_UP
    elif new_r < old_r:
        kind = OpKind.SCALE_DOWN
    else:
        kind = OpKind.REBALANCE
    return PlannedOperation(kind=kind, plan=plan, schedule_rounds=len(schedule.rounds))


def plan_preview(plan: OpPlan, layout: Layout) -> dict[str, object]:
    """The dry-run view: ranks that join and leave, copies, bytes, balance, time."""
    joining = [p for p in plan.participants if p.old_rank is None]
    leaving = [p for p in plan.participants if p.new_rank is None]
    present = {(p.node_id, p.device_index) for p in plan.participants}
    lost = [i for i, r in enumerate(layout.ranks) if (r.node_id, r.device_index) not in present]
    return {
        "from_dp": plan.from_dp,
        "to_dp": plan.to_dp,
        "ranks_added": [
            {"new_rank": p.new_rank, "node_id": p.node_id, "device_index": p.device_index}
            for p in joining
        ],
        "ranks_removed": [
            {"old_rank": p.old_rank, "node_id": p.node_id, "device_index": p.device_index}
            for p in leaving
        ],
        "ranks_lost": lost,
        "rank_map": plan.rank_map,
        "transfer_world": plan.transfer_world,
        **plan.stats.model_dump(),
    }
