"""Shared fixtures: one real etcd per test session, a fresh key prefix per test."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from eep_controller.store import EmbeddedEtcd, EtcdConnection, EtcdStore, KeySpace

# Property tests draw the same examples on every run ("ci", the default), so a run that
# passes here passes in CI; EEP_HYPOTHESIS_PROFILE=explore draws new ones each run to hunt
# for bugs.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("EEP_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEtcd]:
    server = EmbeddedEtcd(tmp_path_factory.mktemp("etcd") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def etcd(etcd_server: EmbeddedEtcd) -> str:
    """The endpoint of the session's etcd (restarted if a test killed it)."""
    if etcd_server.proc is None:
        etcd_server.start()
    return etcd_server.endpoint


@pytest.fixture
def prefix() -> str:
    return f"/eep-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(etcd: str, prefix: str) -> AsyncIterator[EtcdStore]:
    s = EtcdStore(EtcdConnection([etcd]), KeySpace(prefix))
    yield s
    await s.close()


async def dump(etcd: str, prefix: str) -> dict[str, bytes]:
    """Every key under ``prefix`` with its value: for "nothing changed" assertions."""
    s = EtcdStore(EtcdConnection([etcd]), KeySpace(prefix))
    try:
        _, snap = await s.snapshot(prefix + "/")
        return {k: v for k, (v, _) in snap.items()}
    finally:
        await s.close()


def dump_sync(etcd: str, prefix: str) -> dict[str, bytes]:
    return asyncio.run(dump(etcd, prefix))


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[EmbeddedEtcd]:
    """An etcd of the test's own, for tests that kill and restart it."""
    server = EmbeddedEtcd(tmp_path / "etcd")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _planner_workers_stopped() -> Iterator[None]:
    """Planner worker processes started by any test are stopped (by pid) at the end."""
    from eep_controller.planner.workers import shutdown_workers

    yield
    shutdown_workers()
