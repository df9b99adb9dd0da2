"""`python -m bench.planner --sweep` on one small shape: rows, goals and the report."""

from __future__ import annotations

import pytest

from bench import planner as bench


def test_the_sweep_reports_every_cell_and_lists_those_over_a_goal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "SWEEP_PLACEMENTS", [(8, 36)])
    monkeypatch.setattr(
        bench, "SWEEP_RESCALES", [("8->12", 8, 12, 36, ()), ("8->7 fail", 8, 7, 40, (2,))]
    )
    found = bench.sweep([("zipf", 1.0)], 1)
    assert [r["shape"] for r in found["placement"]] == ["8x36"]
    assert [r["shape"] for r in found["rescale"]] == ["8->12 x36", "8->7 fail x40"]
    for row in found["placement"] + found["rescale"]:
        assert row["ms"] > 0 and 0.0 < row["bal"] <= 1.0
    slow = [r for r in found["rescale"] if r["ms"] > 150.0]
    assert len(found["over_time"]) == len(slow) + sum(r["ms"] > 20.0 for r in found["placement"])
    assert found["below_0.99"] == [
        f"zipf 1.0 rescale {r['shape']}" for r in found["rescale"] if r["bal"] < 0.99
    ]
    bench.render_sweep(found)
    out = capsys.readouterr().out
    assert "8->7 fail x40" in out and "rescales below 0.99" in out
