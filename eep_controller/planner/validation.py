"""Input checks shared by the planner entry points; every failure is a ValueError naming it."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Layers whose peak load is above this, or below its inverse, are rescaled (see checked_load).
LOAD_SCALE_LIMIT = 1e200


def checked_load(
    load: npt.ArrayLike, *, num_layers: int | None = None, num_experts: int | None = None
) -> FloatArray:
    """Return `load` as a float64 [L, E] array, or raise ValueError naming what is wrong."""
    arr = np.asarray(load, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"load must have shape [layers, experts], got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"load must have at least one layer and one expert, got {arr.shape}")
    if num_layers is not None and arr.shape[0] != num_layers:
        raise ValueError(f"load has {arr.shape[0]} layers, the placement has {num_layers}")
    if num_experts is not None and arr.shape[1] != num_experts:
        raise ValueError(f"load has {arr.shape[1]} experts, the placement has {num_experts}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("load contains NaN or infinite values")
    if np.any(arr < 0):
        raise ValueError("load contains negative values")
    # balance does not depend on a layer's scale; a layer near the ends of float64 (whose
    # sums would overflow, or whose shares would underflow) is rescaled to a peak of 1
    peak = arr.max(axis=1)
    extreme = (peak > LOAD_SCALE_LIMIT) | ((peak > 0) & (peak < 1.0 / LOAD_SCALE_LIMIT))
    if extreme.any():
        arr = arr.copy()
        arr[extreme] /= peak[extreme, None]
    return arr


def checked_positive(name: str, value: int) -> int:
    """Return `value` as an int >= 1, or raise ValueError naming `name`."""
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def checked_capacity(num_ranks: int, slots_per_rank: int, num_experts: int) -> None:
    """Raise ValueError unless every expert fits and a rank can fill its slots with distinct
    experts (R x S >= E and S <= E)."""
    if num_ranks * slots_per_rank < num_experts:
        raise ValueError(
            f"{num_ranks} ranks x {slots_per_rank} slots per rank = "
            f"{num_ranks * slots_per_rank} slots cannot hold every one of {num_experts} experts"
        )
    if slots_per_rank > num_experts:
        raise ValueError(
            f"slots_per_rank={slots_per_rank} exceeds the {num_experts} experts: a rank cannot "
            f"hold that many distinct experts"
        )


def checked_ranks(name: str, ranks: Iterable[int], num_ranks: int) -> tuple[int, ...]:
    """Return `ranks` sorted, or raise ValueError if one is out of range or duplicated."""
    out: list[int] = []
    for rank in ranks:
        if isinstance(rank, bool) or int(rank) != rank:
            raise ValueError(f"{name} must hold integer rank indices, got {rank!r}")
        if not 0 <= int(rank) < num_ranks:
            raise ValueError(f"{name} holds rank {rank}, out of range for {num_ranks} ranks")
        out.append(int(rank))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} names a rank more than once: {sorted(out)}")
    return tuple(sorted(out))
