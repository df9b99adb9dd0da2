"""What a wider or a restarted local search saves on eep's rescale plans, and what it costs.

    python -m bench.widen                              # 48 -> 32 x 9, Zipf 1.2, every layer
    python -m bench.widen --load zipf:0.5 --layers 8 --light 5,7,15,31 --restarts 8
    python -m bench.widen --json                       # one JSON object on stdout

eep plans the rescale (eep picks the removed ranks over every layer, as in `bench.planner`).
Then the first `--layers` layers are planned again with those ranks removed, in this process
(planner workers paused, so the times compare):

* as eep plans them (the reference);
* per K of `--light`: the refinements that look at more light ranks on shapes with few
  slots per rank (the start plans' and the rescue's, see `search.FEW_SLOTS`) look at K
  light ranks on any shape, with the cap on candidate slots lifted to K x S;
* with `--restarts N`: N more plans of the load perturbed by `--perturb` (relative, normal
  noise, seeded); per layer the plan with the fewest copies that balances >= 0.99 on the
  true load is kept, eep's own included. Its time is eep's plus the restarts'.

It shows how much of the gap to the copy targets a heavier search with eep's own moves
closes. `bench.recount` searches replica counts instead, and `bench.headroom` re-solves
ranks exactly. It is not run by CI.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

from bench.headroom import (
    add_rescale_args,
    check_layer,
    rescale_result,
    rescale_start,
    rescale_title,
    survivor_slots,
)
from bench.planner import LAYERS
from bench.report import progress_bar, report
from eep_controller.planner import Placement, plan_rescale, refinement, search
from eep_controller.planner.packing import least_copies
from eep_controller.planner.placement import layer_balancedness
from eep_controller.planner.search import CHOOSE_ABOVE
from eep_controller.planner.workers import planning_alone

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@contextlib.contextmanager
def light_ranks(k: int, slots: int) -> Iterator[None]:
    """Within the block, the refinements `search` widens on few-slot shapes look at `k` light
    ranks on every shape, and no refinement's candidates are capped below `k` x `slots`
    slots. The planner's settings are restored on leaving, also on an error."""
    saved = (search.FEW_SLOTS, search.FEW_SLOTS_LIGHT_RANKS, refinement.CANDIDATE_SLOTS)
    search.FEW_SLOTS = max(saved[0], slots)
    search.FEW_SLOTS_LIGHT_RANKS = k
    refinement.CANDIDATE_SLOTS = max(saved[2], k * slots)
    try:
        yield
    finally:
        search.FEW_SLOTS, search.FEW_SLOTS_LIGHT_RANKS, refinement.CANDIDATE_SLOTS = saved


def perturbed(load: FloatArray, scale: float, rng: np.random.Generator) -> FloatArray:
    """`load` with each entry scaled by 1 + `scale` x a standard normal draw (never below 0)."""
    noisy: FloatArray = np.clip(load * (1.0 + scale * rng.standard_normal(load.shape)), 0.0, None)
    return noisy


def best_of(plans: list[IntArray], load: FloatArray, origin: IntArray) -> IntArray:
    """Per layer, of `plans` (each [L, R, S]), the one with the fewest copies against `origin`
    among those balancing at least CHOOSE_ABOVE on `load`; the first plan's layer where none
    does (the earliest on ties)."""
    stack = np.stack(plans)  # [K, L, R, S]
    bal = np.stack([layer_balancedness(p, load) for p in plans])  # [K, L]
    copies = (stack != origin[None]).sum(axis=(2, 3))
    key = np.where(bal >= CHOOSE_ABOVE, copies, np.iinfo(np.int64).max)
    pick = np.where((bal >= CHOOSE_ABOVE).any(axis=0), np.argmin(key, axis=0), 0)
    best: IntArray = stack[pick, np.arange(stack.shape[1])]
    return best


