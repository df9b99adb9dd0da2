"""Fixtures of the agent integration tests: checkpoints, agents as real processes, the contract driver."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from eep_controller.probe import write_synthetic
from tests.integration.agent.harness import ContractDriver, spec_for
from tests.support.processes import Proc


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers x 8 experts, H=32, I=64, top-2: fast to load and move."""
    out = tmp_path_factory.mktemp("ckpt-small")
    write_synthetic(out, layers=2, experts=8, hidden=32, inter=64, seed=7, top_k=2)
    return out


@pytest.fixture
def agents() -> Iterator[list[Proc]]:
    """Agents a test starts; each is stopped by pid (SIGTERM, then SIGKILL) at the end."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop(timeout=20)


@pytest.fixture
async def small_driver(
    etcd: str, prefix: str, small_checkpoint: Path
) -> AsyncIterator[ContractDriver]:
    spec = spec_for(
        "moe",
        small_checkpoint,
        slots=4,
        max_dp=8,
        deadlines={"preparing_s": 60, "transferring_s": 60},
    )
    driver = ContractDriver(etcd, prefix, spec)
    await driver.write_spec()
    yield driver
    await driver.close()
