"""Bad input raises ValueError with a message naming the problem."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from eep_controller.planner import (
    Placement,
    balancedness,
    copy_lower_bound,
    plan_placement,
    plan_rescale,
)
from tests.unit.planner.planner_checks import zipf_load


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (np.array([[1.0, -1.0]]), "negative"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (np.array([[1.0, np.inf]]), "infinite"),
        (np.ones(4), "shape"),
        (np.ones((1, 2, 2)), "shape"),
    ],
)
def test_bad_load_is_rejected(bad: np.ndarray, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        plan_placement(bad, 2, 2)


@pytest.mark.parametrize("scale", [1e307, 1e-310])
def test_loads_near_the_ends_of_float64_plan_like_any_other(scale: float) -> None:
    """Finite loads whose sums overflow (or whose shares underflow) are valid input: a
    layer's balance does not depend on its scale."""
    load = zipf_load(2, 64, 1.0, seed=4) / 1000.0 * scale
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow, underflow or invalid value
        placed = plan_placement(load, 8, 9)
        plan = plan_rescale(placed, load, 12)
        assert 0.99 <= balancedness(placed, load) <= 1.0
        assert 0.99 <= plan.stats["balancedness_after"] <= 1.0
    assert np.array_equal(load, zipf_load(2, 64, 1.0, seed=4) / 1000.0 * scale)  # untouched


def test_too_few_slots_for_the_experts_is_rejected() -> None:
    with pytest.raises(ValueError, match="cannot hold every"):
        plan_placement(np.ones((1, 9)), 2, 4)


def test_non_positive_ranks_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_ranks"):
        plan_placement(np.ones((1, 2)), 0, 4)


@pytest.fixture
def current() -> Placement:
    return plan_placement(zipf_load(2, 8, 1.0), 4, 3)


def test_load_of_the_wrong_shape_for_the_placement_is_rejected(current: Placement) -> None:
    with pytest.raises(ValueError, match="experts"):
        plan_rescale(current, np.ones((2, 7)), 4)
    with pytest.raises(ValueError, match="layers"):
        plan_rescale(current, np.ones((3, 8)), 4)


def test_new_size_that_cannot_hold_every_expert_is_rejected(current: Placement) -> None:
    with pytest.raises(ValueError, match="cannot hold every"):
        plan_rescale(current, zipf_load(2, 8, 1.0), 2)


@pytest.mark.parametrize("field", ["removed_ranks", "failed_ranks"])
def test_out_of_range_rank_is_rejected(current: Placement, field: str) -> None:
    with pytest.raises(ValueError, match=f"{field}.*out of range"):
        ranks: dict[str, Any] = {field: [4]}
        plan_rescale(current, zipf_load(2, 8, 1.0), 3, **ranks)


@pytest.mark.parametrize("field", ["removed_ranks", "failed_ranks"])
def test_duplicated_rank_is_rejected(current: Placement, field: str) -> None:
    with pytest.raises(ValueError, match=f"{field}.*more than once"):
        ranks: dict[str, Any] = {field: [1, 1]}
        plan_rescale(current, zipf_load(2, 8, 1.0), 3, **ranks)


def test_rank_both_removed_and_failed_is_rejected(current: Placement) -> None:
    with pytest.raises(ValueError, match="both name"):
        plan_rescale(current, zipf_load(2, 8, 1.0), 3, removed_ranks=[1], failed_ranks=[1])


def test_too_few_removed_ranks_for_the_new_size_is_rejected(current: Placement) -> None:
    with pytest.raises(ValueError, match="more than new_num_ranks"):
        plan_rescale(current, zipf_load(2, 8, 1.0), 3, removed_ranks=[])


def test_lower_bound_validates_its_ranks(current: Placement) -> None:
    with pytest.raises(ValueError, match="out of range"):
        copy_lower_bound(current, 3, [9], ())


def test_placement_rejects_columns_not_a_multiple_of_slots() -> None:
    with pytest.raises(ValueError, match="multiple"):
        Placement(np.zeros((1, 5), dtype=np.int64), 2)
