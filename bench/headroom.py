"""How many copies eep's rescale plans leave on the table: eep against a far longer search.

    pip install -e ".[headroom]"               # HiGHS: this script's only extra, not eep's
    python -m bench.headroom                   # 48 -> 32 x 9, Zipf 1.2, layer 0, 10 minutes
    python -m bench.headroom --load zipf:0.5 --layers 0,1 --seconds 1200
    python -m bench.headroom --json            # one JSON object on stdout

eep plans the rescale (ranks to remove chosen by eep, as in `bench.planner`). Then, for each
chosen layer, a large neighbourhood search starts from eep's plan of that layer: it frees a
few random ranks (`--free-ranks`), solves their slots and every expert's replica count
exactly as a mixed-integer program (HiGHS), and keeps the result when it needs no more
copies at balancedness >= 0.99 (eep's goal); then it frees other ranks, until the time is
up. Each kept plan is checked with eep's own balancedness and the placement invariants.

The planner issue asks for <= 1.3x the copy lower bound within 150 ms. This measures how far
that is from what minutes of exact search find, so a claim that a target is out of reach can
be checked rather than trusted. It is not run by CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

from bench.planner import make_load
from bench.report import progress_bar, report
from eep_controller.planner import Placement, RescalePlan, plan_placement, plan_rescale
from eep_controller.planner.packing import holdings, least_copies
from eep_controller.planner.placement import layer_balancedness

GOAL = 0.99  # the balancedness eep's rescale aims for, per layer
SUB_SECONDS = 20.0  # time limit of one neighbourhood's mixed-integer solve


def _holdings(phy: npt.NDArray[np.int64], num_experts: int) -> npt.NDArray[np.bool_]:
    """[R, E]: rank r of one layer's placement [R, S] holds expert e (-1 slots are empty)."""
    has: npt.NDArray[np.bool_] = holdings(phy[None], num_experts)[0]
    return has


