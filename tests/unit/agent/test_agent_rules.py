"""Rules the agent follows that need no processes: fencing, the etcd view, the CLI's checkpoint writer."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from eep_agent.op_driver import fenced
from eep_agent.reconciler import NodeReconciler
from eep_agent.view import DeploymentView

from eep_controller.probe import CheckpointReader
from eep_controller.protocol import Operation, OpState, ScaleRequest
from eep_controller.store import KeySpace, Resync, WatchEvent


def _op(state: OpState = OpState.PREPARING, g: int = 4) -> Operation:
    now = time.time()
    return Operation(
        id="op-1", deployment="d", kind="scale_up", state=state, from_generation=g, to_generation=g + 1,
        request=ScaleRequest(dp_size=2), created_at=now, updated_at=now,
    )  # fmt: skip


def test_preparing_and_transferring_act_only_on_the_committed_generation() -> None:
    for phase in (OpState.PREPARING, OpState.TRANSFERRING):
        assert fenced(_op(phase), phase, committed_generation=4)
        assert not fenced(_op(phase), phase, committed_generation=5)
        assert not fenced(_op(phase), phase, committed_generation=3)


def test_switching_and_cleanup_act_only_once_the_target_generation_is_committed() -> None:
    for phase in (OpState.SWITCHING, OpState.CLEANUP):
        assert fenced(_op(phase), phase, committed_generation=5)
        assert not fenced(_op(phase), phase, committed_generation=4)
    assert not fenced(_op(OpState.ABORTED), OpState.ABORTED, committed_generation=4)


async def test_the_view_tracks_ops_acks_and_skips_corrupt_values() -> None:
    keys = KeySpace("/p")
    view = DeploymentView(keys)
    op = _op()
    await view.apply(Resync(10, {keys.op("d", op.id): (op.model_dump_json().encode(), 10)}))
    assert [o.id for o in view.ops("d")] == ["op-1"]
    assert view.committed_generation("d") == 0  # nothing committed yet: the empty generation
    await view.apply(WatchEvent(keys.ack("d", op.id, "PREPARING", 1), b"{}", 11))
    assert view.has_ack("d", op.id, "PREPARING", 1) and not view.has_ack("d", op.id, "PREPARING", 0)
    assert [o.id for o in view.ops("d")] == ["op-1"]  # acks under the op are not ops
    await view.apply(WatchEvent(keys.op("d", "bad"), b"not json", 12))
    assert [o.id for o in view.ops("d")] == ["op-1"]
    await view.apply(WatchEvent(keys.op("d", op.id), None, 13))
    assert view.ops("d") == [] and view.deployments() == ["d"]


def test_make_checkpoint_writes_a_deterministic_checkpoint(tmp_path: Path) -> None:
    args = [
        "--layers",
        "2",
        "--experts",
        "4",
        "--hidden",
        "8",
        "--inter",
        "16",
        "--seed",
        "3",
        "--top-k",
        "2",
    ]
    for name in ("a", "b"):
        out = subprocess.run(
            [sys.executable, "-m", "eep_agent.cli", "make-checkpoint", *args, "--out", str(tmp_path / name)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "2 layers x 4 experts" in out.stdout
    meta = json.loads((tmp_path / "a" / "eep-checkpoint.json").read_text())
    assert (meta["layers"], meta["experts"], meta["hidden"], meta["inter"], meta["top_k"]) == (
        2,
        4,
        8,
        16,
        2,
    )
    a, b = CheckpointReader(tmp_path / "a"), CheckpointReader(tmp_path / "b")
    for layer in range(2):
        np.testing.assert_array_equal(a.gate(layer), b.gate(layer))
        for e in range(4):
            for x, y in zip(a.expert(layer, e), b.expert(layer, e), strict=True):
                np.testing.assert_array_equal(x, y)
    bad = subprocess.run(
        [sys.executable, "-m", "eep_agent.cli", "make-checkpoint", *args[:-1], "9", "--out", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode != 0 and "top_k" in bad.stderr


async def test_an_abort_starts_only_after_the_ops_phase_actions_have_ended() -> None:
    """An action that swallows its first cancel (the ``wait_for`` race) still ends first."""
    events: list[str] = []

    async def act() -> None:
        swallowed = False
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                events.append("cancel")
                if swallowed:
                    events.append("act ended")
                    raise
                swallowed = True

    class Driver:
        view = DeploymentView(KeySpace("/p"))
        pool = None
        node = SimpleNamespace(node_id="n1")

        async def abort(self, op: Operation) -> None:
            events.append(f"abort {op.id}")

    reconciler = NodeReconciler(Driver())  # type: ignore[arg-type]
    task = asyncio.create_task(act())
    await asyncio.sleep(0.02)
    await asyncio.wait_for(reconciler._abort(_op(OpState.ABORTED), [task]), 5)
    assert events == ["cancel", "cancel", "act ended", "abort op-1"]
