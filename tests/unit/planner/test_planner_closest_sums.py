"""`closest_sums` (the sorted search inside `pair_swaps`) against the brute-force S x S search."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from eep_controller.planner import refinement
from eep_controller.planner.refinement import closest_sums


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    slots=st.integers(1, 40),
    scale=st.sampled_from([1e-3, 1.0, 1e4, 1e9]),
    barred=st.floats(0.0, 1.0),
)
def test_matches_brute_force(seed: int, slots: int, scale: float, barred: float) -> None:
    rng = np.random.default_rng(seed)
    shape = (3, 2, slots)
    u = rng.normal(size=shape) * scale
    v = rng.normal(size=shape) * scale
    u[rng.random(shape) < barred] = np.inf
    v[rng.random(shape) < barred] = np.inf
    best_i, best_j, best = closest_sums(u, v)
    brute = np.abs(u[..., :, None] + v[..., None, :]).reshape(3, 2, -1).min(axis=-1)
    assert np.array_equal(np.isinf(brute), np.isinf(best))
    finite = np.isfinite(brute)
    np.testing.assert_allclose(best[finite], brute[finite], rtol=1e-12)
    picked = np.take_along_axis(u, best_i[..., None], -1) + np.take_along_axis(
        v, best_j[..., None], -1
    )
    np.testing.assert_allclose(np.abs(picked[..., 0])[finite], brute[finite], rtol=1e-12)


def test_ties_and_single_slot() -> None:
    u = np.array([[[1.0, 1.0]]])
    v = np.array([[[-1.0, -1.0]]])
    _, _, best = closest_sums(u, v)
    assert best[0, 0] == 0.0
    _, _, one = closest_sums(np.array([[[2.0]]]), np.array([[[np.inf]]]))
    assert np.isinf(one[0, 0])


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    slots=st.integers(1, 40),
    rows=st.integers(2, 6),
    spread=st.sampled_from([1.0, 1e6]),
)
def test_each_row_answers_alone(seed: int, rows: int, slots: int, spread: float) -> None:
    """A row's answer does not depend on the other rows of the batch (so layers planned in
    different processes give the same plan), even with values a million times apart."""
    rng = np.random.default_rng(seed)
    scale = spread ** rng.random((rows, 1))
    u = np.round(rng.normal(size=(rows, slots)) * 4) * scale  # rounding makes ties
    v = np.round(rng.normal(size=(rows, slots)) * 4) * scale
    together = closest_sums(u, v)
    for r in range(rows):
        alone = closest_sums(u[r : r + 1], v[r : r + 1])
        for a, b in zip(together, alone, strict=True):
            assert a[r] == b[0]


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 9),
    slots=st.integers(1, 12),
    chunk=st.integers(1, 400),
)
def test_all_sums_in_chunks_equals_all_at_once(
    seed: int, rows: int, slots: int, chunk: int
) -> None:
    """`pair_swaps`' S x S search gives the same (i, j, minimum) whatever the chunk of rows
    it forms at once: the first minimum in (i, j) order, as one argmin over all sums."""
    rng = np.random.default_rng(seed)
    shape = (rows, 3, slots)
    u = rng.normal(size=shape)
    v = np.round(rng.normal(size=shape), 1)  # repeated values: ties between j
    u[rng.random(shape) < 0.2] = np.inf
    whole = refinement._all_sums(u, v)
    parts = refinement._all_sums(u, v, chunk)
    for a, b in zip(whole, parts, strict=True):
        assert np.array_equal(a, b)
    flat = np.abs(u[..., :, None] + v[..., None, :]).reshape(rows, 3, -1)
    first = np.argmin(flat, axis=2)
    assert np.array_equal(whole[0] * slots + whole[1], first)