def _as_slots(has: npt.NDArray[np.bool_], origin: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The placement [R, S] of holdings `has`: replicas a rank kept stay in their slots, new
    ones fill its other slots in expert order."""
    phy = np.full_like(origin, -1)
    for r in range(origin.shape[0]):
        kept = [(s, e) for s, e in enumerate(origin[r]) if e >= 0 and has[r, e]]
        for s, e in kept:
            phy[r, s] = e
        new = sorted(set(np.flatnonzero(has[r]).tolist()) - {e for _, e in kept})
        free = [s for s in range(origin.shape[1]) if phy[r, s] < 0]
        if len(new) != len(free):
            raise AssertionError(f"rank {r}: {len(new)} new replicas for {len(free)} slots")
        for s, e in zip(free, new, strict=True):
            phy[r, s] = e
    return phy


def check_layer(phy: npt.NDArray[np.int64], num_experts: int) -> None:
    """The placement invariants eep's plans keep (one layer [R, S])."""
    if (phy < 0).any():
        raise AssertionError("an empty slot")
    if any(len(set(row.tolist())) != row.size for row in phy):
        raise AssertionError("a rank holds one expert twice")
    if np.bincount(phy.ravel(), minlength=num_experts).min() < 1:
        raise AssertionError("an expert lost its last replica")


class Neighbourhoods:
    """The search over one layer: `weight` [E], `origin` [R, S] (the slots before the rescale,
    -1 for new ones) and the current plan's holdings."""

    def __init__(
        self,
        weight: npt.NDArray[np.float64],
        origin: npt.NDArray[np.int64],
        plan: npt.NDArray[np.int64],
        seed: int,
    ) -> None:
        self.weight = weight
        self.origin = origin
        self.ranks, self.slots = origin.shape
        self.experts = weight.size
        self.held = _holdings(origin, self.experts)
        self.current = _holdings(plan, self.experts)
        self.limit = weight.sum() / self.ranks / GOAL  # the peak rank load GOAL allows
        self.rng = np.random.default_rng(seed)

    def copies(self, has: npt.NDArray[np.bool_]) -> int:
        return int((has & ~self.held).sum())

    def balancedness(self, phy: npt.NDArray[np.int64]) -> float:
        """Of one placement [R, S] of this layer."""
        return float(layer_balancedness(phy[None], self.weight[None])[0])

    def step(self, free_ranks: int, sub_seconds: float) -> bool:
        """Solve one neighbourhood; returns whether the plan changed (never for the worse)."""
        free = np.zeros(self.ranks, dtype=bool)
        free[self.rng.choice(self.ranks, min(free_ranks, self.ranks), replace=False)] = True
        found = self._solve(free, sub_seconds)
        if found is None or np.array_equal(found, self.current):
            return False
        phy = _as_slots(found, self.origin)
        check_layer(phy, self.experts)
        if self.balancedness(phy) < GOAL or self.copies(found) > self.copies(self.current):
            return False
        self.current = found
        return True

    def _solve(self, free: npt.NDArray[np.bool_], seconds: float) -> npt.NDArray[np.bool_] | None:
        import highspy

        w, cur = self.weight, self.current
        count = cur.sum(axis=0)
        slot_mean = w.sum() / (self.ranks * self.slots)
        most = np.minimum(self.ranks, np.maximum(np.ceil(w / slot_mean).astype(int) + 2, count))
        least = np.maximum(1, np.ceil(w / self.limit - 1e-12).astype(int))
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("time_limit", seconds)
        h.setOptionValue("threads", 1)
        columns: list[tuple[str, int, int, int]] = []  # ("y", e, c, -1) or ("z", e, c, r)
        load_terms: list[list[Any]] = [[] for _ in range(self.ranks)]
        slot_terms: list[list[Any]] = [[] for _ in range(self.ranks)]
        for e in range(self.experts):
            options = range(int(least[e]), int(most[e]) + 1)
            # y[c]: expert e ends with c replicas; z[r]: free rank r holds one of them
            ys = [h.addBinary() for _ in options]
            columns += [("y", e, c, -1) for c in options]
            h.addConstr(sum(ys) == 1)
            fixed_holders = int(cur[~free, e].sum())
            for c, y in zip(options, ys, strict=True):
                zs = []
                for r in np.flatnonzero(free).tolist():
                    z = h.addBinary(obj=0.0 if self.held[r, e] else 1.0)
                    columns.append(("z", e, c, r))
                    zs.append(z)
                    h.addConstr(z <= y)
                    load_terms[r].append(w[e] / c * z)
                    slot_terms[r].append(z)
                for r in np.flatnonzero(~free & cur[:, e]).tolist():
                    load_terms[r].append(w[e] / c * y)
                h.addConstr(sum(zs) + fixed_holders * y == c * y)
        for r in range(self.ranks):
            if free[r]:
                h.addConstr(sum(slot_terms[r]) == self.slots)
            if load_terms[r]:
                h.addConstr(sum(load_terms[r]) <= self.limit)
        start = highspy.HighsSolution()
        start.col_value = [
            float(count[e] == c) if kind == "y" else float(cur[r, e] and count[e] == c)
            for kind, e, c, r in columns
        ]
        start.value_valid = True
        h.setSolution(start)
        h.run()
        values = h.getSolution().col_value
        if len(values) != len(columns):
            return None
        found = cur.copy()
        found[free] = False
        for (kind, e, _, r), v in zip(columns, values, strict=True):
            if kind == "z" and v > 0.5:
                found[r, e] = True
        if found.sum(axis=1).tolist() != [self.slots] * self.ranks:
            return None
        return found


def add_rescale_args(parser: argparse.ArgumentParser) -> None:
    """The rescale these scripts start from: the load and the old and new shapes."""
    parser.add_argument("--load", default="zipf:1.2", help="kind:param, as bench.planner")
    parser.add_argument("--old", type=int, default=48)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--slots", type=int, default=9)


def rescale_result(args: argparse.Namespace, **fields: Any) -> dict[str, Any]:
    """A rescale script's result: the load and the rescale of `add_rescale_args`, then
    `fields`."""
    return {"load": args.load, "rescale": f"{args.old}->{args.new} x{args.slots}", **fields}


def rescale_title(result: dict[str, Any], what: str) -> str:
    """A rescale script's table title: the rescale and the load of `result`, then `what`."""
    return f"{result['rescale']} under {result['load']}: {what}"


def rescale_start(args: argparse.Namespace) -> tuple[npt.NDArray[np.float64], Placement]:
    """The load of `add_rescale_args` and eep's placement of it on the old shape."""
    kind, _, param = args.load.partition(":")
    load = make_load(kind, float(param))
    return load, plan_placement(load, args.old, args.slots)


def eep_rescale(
    args: argparse.Namespace,
) -> tuple[npt.NDArray[np.float64], RescalePlan, npt.NDArray[np.int64]]:
    """The load, eep's plan of the rescale (eep picks the removed ranks) and the survivors'
    slots in the new numbering [L, new R, S] (-1 on new ranks)."""
    load, current = rescale_start(args)
    plan = plan_rescale(current, load, args.new)
    return load, plan, survivor_slots(current, plan)


def survivor_slots(current: Placement, plan: RescalePlan) -> npt.NDArray[np.int64]:
    """The slots `current` leaves on the ranks `plan` keeps, in the new numbering
    [L, new R, S] (-1 on new ranks)."""
    layers, new_ranks = current.num_layers, plan.placement.num_ranks
    survivors = np.flatnonzero(plan.rank_map >= 0)
    origin = np.full((layers, new_ranks, current.slots_per_rank), -1, dtype=np.int64)
    origin[:, plan.rank_map[survivors]] = current.by_rank()[:, survivors]
    return origin


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    load, plan, origin = eep_rescale(args)
    removed = [r for r in range(args.old) if plan.rank_map[r] < 0]
    new = plan.placement.by_rank()
    bounds = least_copies(origin, load.shape[1])  # per layer: new slots or orphans
    rows = []
    with progress_bar(console) as progress:
        for layer in args.layers:
            search = Neighbourhoods(load[layer], origin[layer], new[layer], args.seed + layer)
            eep_copies = search.copies(search.current)
            bound = int(bounds[layer])
            task = progress.add_task(f"layer {layer}: {eep_copies} copies", total=args.seconds)
            t0 = time.monotonic()
            while (elapsed := time.monotonic() - t0) < args.seconds:
                sub = min(SUB_SECONDS, max(1.0, args.seconds - elapsed))
                if search.step(args.free_ranks, sub):
                    progress.update(
                        task, description=f"layer {layer}: {search.copies(search.current)} copies"
                    )
                progress.update(task, completed=min(time.monotonic() - t0, args.seconds))
            best = search.current
            rows.append({
                "layer": layer,
                "lower_bound": bound,
                "eep_copies": eep_copies,
                "eep_bal": search.balancedness(new[layer]),
                "search_copies": search.copies(best),
                "search_bal": search.balancedness(_as_slots(best, origin[layer])),
                "eep_ratio": eep_copies / max(bound, 1),
                "search_ratio": search.copies(best) / max(bound, 1),
                "seconds": args.seconds,
            })  # fmt: skip
    return rescale_result(args, removed_ranks=removed, free_ranks=args.free_ranks, layers=rows)


def render(result: dict[str, Any], console: Console) -> None:
    table = Table(
        title=rescale_title(result, f"eep against {result['free_ranks']}-rank neighbourhood search")
    )
    for col in ("layer", "bound", "eep copies", "eep x bound", "search copies", "search x bound",
                "search bal", "seconds"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in result["layers"]:
        table.add_row(
            str(r["layer"]), str(r["lower_bound"]), str(r["eep_copies"]),
            f"{r['eep_ratio']:.3f}", str(r["search_copies"]), f"{r['search_ratio']:.3f}",
            f"{r['search_bal']:.5f}", f"{r['seconds']:.0f}",
        )  # fmt: skip
    console.print(table)


def _layers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_rescale_args(parser)
    parser.add_argument("--layers", type=_layers, default=[0], help="comma-separated")
    parser.add_argument("--seconds", type=float, default=600.0, help="search time per layer")
    parser.add_argument("--free-ranks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        import highspy  # noqa: F401
    except ImportError:
        print(
            "bench.headroom needs HiGHS: pip install highspy (or the [headroom] extra)",
            file=sys.stderr,
        )
        return 2
    return report(args, _run_on_stderr, render)


def _run_on_stderr(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """`run` with the process's stdout pointed at stderr: HiGHS prints its banner there, and
    --json must leave one JSON object on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        return run(args, console)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


if __name__ == "__main__":
    raise SystemExit(main())
