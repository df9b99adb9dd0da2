"""How many copies a longer, numpy-only search over replica counts saves on eep's rescale plans.

    python -m bench.recount                      # 48 -> 32 x 9, Zipf 1.2, all layers, 8 rounds
    python -m bench.recount --load zipf:0.5 --rounds 30 --tries 16
    python -m bench.recount --moves merge --rounds 1 --tries 6
    python -m bench.recount --json               # one JSON object on stdout

eep plans the rescale (ranks to remove chosen by eep, as in `bench.planner`). Then, for every
layer at once, each round makes `--tries` neighbours of the layer's best plan so far: its
replica counts with one replica moved from a random expert holding two or more to another
random expert. Each neighbour is built from the survivors' slots the way eep builds its
replica-count options (`retargeted_plan`: keep what the counts still want, pack the rest)
and refined as eep's rescue refines them (`refine_fully`). A neighbour replaces the layer's
plan when it balances at least 0.99 (eep's goal) with fewer copies. Every kept plan is
checked against the placement invariants.

With `--moves merge` the neighbours are not random but the same few every round: for each of
the `--tries` / 2 heaviest experts holding two or more replicas whose whole load fits on one
rank beside the lightest other experts (mean rank load / 0.99 at most), one replica moved to
the coldest expert holding one, and one to the expert with the heaviest replica. It measures
what a small deterministic count search inside the planner would buy, and what it would cost.

Where `bench.headroom` re-solves a few ranks exactly (minutes per layer, an extra solver),
this searches with eep's own moves: it shows what spending seconds instead of 150 ms buys.
It is not run by CI.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.headroom import (
    add_rescale_args,
    check_layer,
    eep_rescale,
    rescale_result,
    rescale_title,
)
from bench.report import progress_bar, report
from eep_controller.planner.packing import count_replicas, least_copies
from eep_controller.planner.placement import layer_balancedness
from eep_controller.planner.search import CHOOSE_ABOVE, refine_fully
from eep_controller.planner.starts import retargeted_plan

IntArray = npt.NDArray[np.int64]


def neighbour_counts(
    counts: IntArray, tries: int, ranks: int, rng: np.random.Generator
) -> IntArray:
    """[B * tries, E]: each row of `counts` [B, E] `tries` times, each with one replica moved
    from a random expert holding >= 2 to a random other expert holding < `ranks`."""
    out = np.repeat(counts, tries, axis=0)
    rows = np.arange(out.shape[0])
    give = np.argmax(np.where(out >= 2, rng.random(out.shape), -1.0), axis=1)
    room = np.where(out < ranks, rng.random(out.shape), -1.0)
    room[rows, give] = -1.0
    take = np.argmax(room, axis=1)
    ok = (out[rows, give] >= 2) & (room[rows, take] >= 0)
    out[rows[ok], give[ok]] -= 1
    out[rows[ok], take[ok]] += 1
    return out


def merge_counts(
    counts: IntArray, load: npt.NDArray[np.float64], tries: int, slots: int
) -> IntArray:
    """[B * tries, E]: `tries` neighbours of each row of `counts` [B, E] (replica counts on
    R ranks of `slots` slots, R = total / slots). For the k-th heaviest expert (k < tries
    // 2) holding >= 2 replicas whose whole load fits on one rank with the `slots` - 1
    lightest other experts (their load per replica; at most mean rank load / CHOOSE_ABOVE):
    one replica moved to the coldest expert holding one (neighbour 2k), and one to the expert
    with the heaviest replica that holds fewer than R (neighbour 2k + 1). A row with fewer
    such experts repeats its counts in the neighbours left."""
    batch, experts = counts.shape
    ranks = int(counts[0].sum()) // slots
    share = load / np.maximum(counts, 1)
    lightest = np.sort(share, axis=1)[:, : slots - 1].sum(axis=1)
    peak = load.sum(axis=1) / ranks / CHOOSE_ABOVE
    fits = (counts >= 2) & (load + lightest[:, None] <= peak[:, None])
    givers = np.argsort(np.where(fits, -load, np.inf), axis=1, kind="stable")
    rows = np.arange(batch)
    out = np.repeat(counts, tries, axis=0).reshape(batch, tries, experts)
    for n in range(tries):
        give = givers[:, n // 2]
        if n % 2 == 0:  # the coldest expert holding one
            key = np.where(counts == 1, -load, -np.inf)
        else:  # the heaviest replica, on fewer than R ranks
            key = np.where(counts < ranks, share, -np.inf)
        key[rows, give] = -np.inf
        take = np.argmax(key, axis=1)
        ok = fits[rows, give] & np.isfinite(key[rows, take])
        out[rows[ok], n, give[ok]] -= 1
        out[rows[ok], n, take[ok]] += 1
    return out.reshape(batch * tries, experts)


def search(
    load: npt.NDArray[np.float64],
    origin: IntArray,
    start: IntArray,
    *,
    rounds: int,
    tries: int,
    seed: int,
    moves: str = "random",
    progress: Progress | None = None,
) -> tuple[IntArray, list[dict[str, float]]]:
    """Rounds of the replica-count neighbourhood search from plans `start` [L, R, S] (new
    numbering; `origin` is the survivors' slots, -1 on new ranks), with `neighbour_counts`
    (`moves` "random") or `merge_counts` ("merge"). Returns the best plans and, per round,
    the total copies and the seconds spent so far."""
    rng = np.random.default_rng(seed)
    layers, ranks, slots = origin.shape
    num_experts = load.shape[1]
    best = start.copy()
    copies = (best != origin).sum(axis=(1, 2))
    orphaned = count_replicas(origin, num_experts).min(axis=1) == 0
    row = np.repeat(np.arange(layers), tries)
    history = []
    t0 = time.perf_counter()
    task = progress.add_task("rounds", total=rounds) if progress else None
    for _ in range(rounds):
        now = count_replicas(best, num_experts)
        if moves == "merge":
            counts = merge_counts(now, load, tries, slots)
        else:
            counts = neighbour_counts(now, tries, ranks, rng)
        plans = refine_fully(
            retargeted_plan(origin[row], load[row], counts), load[row], origin[row], orphaned[row]
        )
        good = layer_balancedness(plans, load[row]) >= CHOOSE_ABOVE
        found = np.where(good, (plans != origin[row]).sum(axis=(1, 2)), np.iinfo(np.int64).max)
        pick = np.argmin(found.reshape(layers, tries), axis=1)
        at = np.arange(layers) * tries + pick
        better = found[at] < copies
        best[better] = plans[at[better]]
        copies[better] = found[at[better]]
        history.append({"copies": int(copies.sum()), "seconds": time.perf_counter() - t0})
        if progress is not None and task is not None:
            progress.update(task, advance=1, description=f"{int(copies.sum())} copies")
    for layer in range(layers):
        check_layer(best[layer], num_experts)
    return best, history


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    load, plan, origin = eep_rescale(args)
    start = plan.placement.by_rank()
    bound = int(least_copies(origin, load.shape[1]).sum())
    with progress_bar(console) as progress:
        best, history = search(
            load,
            origin,
            start,
            rounds=args.rounds,
            tries=args.tries,
            seed=args.seed,
            moves=args.moves,
            progress=progress,
        )
    eep_copies = int(plan.stats["copies"])
    found = int((best != origin).sum())
    return rescale_result(
        args,
        tries=args.tries,
        moves=args.moves,
        lower_bound=bound,
        eep_copies=eep_copies,
        eep_ratio=eep_copies / max(bound, 1),
        eep_bal=float(plan.stats["balancedness_after"]),
        search_copies=found,
        search_ratio=found / max(bound, 1),
        search_bal=float(layer_balancedness(best, load).mean()),
        rounds=[{**h, "ratio": h["copies"] / max(bound, 1)} for h in history],
    )


def render(result: dict[str, Any], console: Console) -> None:
    table = Table(
        title=rescale_title(
            result,
            f"eep against {result['tries']} {result['moves']} replica-count neighbours per "
            "layer and round",
        )
    )
    for col in ("round", "copies", "x bound", "seconds"):
        table.add_column(col, justify="right")
    table.add_row("eep", str(result["eep_copies"]), f"{result['eep_ratio']:.3f}", "")
    for i, r in enumerate(result["rounds"], 1):
        table.add_row(str(i), str(r["copies"]), f"{r['ratio']:.3f}", f"{r['seconds']:.1f}")
    console.print(table)
    console.print(
        f"lower bound {result['lower_bound']}; balancedness eep {result['eep_bal']:.4f}, "
        f"search {result['search_bal']:.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_rescale_args(parser)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tries", type=int, default=16, help="neighbours per layer and round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--moves",
        choices=("random", "merge"),
        default="random",
        help="random neighbours, or the merge neighbours (see above; --tries even)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.tries < 1:
        parser.error("--rounds and --tries must be at least 1")
    if args.moves == "merge" and args.tries % 2:
        parser.error("--moves merge makes neighbours in pairs: --tries must be even")
    return report(args, run, render)


if __name__ == "__main__":
    raise SystemExit(main())
