"""`python -m bench.headroom`: the parts that need no solver (HiGHS is not installed in CI)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bench import headroom


def test_a_plan_of_holdings_keeps_replicas_in_their_slots_and_fills_the_freed_ones() -> None:
    origin = np.array([[0, 1, 2], [3, 4, -1]])  # rank 1 has a new (empty) slot
    has = np.zeros((2, 6), dtype=bool)
    has[0, [0, 2, 5]] = True  # rank 0 keeps 0 and 2, takes 5 where 1 was
    has[1, [3, 4, 1]] = True  # rank 1 keeps 3 and 4, takes 1 in its new slot
    phy = headroom._as_slots(has, origin)
    assert phy.tolist() == [[0, 5, 2], [3, 4, 1]]
    # copies are the slots whose expert changed
    assert int((phy != origin).sum()) == int((has & ~headroom._holdings(origin, 6)).sum()) == 2
    headroom.check_layer(phy, 6)


def test_holdings_that_do_not_fill_a_rank_exactly_are_refused() -> None:
    has = np.zeros((1, 4), dtype=bool)
    has[0, [0, 1]] = True
    with pytest.raises(AssertionError, match="rank 0: 0 new replicas for 1 slots"):
        headroom._as_slots(has, np.array([[0, 1, 2]]))


@pytest.mark.parametrize(
    ("phy", "problem"),
    [
        ([[0, 0], [1, 2]], "twice"),
        ([[0, 1], [1, 0]], "lost its last replica"),
        ([[0, -1], [1, 2]], "empty slot"),
    ],
)
def test_the_check_names_a_broken_invariant(phy: list[list[int]], problem: str) -> None:
    with pytest.raises(AssertionError, match=problem):
        headroom.check_layer(np.array(phy), 3)


def test_without_highs_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "highspy", None)  # import highspy -> ImportError
    assert headroom.main(["--seconds", "1"]) == 2
    assert "pip install highspy" in capsys.readouterr().err
