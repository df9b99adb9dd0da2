"""`python -m bench.removals`: eep's removed ranks against removal sets one rank away."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import removals
from eep_controller.planner import plan_placement


def test_each_other_set_swaps_exactly_one_removed_rank_for_a_survivor() -> None:
    removed = (1, 4, 6)
    sets = removals.neighbour_sets(removed, 8, 100, np.random.default_rng(2))
    assert len(sets) == 3 * 5  # every (removed, survivor) pair once: no more exist
    assert len(set(sets)) == len(sets) and removed not in sets
    for s in sets:
        assert list(s) == sorted(s) and len(s) == 3 and all(0 <= r < 8 for r in s)
        assert len(set(s) & set(removed)) == 2


def test_the_other_sets_are_a_seeded_sample() -> None:
    first = removals.neighbour_sets((0, 2), 6, 3, np.random.default_rng(7))
    again = removals.neighbour_sets((0, 2), 6, 3, np.random.default_rng(7))
    assert first == again and len(first) == 3


def test_planning_with_a_given_set_uses_it_and_reports_its_own_bound() -> None:
    rng = np.random.default_rng(5)
    load = np.stack([rng.permutation(1.0 / np.arange(1, 33) ** 1.2) for _ in range(4)])
    current = plan_placement(load, 10, 5)
    chosen = removals.plan_with(current, load, 7, None)
    assert len(chosen["removed"]) == 3
    other = removals.neighbour_sets(tuple(chosen["removed"]), 10, 1, rng)[0]
    given = removals.plan_with(current, load, 7, other)
    assert tuple(given["removed"]) == other
    for r in (chosen, given):
        assert r["copies"] >= r["lower_bound"] >= 0
        assert r["ratio"] == pytest.approx(r["copies"] / max(r["lower_bound"], 1))
        assert 0.0 < r["bal"] <= 1.0


def test_the_summary_places_eep_among_the_other_sets() -> None:
    eep = {"copies": 100, "lower_bound": 80, "ratio": 1.25}
    others = [
        {"copies": 90, "lower_bound": 80, "ratio": 1.125},
        {"copies": 110, "lower_bound": 80, "ratio": 1.375},
        {"copies": 95, "lower_bound": 70, "ratio": 95 / 70},
    ]
    s = removals.summarise(eep, others)
    assert s["sets"] == 3 and s["fewer_copies"] == 2
    assert s["copies"] == {"min": 90, "median": 95, "max": 110}
    assert s["same_bound_sets"] == 2
    assert s["same_bound_copies"] == {"min": 90, "median": 100, "max": 110}
    assert s["same_bound_ratio"]["median"] == pytest.approx(1.25)


def test_the_script_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        removals.main(["--old", "12", "--new", "8", "--slots", "36", "--sets", "2", "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["rescale"] == "12->8 x36" and len(out["others"]) == 2
    assert len(out["eep"]["removed"]) == 4
    assert all(len(set(o["removed"]) & set(out["eep"]["removed"])) == 3 for o in out["others"])
    assert out["summary"]["sets"] == 2


@pytest.mark.parametrize(
    "argv", [["--sets", "0"], ["--old", "32", "--new", "48"], ["--old", "8", "--new", "8"]]
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        removals.main(argv)
    assert exc.value.code == 2