def _summary(
    name: str, phy: IntArray, load: FloatArray, origin: IntArray, bound: int, seconds: float
) -> dict[str, Any]:
    for layer in phy:
        check_layer(layer, load.shape[1])
    bal = layer_balancedness(phy, load)
    copies = int((phy != origin).sum())
    return {
        "variant": name,
        "copies": copies,
        "ratio": copies / max(bound, 1),
        "balancedness": float(bal.mean()),
        "layers_below_goal": int((bal < CHOOSE_ABOVE).sum()),
        "seconds": seconds,
    }


def _timed(fn: Callable[[], Placement]) -> tuple[IntArray, float]:
    start = time.perf_counter()
    phy = fn().by_rank()
    return phy, time.perf_counter() - start


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    load, current = rescale_start(args)
    chosen = plan_rescale(current, load, args.new)  # eep picks the removed ranks, all layers
    removed = [r for r in range(args.old) if chosen.rank_map[r] < 0] or None
    origin = survivor_slots(current, chosen)[: args.layers]
    load = load[: args.layers]
    current = Placement(current.phy2log[: args.layers], args.slots, num_experts=current.num_experts)
    bound = int(least_copies(origin, load.shape[1]).sum())

    def plan(of: FloatArray) -> Placement:
        return plan_rescale(current, of, args.new, removed_ranks=removed).placement

    rows = []
    steps = 1 + len(args.light) + args.restarts
    with planning_alone(), progress_bar(console, counted=True) as progress:
        task = progress.add_task("plans", total=steps)
        eep, eep_s = _timed(partial(plan, load))
        rows.append(_summary("eep", eep, load, origin, bound, eep_s))
        progress.advance(task)
        for k in args.light:
            with light_ranks(k, args.slots):
                wide, wide_s = _timed(partial(plan, load))
            rows.append(_summary(f"{k} light ranks", wide, load, origin, bound, wide_s))
            progress.advance(task)
        if args.restarts:
            rng = np.random.default_rng(args.seed)
            plans, spent = [eep], eep_s
            for _ in range(args.restarts):
                noisy = perturbed(load, args.perturb, rng)
                again, again_s = _timed(partial(plan, noisy))
                plans.append(again)
                spent += again_s
                progress.advance(task)
            name = f"eep + {args.restarts} restarts"
            rows.append(_summary(name, best_of(plans, load, origin), load, origin, bound, spent))
    return rescale_result(
        args,
        layers=int(load.shape[0]),
        removed_ranks=removed or [],
        lower_bound=bound,
        perturb=args.perturb,
        variants=rows,
    )


def render(result: dict[str, Any], console: Console) -> None:
    what = f"eep against a wider or restarted search, first {result['layers']} layers"
    table = Table(title=rescale_title(result, f"{what} (one process)"))
    for col in ("variant", "copies", "x bound", "balancedness", "layers < 0.99", "seconds"):
        table.add_column(col, justify="right")
    for r in result["variants"]:
        table.add_row(
            r["variant"],
            str(r["copies"]),
            f"{r['ratio']:.3f}",
            f"{r['balancedness']:.5f}",
            str(r["layers_below_goal"]),
            f"{r['seconds']:.2f}",
        )
    console.print(table)
    console.print(f"lower bound {result['lower_bound']}; restarts perturb by {result['perturb']}")


def _widths(text: str) -> list[int]:
    try:
        widths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {text!r}") from None
    if any(k < 1 for k in widths):
        raise argparse.ArgumentTypeError("every width must be at least 1")
    return widths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_rescale_args(parser)
    parser.add_argument(
        "--layers", type=int, default=LAYERS, help="how many layers, from the first"
    )
    parser.add_argument(
        "--light", type=_widths, default=[7, 31], help="comma-separated light-rank counts"
    )
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--perturb", type=float, default=0.001, help="relative load noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= LAYERS:
        parser.error(f"--layers must be between 1 and {LAYERS} (the bench's layers)")
    if args.restarts < 0:
        parser.error("--restarts must be at least 0")
    if not args.perturb > 0:
        parser.error("--perturb must be above 0")
    return report(args, run, render)


if __name__ == "__main__":
    raise SystemExit(main())
