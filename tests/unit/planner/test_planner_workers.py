"""Planner worker processes: the same plan with and without them, and every fault handled.

These start real worker processes (``python -m eep_controller.planner.worker``) and stop
them by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from eep_controller.planner import Placement, RescalePlan, plan_placement, plan_rescale, workers
from eep_controller.planner.search import best_candidate
from eep_controller.planner.workers import (
    WORKERS_ENV,
    by_layers,
    configure_workers,
    layers_served,
    planning_alone,
    read_frame,
    send_frame,
    shutdown_workers,
    wait_for_workers,
    worker_pids,
)
from tests.unit.planner.planner_checks import assert_valid_plan, zipf_load

LAYERS = 12


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
def one_worker() -> Iterator[None]:
    configure_workers(1)
    assert wait_for_workers(timeout=60)
    yield
    pids = worker_pids()
    configure_workers(None)
    assert all(_gone(pid) for pid in pids)


def _case() -> tuple[Placement, np.ndarray]:
    load = zipf_load(LAYERS, 64, 1.3, seed=3)
    return plan_placement(load, 12, 7), load


def _plans_equal(a: RescalePlan, b: RescalePlan) -> None:
    assert np.array_equal(a.placement.phy2log, b.placement.phy2log)
    assert a.transfers == b.transfers
    assert np.array_equal(a.rank_map, b.rank_map)


def test_same_plan_with_and_without_workers(one_worker: None) -> None:
    current, load = _case()
    pid = worker_pids()
    assert len(pid) == 1
    served = layers_served()
    with_workers = [plan_rescale(current, load, n) for n in (10, 16, 12)]
    assert layers_served() == served + 3 * (LAYERS // 2)  # every other layer went there
    assert worker_pids() == pid  # the same worker served every plan
    configure_workers(0)
    served = layers_served()
    alone = [plan_rescale(current, load, n) for n in (10, 16, 12)]
    assert layers_served() == served
    assert worker_pids() == []
    assert _gone(pid[0])
    for a, b in zip(with_workers, alone, strict=True):
        _plans_equal(a, b)
        assert_valid_plan(current, a, ())


def test_same_placement_with_and_without_workers(one_worker: None) -> None:
    load = zipf_load(LAYERS, 64, 1.3, seed=5)
    for ranks, slots in ((12, 7), (4, 20)):  # 20 slots: pair swaps use the sorted search
        served = layers_served()
        shared = plan_placement(load, ranks, slots)
        assert layers_served() == served + LAYERS // 2
        with planning_alone():
            alone = plan_placement(load, ranks, slots)
        assert np.array_equal(shared.phy2log, alone.phy2log)


def test_workers_run_this_planner_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m` puts the working directory first on the path: a directory holding another
    `eep_controller` (a checkout of another version, say) must not supply the workers' code."""
    imposter = tmp_path / "eep_controller" / "planner"
    imposter.mkdir(parents=True)
    (tmp_path / "eep_controller" / "__init__.py").write_text("")
    (imposter / "__init__.py").write_text("")
    marker = tmp_path / "imposter-ran"
    (imposter / "worker.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    configure_workers(1)
    try:
        assert wait_for_workers(timeout=60)
        current, load = _case()
        served = layers_served()
        shared = plan_rescale(current, load, 16)
        assert layers_served() == served + LAYERS // 2
        with planning_alone():
            _plans_equal(shared, plan_rescale(current, load, 16))
        assert not marker.exists()
    finally:
        pids = worker_pids()
        configure_workers(None)
        assert all(_gone(pid) for pid in pids)


def test_concurrent_plans_share_the_workers_safely(one_worker: None) -> None:
    current, load = _case()
    expected = {n: plan_rescale(current, load, n) for n in (10, 12, 14, 16)}
    with ThreadPoolExecutor(4) as pool:
        plans = list(pool.map(lambda n: plan_rescale(current, load, n), expected))
    got = dict(zip(expected, plans, strict=True))
    for n, plan in got.items():
        _plans_equal(plan, expected[n])
    assert len(worker_pids()) == 1


def test_planning_alone_keeps_the_workers_up_but_unused(one_worker: None) -> None:
    current, load = _case()
    pids = worker_pids()
    served = layers_served()
    with planning_alone():
        alone = plan_rescale(current, load, 16)
    assert layers_served() == served
    assert worker_pids() == pids
    _plans_equal(plan_rescale(current, load, 16), alone)
    assert layers_served() == served + LAYERS // 2


def test_a_killed_worker_is_replaced_and_the_plan_is_unchanged(one_worker: None) -> None:
    current, load = _case()
    expected = plan_rescale(current, load, 16)
    (pid,) = worker_pids()
    os.kill(pid, signal.SIGKILL)
    served = layers_served()
    _plans_equal(plan_rescale(current, load, 16), expected)  # planned here instead
    assert layers_served() == served
    assert wait_for_workers(timeout=60)
    (fresh,) = worker_pids()
    assert fresh != pid
    _plans_equal(plan_rescale(current, load, 16), expected)
    assert layers_served() == served + LAYERS // 2


def test_a_stuck_worker_is_stopped_and_the_plan_is_unchanged(
    one_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    current, load = _case()
    expected = plan_rescale(current, load, 16)
    (pid,) = worker_pids()
    monkeypatch.setattr(workers, "ANSWER_TIMEOUT_S", 0.5)
    os.kill(pid, signal.SIGSTOP)
    try:
        _plans_equal(plan_rescale(current, load, 16), expected)
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGCONT)
    assert _gone(pid)  # stopped (killed by pid) and reaped
    assert wait_for_workers(timeout=60)
    assert worker_pids() != [pid]


def test_workers_that_cannot_start_are_given_up_after_a_few_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workers, "WORKER_MODULE", "eep_controller.planner.no_such_module")
    configure_workers(1)
    try:
        current, load = _case()
        expected = plan_rescale(current, load, 16)  # planned here while the worker fails
        for _ in range(workers.MAX_FAILED_STARTS):
            assert not wait_for_workers(timeout=30)
        served = layers_served()
        _plans_equal(plan_rescale(current, load, 16), expected)
        assert worker_pids() == []  # no new worker was started for this plan
        assert layers_served() == served
    finally:
        configure_workers(None)


