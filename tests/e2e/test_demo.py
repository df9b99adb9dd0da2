"""The README's run command: ``eep-controller demo --scale 2,4,3 --exit --json``."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.processes import BIN

pytestmark = [pytest.mark.torch, pytest.mark.timeout(400)]


def test_demo_scales_2_4_3_and_reports_a_verified_summary(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run(
        [
            str(BIN / "eep-controller"),
            "demo",
            "--scale",
            "2,4,3",
            "--exit",
            "--json",
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=360,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True
    ops = summary["operations"]
    assert [(o["from_dp"], o["to_dp"]) for o in ops] == [(0, 2), (2, 4), (4, 3)]
    for op in ops:
        assert op["state"] == "SUCCEEDED"
        assert op["probes_failed"] == 0
        assert op["copies"] >= op["copy_lower_bound"]
        assert {
            "id",
            "bytes_moved",
            "balancedness_before",
            "balancedness_after",
            "seconds",
        } <= op.keys()
    assert summary["traffic"]["mismatches"] == 0 and summary["traffic"]["requests"] > 0
    assert "demo OK" in out.stderr
    assert "Traceback" not in out.stderr
