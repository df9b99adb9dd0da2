"""Two agents run a deployment through real operations: bring-up, scale up, scale down.

Everything is real: agent processes, spawned workers, gloo groups, etcd. The test plays
the controller through :class:`ContractDriver`.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from eep_controller.probe import ProbeResult
from eep_controller.protocol import AckStatus, Operation, OpState
from tests.integration.agent.harness import (
    ContractDriver,
    ranks,
    round_robin_placement,
    start_agent,
)
from tests.support.processes import Proc

pytestmark = [pytest.mark.torch, pytest.mark.timeout(240)]

FOUR = ranks(("a", 0), ("a", 1), ("b", 0), ("b", 1))
SIX = ranks(("a", 0), ("a", 1), ("b", 0), ("b", 1), ("a", 2), ("b", 2))
THREE = ranks(("a", 0), ("b", 0), ("b", 1))


def placement(driver: ContractDriver, n: int, shift: int = 0):  # type: ignore[no-untyped-def]
    m = driver.spec.model
    return round_robin_placement(
        m.num_moe_layers, m.num_experts, n, driver.spec.slots_per_rank, shift
    )


async def _probe_while(
    driver: ContractDriver, results: list[ProbeResult], stop: asyncio.Event
) -> None:
    seed = 100
    while not stop.is_set():
        results.append(await driver.probe(num_tokens=8, seed=seed))
        seed += 1
        await asyncio.sleep(0.05)


async def test_standby_worlds_of_3_and_6_ranks_are_built_beside_a_serving_4_rank_world(
    etcd: str, prefix: str, small_driver: ContractDriver, agents: list[Proc]
) -> None:
    driver = small_driver
    agents += [start_agent(etcd, prefix, "a", 3), start_agent(etcd, prefix, "b", 3)]
    bring_up = await driver.run_op(FOUR, placement(driver, 4))
    assert bring_up.state is OpState.SUCCEEDED, bring_up.acks
    assert all(a.tensors_verified > 0 for a in bring_up.acks[OpState.TRANSFERRING].values())
    first = await driver.probe(num_tokens=16, seed=1)
    assert first.ok, first
    assert first.generation == 1

    for target, shift in ((SIX, 3), (FOUR, 1), (THREE, 2)):
        probes: list[ProbeResult] = []
        old_generation = (await driver.layout()).generation  # type: ignore[union-attr]
        checked_old_world_serving: list[OpState] = []

        async def during(phase: OpState, op: Operation, probes: list[ProbeResult] = probes) -> None:
            # SWITCHING too: a probe that reads g+1 before a worker switched gets a 409 and retries
            if phase in (OpState.PREPARING, OpState.TRANSFERRING, OpState.SWITCHING):
                stop = asyncio.Event()
                task = asyncio.create_task(_probe_while(driver, probes, stop))
                await asyncio.sleep(0.3)
                stop.set()
                await task

        async def after(
            phase: OpState,
            op: Operation,
            seen: list[OpState] = checked_old_world_serving,
            g: int = old_generation,
        ) -> None:
            if phase in (OpState.PREPARING, OpState.TRANSFERRING):
                # standby group built / experts staged: the old world still answers, unchanged
                result = await driver.probe(num_tokens=8, seed=7)
                assert result.ok, result
                assert result.generation == g
                seen.append(phase)

        outcome = await driver.run_op(
            target, placement(driver, len(target), shift), during=during, after=after
        )
        assert outcome.op.plan is not None
        # growth moves over the standby world, shrinking over the old one (leavers still send)
        assert outcome.op.plan.transfer_world == ("standby" if len(target) > 4 else "active")
        moved = outcome.acks[OpState.TRANSFERRING].values()
        assert sum(a.bytes_received for a in moved) > 0
        assert sum(a.checksum_failures for a in moved) == 0
        assert outcome.state is OpState.SUCCEEDED, outcome.acks
        assert checked_old_world_serving == [OpState.PREPARING, OpState.TRANSFERRING]
        assert probes and all(p.ok for p in probes), [p for p in probes if not p.ok]
        for phase_acks in outcome.acks.values():
            assert all(a.status is AckStatus.OK for a in phase_acks.values())
        result = await driver.probe(num_tokens=16, seed=2)
        assert result.ok, result
        assert result.generation == old_generation + 1
        assert result.max_abs_err <= 1e-5


async def test_an_abort_leaves_alone_a_worker_a_newer_operation_started_on_the_same_device(
    etcd: str, prefix: str, small_driver: ContractDriver, agents: list[Proc]
) -> None:
    """X grows onto three devices of node b and is aborted; Y, written with the abort,
    grows onto b's third device again. Undoing X stops its joining workers one at a time,
    and by the time it came to that device the worker there was Y's: it was stopped, and Y
    failed its PREPARING (a soak run hit this when a recover followed an aborted scale-up)."""
    driver = small_driver
    agents.append(start_agent(etcd, prefix, "a", 2))
    agents.append(start_agent(etcd, prefix, "b", 3))
    two = ranks(("a", 0), ("a", 1))
    assert (await driver.run_op(two, placement(driver, 2))).state is OpState.SUCCEEDED
    grown = ranks(("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2))
    x = await driver.new_op(grown, placement(driver, 5))
    await driver.store.put(driver.keys.op(driver.d, x.id), x)
    x = await driver.advance(x, OpState.PREPARING)
    acks = await driver.phase_acks(x, OpState.PREPARING)
    assert len(acks) == 5 and all(a.status is AckStatus.OK for a in acks.values()), acks
    y = await driver.new_op(ranks(("a", 0), ("a", 1), ("b", 2)), placement(driver, 3, shift=1))
    now = time.time()
    x = x.model_copy(update={"state": OpState.ABORTED, "updated_at": now})
    y = y.model_copy(
        update={"state": OpState.PREPARING, "updated_at": now, "phase_deadline_at": now + 60}
    )
    # one transaction, as when a recover follows an abort at once
    txn = driver.store.txn()
    driver.store.put_op(txn, driver.keys.op(driver.d, x.id), x)
    driver.store.put_op(txn, driver.keys.op(driver.d, y.id), y)
    assert await driver.store.commit(txn)
    acks = await driver.phase_acks(y, OpState.PREPARING)
    assert len(acks) == 3, acks
    assert all(a.status is AckStatus.OK for a in acks.values()), {
        i: a.reason for i, a in acks.items()
    }
    await driver.advance(y, OpState.ABORTED)
    result = await driver.probe(num_tokens=8, seed=3)
    assert result.ok and result.generation == 1, result