def test_an_error_in_the_worker_is_raised_in_the_caller(one_worker: None) -> None:
    phy = np.zeros((LAYERS, 4, 2), dtype=np.int64)
    weight = np.ones((LAYERS, 3))  # expert ids in phy fit, but origin has the wrong rank
    origin = np.zeros((LAYERS, 5, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="broadcast"):
        by_layers(best_candidate, phy, weight, origin)
    assert len(worker_pids()) == 1  # the worker survives a failed call


def test_a_failure_here_leaves_no_unread_answer_behind(one_worker: None) -> None:
    current, load = _case()
    expected = plan_rescale(current, load, 16)

    def fails_here(*arrays: np.ndarray) -> np.ndarray:
        raise RuntimeError("this share failed")

    # the worker runs the real function by name; this process's share raises
    fails_here.__module__ = best_candidate.__module__
    fails_here.__qualname__ = best_candidate.__qualname__
    phy = current.by_rank()
    with pytest.raises(RuntimeError, match="this share failed"):
        by_layers(fails_here, phy, load, phy)
    # the worker's answer to that call must not be taken for the next plan's
    _plans_equal(plan_rescale(current, load, 16), expected)
    assert wait_for_workers(timeout=60)
    _plans_equal(plan_rescale(current, load, 16), expected)


def test_small_plans_stay_in_the_calling_process(one_worker: None) -> None:
    load = zipf_load(2, 16, 1.0)
    current = plan_placement(load, 4, 5)
    seen: list[int] = []

    def local(*arrays: np.ndarray) -> np.ndarray:
        seen.append(os.getpid())
        return best_candidate(*arrays)

    phy = current.by_rank()
    by_layers(local, phy, load, phy)  # a local function could not even be sent
    assert seen == [os.getpid()]


def test_the_worker_runs_only_planner_functions() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "eep_controller.planner.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert read_frame(proc.stdout) == "ready"
        send_frame(proc.stdin, ("os", "system", ("true",)))
        status, message = read_frame(proc.stdout)
        assert status == "error"
        assert "not a planner function" in message
        load = zipf_load(1, 8, 1.0)
        send_frame(
            proc.stdin,
            ("eep_controller.planner.replication", "greedy_counts", (load, 12, 4)),
        )
        status, counts = read_frame(proc.stdout)
        assert status == "ok"
        assert counts.sum() == 12
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_worker_count_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="workers must be >= 0"):
        configure_workers(-1)
    current, load = _case()
    monkeypatch.setenv(WORKERS_ENV, "many")
    configure_workers(None)
    with pytest.raises(ValueError, match=WORKERS_ENV):
        plan_rescale(current, load, 16)
    with pytest.raises(ValueError, match=WORKERS_ENV):
        plan_placement(load, 12, 7)
    monkeypatch.setenv(WORKERS_ENV, "0")
    plan_rescale(current, load, 16)
    assert worker_pids() == []
    shutdown_workers()
