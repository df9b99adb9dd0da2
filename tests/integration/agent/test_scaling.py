"""Two agents run a deployment through real operations: bring-up, scale up, scale down.

Everything is real: agent processes, spawned workers, gloo groups, etcd. The test plays
the controller through :class:`ContractDriver`.
"""

from __future__ import annotations

import asyncio

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
