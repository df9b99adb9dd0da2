"""Verified expert transfer at size, and what happens when bytes or peers go bad."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from eep_agent.runtime.transfer import CORRUPT_ENV, PAUSE_ENV

from eep_controller.probe import write_synthetic
from eep_controller.protocol import AckStatus, GrouplessRank, Layout, Operation, OpState
from tests.integration.agent.harness import (
    ContractDriver,
    ranks,
    round_robin_placement,
    spec_for,
    start_agent,
    worker_pids,
)
from tests.support.processes import Proc

pytestmark = [pytest.mark.torch, pytest.mark.timeout(240)]

FOUR = ranks(("a", 0), ("a", 1), ("b", 0), ("b", 1))
SIX = ranks(("a", 0), ("a", 1), ("b", 0), ("b", 1), ("a", 2), ("b", 2))


async def test_more_than_200_mb_of_experts_cross_four_ranks_with_every_checksum_verified(
    etcd: str, prefix: str, tmp_path: Path, agents: list[Proc]
) -> None:
    # 2 layers x 20 experts of 3 x 512 x 1024 fp32 = 6.29 MB each: 251.7 MB of experts
    ckpt = tmp_path / "ckpt"
    meta = write_synthetic(ckpt, layers=2, experts=20, hidden=512, inter=1024, seed=3, top_k=2)
    spec = spec_for(
        "big", ckpt, slots=5, max_dp=4, deadlines={"preparing_s": 60, "transferring_s": 90}
    )
    driver = ContractDriver(etcd, prefix, spec)
    try:
        await driver.write_spec()
        agents += [start_agent(etcd, prefix, "a", 2), start_agent(etcd, prefix, "b", 2)]
        up = await driver.run_op(FOUR, round_robin_placement(2, 20, 4, 5))
        assert up.state is OpState.SUCCEEDED, up.acks
        # shifting by one rank's worth of slots moves every expert of every layer to another rank
        moved = await driver.run_op(
            FOUR, round_robin_placement(2, 20, 4, 5, shift=5), deadline_s=90
        )
        assert moved.state is OpState.SUCCEEDED, moved.acks
        acks = moved.acks[OpState.TRANSFERRING].values()
        received = sum(a.bytes_received for a in acks)
        assert received >= 200_000_000
        assert received >= 2 * 20 * meta.expert_bytes  # every expert crossed the wire
        assert sum(a.tensors_verified for a in acks) == 2 * 20 * 3
        assert all(a.checksum_failures == 0 and a.status is AckStatus.OK for a in acks)
        assert sum(a.bytes_sent for a in acks) == received
        result = await driver.probe(num_tokens=16, seed=5)
        assert result.ok, result
    finally:
        await driver.close()


async def test_a_corrupted_tensor_is_detected_at_the_destination_and_fails_its_ack(
    etcd: str, prefix: str, small_driver: ContractDriver, agents: list[Proc]
) -> None:
    driver = small_driver
    corrupt = {
        CORRUPT_ENV: "1:3:1"
    }  # layer 1, expert 3, w2: flipped after the sender checksummed it
    agents += [
        start_agent(etcd, prefix, "a", 2, env=corrupt),
        start_agent(etcd, prefix, "b", 2, env=corrupt),
    ]
    m = driver.spec.model
    up = await driver.run_op(FOUR, round_robin_placement(m.num_moe_layers, m.num_experts, 4, 4))
    assert up.state is OpState.SUCCEEDED, up.acks  # bring-up reads the checkpoint: nothing is sent
    before = await driver.layout()

    moved = await driver.run_op(
        FOUR, round_robin_placement(m.num_moe_layers, m.num_experts, 4, 4, shift=4)
    )
    assert moved.state is OpState.ABORTED
    assert moved.op.plan is not None
    rows = moved.op.plan.transfers.decode()
    copies = rows[(rows[:, 0] == 1) & (rows[:, 1] == 3) & (rows[:, 2] >= 0)]
    assert len(copies) >= 1
    failed = moved.failed(OpState.TRANSFERRING)
    # exactly the receivers of layer 1 / expert 3 failed, one bad tensor each
    receivers = {p.new_rank: i for i, p in enumerate(moved.op.plan.participants)}
    assert set(failed) == {receivers[int(dst)] for dst in copies[:, 3]}, moved.acks[
        OpState.TRANSFERRING
    ]
    for ack in failed.values():
        assert ack.checksum_failures == 1
        assert ack.reason is not None and "layer 1 expert 3 tensor 1" in ack.reason
        assert ack.tensors_verified > 0  # the other tensors it received were fine
    others = [a for i, a in moved.acks[OpState.TRANSFERRING].items() if i not in failed]
    assert all(a.checksum_failures == 0 for a in others)
    # the abort left generation g as it was, serving correct answers
    assert await driver.layout() == before
    result = await driver.probe(num_tokens=16, seed=9)
    assert result.ok and result.generation == before.generation, result  # type: ignore[union-attr]


async def _four_ranks_with_slow_rounds(
    driver: ContractDriver, etcd: str, prefix: str, agents: list[Proc], devices: int, pause: str
) -> Layout:
    """Agents a and b (`devices` each) whose transfer rounds start `pause` s late, serving
    ranks a/0, a/1, b/0, b/1; returns the committed layout."""
    slow = {PAUSE_ENV: pause}
    agents += [
        start_agent(etcd, prefix, "a", devices, env=slow),
        start_agent(etcd, prefix, "b", devices, env=slow),
    ]
    m = driver.spec.model
    up = await driver.run_op(FOUR, round_robin_placement(m.num_moe_layers, m.num_experts, 4, 4))
    assert up.state is OpState.SUCCEEDED, up.acks
    layout = await driver.layout()
    assert layout is not None
    return layout


async def test_a_peer_killed_mid_transfer_fails_the_others_within_the_deadline_and_the_old_world_serves(
    etcd: str, prefix: str, small_driver: ContractDriver, agents: list[Proc]
) -> None:
    driver = small_driver
    m = driver.spec.model
    # each round starts 0.3 s late: the kill lands mid-transfer
    before = await _four_ranks_with_slow_rounds(driver, etcd, prefix, agents, 3, "0.3")
    deadline_s = 20.0
    killed: list[int] = []

    async def kill_joiner(phase: OpState, op: Operation) -> None:
        if phase is OpState.TRANSFERRING:
            await asyncio.sleep(0.5)
            pid = worker_pids(agents[0].url or "")[2]  # the worker joining on a/2
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    started = time.monotonic()
    outcome = await driver.run_op(
        SIX,
        round_robin_placement(m.num_moe_layers, m.num_experts, 6, 4, 1),
        during=kill_joiner,
        deadline_s=deadline_s,
    )
    took = time.monotonic() - started
    assert killed
    assert outcome.state is OpState.ABORTED
    acks = outcome.acks[OpState.TRANSFERRING]
    assert len(acks) == 6, acks  # every participant answered: nobody hung
    failed = outcome.failed(OpState.TRANSFERRING)
    assert outcome.op.plan is not None
    joiner = next(
        i
        for i, p in enumerate(outcome.op.plan.participants)
        if (p.node_id, p.device_index) == ("a", 2)
    )
    assert joiner in failed and "exited" in (failed[joiner].reason or "")
    assert len(failed) >= 2  # its peers failed too, with a reason
    # peers waiting on the dead rank, or on a rank that failed because of it, fail at once:
    # a rank whose transfer fails destroys that group, which closes its connections
    assert all(a.finished_at - a.started_at < deadline_s for a in acks.values())
    assert took < 3 * deadline_s
    assert await driver.layout() == before
    result = await driver.probe(num_tokens=16, seed=11)
    assert result.ok and result.generation == before.generation, result
    # the agents cleaned up: the next attempt starts fresh workers and succeeds
    retry = await driver.run_op(
        SIX, round_robin_placement(m.num_moe_layers, m.num_experts, 6, 4, 1), deadline_s=deadline_s
    )
    assert retry.state is OpState.SUCCEEDED, retry.acks
    result = await driver.probe(num_tokens=16, seed=12)
    assert result.ok and result.generation == before.generation + 1, result


async def test_ranks_left_without_their_active_group_by_a_failed_transfer_are_marked_groupless(
    etcd: str, prefix: str, small_driver: ContractDriver, agents: list[Proc]
) -> None:
    driver = small_driver
    m = driver.spec.model
    # each round starts 1 s late: the kill lands mid-transfer
    before = await _four_ranks_with_slow_rounds(driver, etcd, prefix, agents, 2, "1.0")

    async def kill_receiver(phase: OpState, op: Operation) -> None:
        if phase is OpState.TRANSFERRING:
            await asyncio.sleep(0.3)
            os.kill(worker_pids(agents[0].url or "")[1], signal.SIGKILL)  # rank 1, on a/1

    # a graceful scale-down 4 -> 2 over the active world (each new rank receives two
    # experts); rank 1, a receiver, dies mid-transfer
    outcome = await driver.run_op(
        FOUR[:2],
        round_robin_placement(m.num_moe_layers, m.num_experts, 2, 4, 2),
        world="active",
        during=kill_receiver,
        deadline_s=20.0,
    )
    assert outcome.state is OpState.ABORTED
    failed = outcome.failed(OpState.TRANSFERRING)
    assert len(failed) >= 2, outcome.acks  # rank 1 and a peer that sent to it

    async def marked() -> set[int]:
        key = driver.keys.groupless(driver.d, before.generation)
        return {g.value.rank for g in await driver.store.list(key, GrouplessRank)}

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not await marked() - {1}:
        await asyncio.sleep(0.2)
    # a live rank (not the restarted one) whose failed transfer tore the active world down
    # says so (its agent asked the worker after the abort)
    assert await marked() - {1}, await marked()
    result = await driver.probe(num_tokens=16, seed=13)
    assert result.ok and result.generation == before.generation, result
