"""How much a scale-down's copies depend on which ranks leave: eep's choice of removed ranks
against removal sets one rank away from it.

    python -m bench.removals                      # 48 -> 32 x 9, Zipf 1.2, 24 other sets
    python -m bench.removals --load mix:1.3 --sets 24
    python -m bench.removals --json               # one JSON object on stdout

eep plans the scale-down as `bench.planner` does (eep picks the removed ranks: those leaving
the fewest orphans). Then each other set swaps one of eep's removed ranks for one survivor,
drawn at random without repeats, and eep plans the same scale-down with that set given as
`removed_ranks`. Each set has its own lower bound (its orphans). The summary shows where
eep's plan falls among the other sets, over all of them and over those with as many orphans.

Why it matters: on the bench's Zipf loads every layer is the same load with the experts in
another order, and the planner does not depend on how experts or ranks are numbered, so all
58 layers get the same plan and a Zipf figure of `bench.planner` is one instance times 58.
The spread here shows how far such one instance can sit from what its neighbours get; on a
load whose layers differ ("mix") the layers average it out. Not run by CI.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.headroom import add_rescale_args, rescale_result, rescale_start, rescale_title
from bench.report import progress_bar, report
from eep_controller.planner import Placement, plan_rescale


def neighbour_sets(
    removed: tuple[int, ...], num_ranks: int, count: int, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """Up to `count` distinct removal sets (sorted tuples), each `removed` with one of its
    ranks swapped for one rank of `num_ranks` it lacks, in random order."""
    survivors = [r for r in range(num_ranks) if r not in removed]
    pairs = [(out, kept) for out in removed for kept in survivors]
    order = rng.permutation(len(pairs))[:count]
    sets = []
    for k in order:
        out, kept = pairs[int(k)]
        sets.append(tuple(sorted([r for r in removed if r != out] + [kept])))
    return sets


def plan_with(
    current: Placement, load: np.ndarray, new_ranks: int, removed: tuple[int, ...] | None
) -> dict[str, Any]:
    """Copies, lower bound and balancedness of eep's plan with `removed` given (None: eep
    chooses), and the removed ranks it used."""
    plan = plan_rescale(current, load, new_ranks, removed_ranks=removed)
    used = tuple(int(r) for r in np.flatnonzero(plan.rank_map < 0))
    copies, bound = int(plan.stats["copies"]), int(plan.stats["lower_bound"])
    return {
        "removed": list(used),
        "copies": copies,
        "lower_bound": bound,
        "ratio": copies / max(bound, 1),
        "bal": float(plan.stats["balancedness_after"]),
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarise(eep: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """Where eep's plan falls among the other sets' plans: the spread of copies and of
    copies over each set's own bound, over all of them and over those with eep's bound."""
    same = [o for o in others if o["lower_bound"] == eep["lower_bound"]]
    out: dict[str, Any] = {
        "sets": len(others),
        "fewer_copies": sum(o["copies"] < eep["copies"] for o in others),
        "copies": _spread([o["copies"] for o in others]),
        "ratio": _spread([o["ratio"] for o in others]),
        "same_bound_sets": len(same),
    }
    if same:
        out["same_bound_copies"] = _spread([o["copies"] for o in same])
        out["same_bound_ratio"] = _spread([o["ratio"] for o in same])
    return out


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    load, current = rescale_start(args)
    eep = plan_with(current, load, args.new, None)
    sets = neighbour_sets(
        tuple(eep["removed"]), args.old, args.sets, np.random.default_rng(args.seed)
    )
    others = []
    with progress_bar(console, counted=True) as progress:
        task = progress.add_task("removal sets", total=len(sets))
        for removed in sets:
            others.append(plan_with(current, load, args.new, removed))
            progress.advance(task)
    return rescale_result(args, eep=eep, others=others, summary=summarise(eep, others))


def render(result: dict[str, Any], console: Console) -> None:
    table = Table(title=rescale_title(result, "eep's removed ranks against sets one rank away"))
    for col in ("set", "orphans (bound)", "copies", "x bound", "balancedness"):
        table.add_column(col, justify="right")
    rows = [("eep", result["eep"])] + [
        (str(i), o) for i, o in enumerate(sorted(result["others"], key=lambda o: o["copies"]), 1)
    ]
    for name, r in rows:
        table.add_row(
            name, str(r["lower_bound"]), str(r["copies"]), f"{r['ratio']:.3f}", f"{r['bal']:.4f}"
        )
    console.print(table)
    s = result["summary"]
    line = (
        f"eep {result['eep']['copies']} copies ({result['eep']['ratio']:.3f}x); "
        f"{s['fewer_copies']} of {s['sets']} other sets need fewer; "
        f"others {s['copies']['min']}-{s['copies']['max']} copies "
        f"({s['ratio']['min']:.3f}-{s['ratio']['max']:.3f}x their bounds)"
    )
    if s["same_bound_sets"]:
        line += (
            f"; {s['same_bound_sets']} with eep's bound: {s['same_bound_copies']['min']}-"
            f"{s['same_bound_copies']['max']} copies, median "
            f"{s['same_bound_ratio']['median']:.3f}x"
        )
    console.print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_rescale_args(parser)
    parser.add_argument("--sets", type=int, default=24, help="other removal sets to plan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.sets < 1:
        parser.error("--sets must be at least 1")
    if not 1 <= args.new < args.old:
        parser.error("--new must be below --old (a scale-down) and at least 1")
    return report(args, run, render)


if __name__ == "__main__":
    raise SystemExit(main())
