"""A short soak in every test run: random scales, cancels, agent kills, a worker kill and a
controller restart on a whole local cluster, with the soak's checks after every step (every committed
rank on a live node, no expert without a replica, every operation ended exactly once, the
MoE output exact). Longer runs: ``python -m tests.e2e.soak --seed N --steps 25``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.soak import run

pytestmark = [pytest.mark.torch, pytest.mark.timeout(600)]

# This seed's six steps revive an agent, cancel an operation in time and one too late,
# scale, restart the controller mid-operation and kill an agent mid-operation; after the
# fifth a serving worker is killed (and restarted by its agent).
SEED = 71
STEPS = 6


def test_a_short_soak_keeps_every_invariant(tmp_path: Path) -> None:
    soak = run(SEED, STEPS, tmp_path)
    assert soak.worker_kills >= 1
    assert soak.checks == STEPS + 1 + soak.worker_kills  # the bring-up, every step, every kill
    assert {"scale", "cancel", "ctl_restart", "kill_mid", "revive"} <= set(soak.actions)
