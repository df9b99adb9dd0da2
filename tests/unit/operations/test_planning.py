"""Planning an operation: devices, participants, the transfer table, and what each world carries."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eep_controller.errors import InsufficientDevices, Invalid
from eep_controller.operations.planning import PlanInputs, lost_ranks, plan_operation, recover_dp
from eep_controller.planner import plan_placement
from eep_controller.protocol import (
    DeploymentSpec,
    Device,
    DeviceKind,
    EncodedArray,
    Layout,
    NodeInfo,
    OpKind,
    Rank,
    ScaleRequest,
)

L, E, S = 3, 8, 4


def spec(**kw: object) -> DeploymentSpec:
    base: dict[str, object] = {
        "name": "d",
        "model": {"num_moe_layers": L, "num_experts": E, "expert_bytes": 100, "top_k": 2},
        "slots_per_rank": S,
        "min_dp": 2,
        "max_dp": 8,
    }
    base.update(kw)
    return DeploymentSpec.model_validate(base)


def nodes(*counts: int) -> list[NodeInfo]:
    return [
        NodeInfo(
            node_id=f"n{i}",
            address="http://x",
            agent_version="t",
            devices=[Device(index=d, kind=DeviceKind.CPU) for d in range(c)],
        )
        for i, c in enumerate(counts)
    ]


def layout(ranks: int, seed: int = 0) -> Layout:
    load = np.random.default_rng(seed).lognormal(0, 1, (L, E))
    rank_list = [Rank(node_id=f"n{r // 4}", device_index=r % 4) for r in range(ranks)]
    phy = plan_placement(load, ranks, S).phy2log
    return Layout(deployment="d", generation=3, dp_size=ranks, ranks=rank_list, slots_per_rank=S,
                  placement=EncodedArray.encode(phy.astype(np.int64)))  # fmt: skip


def layout_of(ranks: int, slots: int) -> Layout:
    """A layout of `ranks` ranks with `slots` slots each (every expert placed once or more)."""
    phy = plan_placement(np.ones((L, E)), ranks, slots).phy2log
    rank_list = [Rank(node_id=f"n{r // 4}", device_index=r % 4) for r in range(ranks)]
    return Layout(deployment="d", generation=3, dp_size=ranks, ranks=rank_list, slots_per_rank=slots,
                  placement=EncodedArray.encode(phy.astype(np.int64)))  # fmt: skip


def inputs(lay: Layout, node_list: list[NodeInfo], seed: int = 1, **kw: object) -> PlanInputs:
    load = np.random.default_rng(seed).lognormal(0, 1, (L, E))
    return PlanInputs(spec(**kw), lay, node_list, frozenset(), load, 1e9)


def check_plan_consistency(plan_inputs: PlanInputs, planned) -> None:  # type: ignore[no-untyped-def]
    plan = planned.plan
    old = plan_inputs.layout.phy2log()
    table = plan.transfers.decode()
    new = plan.placement.decode()
    new_to_old = {p.new_rank: p.old_rank for p in plan.participants if p.new_rank is not None}
    assert sorted(new_to_old) == list(range(new.shape[1] // S))
    assert len({(p.node_id, p.device_index) for p in plan.participants}) == len(plan.participants)
    # applying the transfers to the old placement gives the new one, slot by slot
    rebuilt = np.full_like(new, -1)
    for n, o in new_to_old.items():
        if o is not None and old is not None:
            rebuilt[:, n * S : (n + 1) * S] = old[:, o * S : (o + 1) * S]
    for layer, expert, src, dst, slot, _rnd, _tag in table.tolist():
        rebuilt[layer, dst * S + slot] = expert
        if src >= 0:
            assert old is not None and expert in old[layer, src * S : (src + 1) * S]
            in_world_dst = new_to_old[dst] if plan.transfer_world == "active" else dst
            in_world_src = src if plan.transfer_world == "active" else plan.rank_map[src]
            assert in_world_src != in_world_dst, "a rank never sends to itself"
            assert in_world_dst is not None and in_world_src >= 0
    assert np.array_equal(rebuilt, new)
    assert len(set(table[:, 6].tolist())) == len(table)  # unique tags
    assert plan.stats.copies == len(table)


@settings(max_examples=40, deadline=None)
@given(old=st.integers(2, 8), new=st.integers(2, 8), seed=st.integers(0, 1000))
def test_graceful_rescales_are_consistent(old: int, new: int, seed: int) -> None:
    lay = layout(old, seed)
    pi = inputs(lay, nodes(4, 4), seed + 1)
    planned = plan_operation(pi, ScaleRequest(dp_size=new)) if old != new else None
    if planned is None:
        return
    check_plan_consistency(pi, planned)
    assert planned.kind is (OpKind.SCALE_UP if new > old else OpKind.SCALE_DOWN)
    assert planned.plan.transfer_world == ("active" if new < old else "standby")


@settings(max_examples=40, deadline=None)
@given(
    old=st.integers(3, 8),
    seed=st.integers(0, 1000),
    groupless=st.lists(st.integers(0, 7), min_size=1, max_size=2, unique=True),
    by_user=st.booleans(),
)
def test_a_scale_down_with_a_rank_lacking_its_active_group_goes_over_the_standby_world(
    old: int, seed: int, groupless: list[int], by_user: bool
) -> None:
    # a restarted worker serves without the active group: the old world cannot carry copies,
    # so leaving ranks do not send and what only they hold comes from the checkpoint
    lay = layout(old, seed)
    pi = replace(
        inputs(lay, nodes(4, 4), seed + 1), groupless=frozenset(g % old for g in groupless)
    )
    new = old - 1 - seed % (old - 2)
    leaving = sorted(range(old))[-(old - new) :] if by_user else None
    planned = plan_operation(pi, ScaleRequest(dp_size=new, remove_ranks=leaving))
    check_plan_consistency(pi, planned)  # every source is a rank of the new (standby) world
    assert planned.kind is OpKind.SCALE_DOWN and planned.plan.transfer_world == "standby"
    gone = {p.old_rank for p in planned.plan.participants if p.new_rank is None}
    assert len(gone) == old - new and (leaving is None or gone == set(leaving))
    sources = set(planned.plan.transfers.decode()[:, 2].tolist())
    assert not sources & gone
    # without such a rank the same scale-down goes over the active world
    again = plan_operation(
        replace(pi, groupless=frozenset()), ScaleRequest(dp_size=new, remove_ranks=leaving)
    )
    assert again.plan.transfer_world == "active"


@settings(max_examples=80, deadline=None)
@given(
    old=st.integers(2, 8),
    new=st.integers(1, 9),
    seed=st.integers(0, 1000),
    spare=st.lists(st.integers(0, 5), max_size=3),
    remove=st.lists(st.integers(0, 8), max_size=4, unique=True),
    failed=st.lists(st.integers(0, 7), max_size=3, unique=True),
    below=st.booleans(),
)
def test_any_request_gives_a_consistent_plan_or_a_clear_refusal(
    old: int,
    new: int,
    seed: int,
    spare: list[int],
    remove: list[int],
    failed: list[int],
    below: bool,
) -> None:
    """Scale requests with or without remove_ranks, with or without lost ranks (a recover):
    either a plan every agent can carry out, or Invalid / InsufficientDevices. Carried out
    means: each participant's share of the table (as its agent reads it) is valid, and every
    copy is sent once and received once, or reloaded once."""
    from eep_agent.runtime.moves import MoveKind, moves_for_participant

    pi = inputs(layout(old, seed), nodes(4, 4, *spare), seed + 1)
    lost = [r for r in failed if r < old]
    request = ScaleRequest(dp_size=new, remove_ranks=remove or None)
    try:
        planned = plan_operation(pi, request, failed=lost, allow_below_min=below)
    except (Invalid, InsufficientDevices):
        return
    check_plan_consistency(pi, planned)
    plan = planned.plan
    table = plan.transfers.decode()
    seen: dict[MoveKind, Counter[int]] = {kind: Counter() for kind in MoveKind}
    for index in range(len(plan.participants)):
        share = moves_for_participant(
            table, plan.participants, plan.rank_map, plan.transfer_world, index, slots_per_rank=S
        )
        for move in share.moves:
            seen[move.kind][move.tag] += 1
    for src, tag in table[:, [2, 6]].tolist():
        if src < 0:
            assert (seen[MoveKind.RELOAD][tag], seen[MoveKind.SEND][tag]) == (1, 0)
        else:
            assert (seen[MoveKind.SEND][tag], seen[MoveKind.RECV][tag]) == (1, 1)


def test_recover_aims_at_the_survivors_but_never_below_holding_every_expert() -> None:
    lay = layout(4)  # 4 ranks x 4 slots for 8 experts: 2 ranks hold every expert
    assert recover_dp(spec(), lay, [3]) == 3
    assert recover_dp(spec(), lay, [0, 1, 2]) == 2  # 1 survivor: a free device must join
    assert recover_dp(spec(), lay, [0, 1, 2, 3]) == 2
    assert recover_dp(spec(), lay, [3, 3]) == 3  # a rank named twice counts once
    wide = spec(tp=2, slots_per_rank=2, min_dp=2)  # 4 EP ranks of 2 slots hold 8 experts
    assert recover_dp(wide, layout_of(8, 2), [5]) == 3  # 7 survivors make 3 whole dp groups
    assert recover_dp(wide, layout_of(8, 2), [0, 1, 2, 3, 4]) == 2


def test_bring_up_reads_every_slot_from_the_checkpoint() -> None:
    empty = Layout(deployment="d", generation=0, dp_size=0, ranks=[], slots_per_rank=S)
    planned = plan_operation(inputs(empty, nodes(2, 2)), ScaleRequest(dp_size=3))
    table = planned.plan.transfers.decode()
    assert len(table) == L * 3 * S and (table[:, 2] == -1).all()
    assert all(p.old_rank is None for p in planned.plan.participants)
    assert planned.plan.stats.checkpoint_reloads == planned.plan.stats.copies


def test_failed_ranks_reload_orphans_and_never_send() -> None:
    lay = layout(6)
    pi = inputs(lay, nodes(4, 2))
    planned = plan_operation(pi, ScaleRequest(dp_size=5), failed=[2], allow_below_min=True)
    check_plan_consistency(pi, planned)
    table = planned.plan.transfers.decode()
    assert 2 not in table[:, 2].tolist()
    assert all(p.old_rank != 2 for p in planned.plan.participants)
    assert planned.kind is OpKind.RECOVER and planned.plan.transfer_world == "standby"


def test_recover_that_also_drops_live_ranks_never_sources_from_them() -> None:
    """Rank 0 lost and dp 4 -> 2: one live rank must leave too. Copies travel in the
    standby world, which holds only the new ranks, so the leaver cannot send there; every
    copy comes from a staying rank or the checkpoint (a leaver as source made the agents
    fail the transfer phase)."""
    lay = layout(4)
    pi = inputs(lay, nodes(4, 4))
    planned = plan_operation(pi, ScaleRequest(dp_size=2), failed=[0])
    check_plan_consistency(pi, planned)
    plan = planned.plan
    assert plan.transfer_world == "standby"
    leavers = [p.old_rank for p in plan.participants if p.new_rank is None]
    assert len(leavers) == 1 and leavers[0] != 0
    sources = set(plan.transfers.decode()[:, 2].tolist())
    assert not sources & {0, *leavers}


def test_recover_after_every_rank_is_lost_loads_all_from_the_checkpoint() -> None:
    lay = layout(2)  # both on n0
    pi = inputs(lay, [*nodes(0), *nodes(0, 3)[1:]])  # n0 is gone, n1 has 3 free devices
    planned = plan_operation(pi, ScaleRequest(dp_size=2), failed=[0, 1], allow_below_min=True)
    plan = planned.plan
    table = plan.transfers.decode()
    assert len(table) == L * 2 * S and (table[:, 2] == -1).all()
    assert plan.rank_map == [-1, -1]
    assert sorted((p.node_id, p.old_rank, p.new_rank) for p in plan.participants) == [
        ("n1", None, 0),
        ("n1", None, 1),
    ]
    assert planned.kind is OpKind.RECOVER


def test_remove_ranks_with_lost_ranks_is_invalid() -> None:
    pi = inputs(layout(5), nodes(4, 4))
    with pytest.raises(Invalid, match="lost ranks"):
        plan_operation(pi, ScaleRequest(dp_size=2, remove_ranks=[1, 2, 3]), failed=[0])


def test_scale_up_takes_free_devices_on_hosting_nodes_first() -> None:
    lay = layout(3)  # n0 devices 0..2
    planned = plan_operation(inputs(lay, nodes(4, 4)), ScaleRequest(dp_size=5))
    joining = [(p.node_id, p.device_index) for p in planned.plan.participants if p.old_rank is None]
    assert joining == [("n0", 3), ("n1", 0)]


def test_missing_devices_are_counted() -> None:
    with pytest.raises(InsufficientDevices) as err:
        plan_operation(inputs(layout(4), nodes(4, 1)), ScaleRequest(dp_size=7))
    assert err.value.extra == {"needed": 3, "available": 1, "missing": 2}
    assert "needs 3 free healthy devices; 1 available, 2 missing" in err.value.detail
    with pytest.raises(InsufficientDevices) as one:
        plan_operation(inputs(layout(4), nodes(4, 0)), ScaleRequest(dp_size=5))
    assert "needs 1 free healthy device; 0 available" in one.value.detail, one.value.detail


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"dp_size": 9}, "outside"),
        ({"dp_size": 1}, "outside"),
        ({"dp_size": 3, "remove_ranks": [9]}, "out of range"),
        ({"dp_size": 3, "remove_ranks": [0, 1]}, "names 2"),
        ({"dp_size": 5, "remove_ranks": [0]}, "only for scaling down"),
    ],
)
def test_invalid_requests_raise(request_body: dict[str, object], message: str) -> None:
    with pytest.raises(Invalid, match=message):
        plan_operation(inputs(layout(4), nodes(4, 4)), ScaleRequest.model_validate(request_body))


def test_explicit_remove_ranks_are_the_ones_that_leave() -> None:
    lay = layout(5)
    pi = inputs(lay, nodes(4, 4))
    planned = plan_operation(pi, ScaleRequest(dp_size=3, remove_ranks=[1, 3]))
    check_plan_consistency(pi, planned)
    leaving = [p.old_rank for p in planned.plan.participants if p.new_rank is None]
    assert sorted(r for r in leaving if r is not None) == [1, 3] and None not in leaving


def test_lost_ranks_are_those_without_a_live_node() -> None:
    assert lost_ranks(layout(6), nodes(4)) == [4, 5]
