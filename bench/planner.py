"""eep's planner against the DeepSeek EPLB greedy baseline, side by side in one run.

    python -m bench.planner           # rich tables
    python -m bench.planner --json    # one JSON object on stdout
    python -m bench.planner --quick   # fewer loads and repeats (< 60 s)
    python -m bench.planner --wide    # also 64-rank shapes (reported, not checked)
    python -m bench.planner --sweep   # only: eep's time and balance over many shapes <= 64 ranks

Shapes: 58 layers x 256 experts, 44 MB per expert (DeepSeek-V3 FP8). Loads are planned and
scored on the same expected load: Zipf and lognormal as the planner issue names them, plus a
layer mix ("mix 1.3": skew rising from near uniform in the first layers to Zipf 1.5 in the
last), where, unlike the others, every layer has its own distribution. Planning is timed
with the planner's worker processes (one per spare core) and in this process alone; the
plans are identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from bench import eplb_baseline as baseline
from eep_controller.planner import (
    balancedness,
    plan_placement,
    plan_rescale,
    schedule_transfers,
)
from eep_controller.planner.workers import planning_alone, wait_for_workers, worker_pids

LAYERS, EXPERTS = 58, 256
EXPERT_BYTES = 44.05e6
LINK_BANDWIDTH = 25e9  # bytes/s per rank, for the makespan estimate
PLACEMENTS = [(32, 9), (8, 36)]
# (name, old ranks, new ranks, slots per rank, failed ranks)
Rescale = tuple[str, int, int, int, tuple[int, ...]]
Result = dict[str, Any]
RESCALES: list[Rescale] = [
    ("32->48", 32, 48, 9, ()),
    ("48->32", 48, 32, 9, ()),
    ("8->12", 8, 12, 36, ()),
    ("12->8", 12, 8, 36, ()),
    ("16->15 fail", 16, 15, 18, (7,)),
]
# With --wide: 64-rank shapes, beyond the bench (its time goals name "<= 64 ranks");
# reported, not checked against the targets.
WIDE_PLACEMENTS = [(64, 9), (64, 5)]
WIDE_RESCALES: list[Rescale] = [
    ("48->64", 48, 64, 9, ()),
    ("64->48", 64, 48, 9, ()),
    ("64->63 fail", 64, 63, 9, (5,)),
]
# With --sweep: the time goals hold "with <= 64 ranks"; these shapes probe that range beyond
# the cells (eep alone, no baseline: time, balancedness and copies per shape).
SWEEP_PLACEMENTS = [(64, 5), (64, 6), (64, 7), (64, 8), (64, 12), (64, 16), (48, 6), (48, 12),
                    (32, 12), (32, 16), (16, 20), (8, 40)]  # fmt: skip
SWEEP_RESCALES: list[Rescale] = [
    ("32->64", 32, 64, 9, ()), ("64->32", 64, 32, 9, ()), ("48->64", 48, 64, 12, ()),
    ("64->48", 64, 48, 12, ()), ("60->64", 60, 64, 5, ()), ("64->60", 64, 60, 5, ()),
    ("56->64", 56, 64, 6, ()), ("64->56", 64, 56, 6, ()), ("24->32", 24, 32, 12, ()),
    ("32->24", 32, 24, 12, ()), ("20->32", 20, 32, 16, ()), ("32->20", 32, 20, 16, ()),
    ("8->16", 8, 16, 36, ()), ("16->8", 16, 8, 36, ()), ("32->31 fail", 32, 31, 9, (3,)),
]  # fmt: skip


def make_load(kind: str, param: float, seed: int = 0) -> npt.NDArray[np.float64]:
    """Expected load [layers, experts]: "zipf" (exponent `param`, a random expert order per
    layer), "lognormal" (sigma `param`), or "mix": every layer its own skew, from near
    uniform in the first layers to Zipf(0.2 + `param`) in the last, with lognormal(0.3)
    noise per expert, so layers differ the way real models' layers do."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, EXPERTS + 1)
    if kind == "zipf":
        return np.stack([rng.permutation(1.0 / ranks**param) for _ in range(LAYERS)]) * 1e4
    if kind == "mix":
        skew = 0.2 + param * np.arange(LAYERS) / (LAYERS - 1) + rng.normal(0, 0.1, LAYERS)
        rows = [rng.permutation(1.0 / ranks ** max(s, 0.0)) for s in skew]
        return np.stack(rows) * rng.lognormal(0.0, 0.3, (LAYERS, EXPERTS)) * 1e4
    return rng.lognormal(0.0, param, (LAYERS, EXPERTS))


def p50_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), out


def bench_placement(load: npt.NDArray[np.float64], ranks: int, slots: int, reps: int) -> Result:
    t_eep, placed = p50_ms(lambda: plan_placement(load, ranks, slots), reps)
    with planning_alone():
        t_one, alone = p50_ms(lambda: plan_placement(load, ranks, slots), reps)
    if not np.array_equal(alone.phy2log, placed.phy2log):
        raise AssertionError("the placement differs with and without planner workers")
    t_base, base = p50_ms(lambda: baseline.plan(load, ranks, slots), max(1, reps // 2))
    return {
        "ranks": ranks,
        "slots": slots,
        "bal_eep": balancedness(placed, load),
        "bal_base": baseline.balancedness(base, load),
        "ms_eep": t_eep,
        "ms_eep_one_process": t_one,
        "ms_base": t_base,
    }


def bench_rescale(load: npt.NDArray[np.float64], case: Rescale, reps: int) -> Result:
    name, old, new, slots, failed = case
    current = plan_placement(load, old, slots)
    t_eep, plan = p50_ms(lambda: plan_rescale(current, load, new, failed_ranks=failed), reps)
    # the same plan computed in this process alone, for comparison
    with planning_alone():
        t_one, alone = p50_ms(lambda: plan_rescale(current, load, new, failed_ranks=failed), reps)
    if not np.array_equal(alone.placement.phy2log, plan.placement.phy2log):
        raise AssertionError(f"{name}: the plan differs with and without planner workers")
    sched = schedule_transfers(plan, EXPERT_BYTES, link_bandwidth=LINK_BANDWIDTH)
    gone = list(failed) + list(range(old - 1, -1, -1))[: max(0, old - len(failed) - new)]
    gone = [r for r in dict.fromkeys(gone)][: max(len(failed), old - new)]
    old_base = baseline.plan(load, old, slots)
    t_base, (new_base, copied) = p50_ms(
        lambda: baseline.rescale(old_base, load, new, gone), max(1, reps // 2)
    )
    lb = plan.stats["lower_bound"]
    base_in = copied.sum(axis=(0, 2))
    return {
        "scenario": name,
        "bal_eep": plan.stats["balancedness_after"],
        "bal_base": baseline.balancedness(new_base, load),
        "copies_eep": plan.stats["copies"],
        "copies_base": int(copied.sum()),
        "lower_bound": lb,
        "ratio_eep": plan.stats["copies"] / max(lb, 1),
        "ratio_base": int(copied.sum()) / max(lb, 1),
        "reloads": plan.stats["checkpoint_reloads"],
        "gb_eep": plan.stats["copies"] * EXPERT_BYTES / 1e9,
        "gb_base": int(copied.sum()) * EXPERT_BYTES / 1e9,
        "max_in_gb": max(sched.rank_bytes_in.values(), default=0.0) / 1e9,
        "max_out_gb": max(sched.rank_bytes_out.values(), default=0.0) / 1e9,
        "base_max_in_gb": float(base_in.max()) * EXPERT_BYTES / 1e9,
        "makespan_s": sched.makespan,
        "makespan_lb_s": sched.makespan_lower_bound,
        "makespan_ratio": sched.makespan / max(sched.makespan_lower_bound, 1e-12),
        "rounds": len(sched.rounds),
        "ms_eep": t_eep,
        "ms_eep_one_process": t_one,
        "ms_base": t_base,
    }


def run(quick: bool, wide: bool = False) -> Result:
    loads = [("zipf", 1.0), ("zipf", 1.5)] if quick else [
        ("zipf", 0.5), ("zipf", 1.0), ("zipf", 1.2), ("zipf", 1.5),
        ("lognormal", 0.5), ("lognormal", 1.0), ("mix", 1.3),
    ]  # fmt: skip
    reps = 3 if quick else 7
    wait_for_workers()
    out: dict[str, Any] = {"layers": LAYERS, "experts": EXPERTS, "expert_bytes": EXPERT_BYTES,
                           "planner_workers": len(worker_pids()),
                           "placement": [], "rescale": []}  # fmt: skip
    for kind, param in loads:
        load = make_load(kind, param)
        label = f"{kind} {param}"
        for ranks, slots in PLACEMENTS:
            out["placement"].append({"load": label, **bench_placement(load, ranks, slots, reps)})
        for case in RESCALES:
            out["rescale"].append({"load": label, **bench_rescale(load, case, reps)})
        if wide:
            for ranks, slots in WIDE_PLACEMENTS:
                row = bench_placement(load, ranks, slots, reps)
                out["placement"].append({"load": label, "wide": True, **row})
            for case in WIDE_RESCALES:
                row = bench_rescale(load, case, reps)
                out["rescale"].append({"load": label, "wide": True, **row})
    return out


def sweep(loads: list[tuple[str, float]], reps: int) -> Result:
    """eep alone over SWEEP_PLACEMENTS and SWEEP_RESCALES: p50 time (with the planner
    workers), balancedness, and for rescales copies against the lower bound."""
    wait_for_workers()
    out: dict[str, Any] = {"planner_workers": len(worker_pids()), "placement": [], "rescale": []}
    for kind, param in loads:
        load = make_load(kind, param)
        label = f"{kind} {param}"
        for ranks, slots in SWEEP_PLACEMENTS:
            ms, placed = p50_ms(partial(plan_placement, load, ranks, slots), reps)
            out["placement"].append({"load": label, "shape": f"{ranks}x{slots}", "ms": ms,
                                     "bal": balancedness(placed, load)})  # fmt: skip
        for name, old, new, slots, failed in SWEEP_RESCALES:
            current = plan_placement(load, old, slots)
            ms, plan = p50_ms(partial(plan_rescale, current, load, new, failed_ranks=failed), reps)
            st = plan.stats
            out["rescale"].append({
                "load": label, "shape": f"{name} x{slots}", "ms": ms,
                "bal": st["balancedness_after"], "ratio": st["copies"] / max(st["lower_bound"], 1),
            })  # fmt: skip
    out["over_time"] = [
        f"{r['load']} placement {r['shape']}" for r in out["placement"] if r["ms"] > 20.0
    ] + [f"{r['load']} rescale {r['shape']}" for r in out["rescale"] if r["ms"] > 150.0]
    out["below_0.99"] = [
        f"{r['load']} rescale {r['shape']}" for r in out["rescale"] if r["bal"] < 0.99
    ]
    return out


def render_sweep(result: Result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    for kind, goal in (("placement", 20.0), ("rescale", 150.0)):
        rows = result[kind]
        t = Table(title=f"Sweep, {kind}: worst over the loads (time goal {goal:.0f} ms)")
        for col in ("shape", "max ms", "slowest load", "min bal", "least balanced load",
                    "over goal"):  # fmt: skip
            t.add_column(col, justify="right")
        if kind == "rescale":
            t.add_column("max copies/LB", justify="right")
        for shape in dict.fromkeys(r["shape"] for r in rows):
            mine = [r for r in rows if r["shape"] == shape]
            slow = max(mine, key=lambda r: r["ms"])
            weak = min(mine, key=lambda r: r["bal"])
            cells = [shape, f"{slow['ms']:.0f}", slow["load"], f"{weak['bal']:.4f}", weak["load"],
                     f"{sum(r['ms'] > goal for r in mine)} of {len(mine)}"]  # fmt: skip
            if kind == "rescale":
                cells.append(f"{max(r['ratio'] for r in mine):.2f}")
            t.add_row(*cells)
        console.print(t)
    console.print(
        f"{len(result['over_time'])} cells over their time goal, "
        f"{len(result['below_0.99'])} rescales below 0.99 "
        f"(with {result['planner_workers']} planner worker(s))."
    )


# The loads the planner issue sets its targets on; other loads are reported, not checked.
TARGET_LOADS = ("zipf 0.5", "zipf 1.0", "zipf 1.2", "zipf 1.5", "lognormal 0.5", "lognormal 1.0")


def check_targets(result: Result) -> Result:
    """The planner issue's targets, each checked against this run: which hold, which not."""
    checks: list[tuple[str, bool]] = []
    for r in result["placement"]:
        if r["load"] not in TARGET_LOADS or r.get("wide"):
            continue
        cell = f"placement {r['load']} {r['ranks']}x{r['slots']}"
        checks.append((f"{cell}: balancedness >= baseline", r["bal_eep"] >= r["bal_base"]))
        checks.append((f"{cell}: plan_placement <= 20 ms", r["ms_eep"] <= 20.0))
        if r["ranks"] == 32 and r["load"] in ("zipf 1.2", "zipf 1.5"):
            floor = 0.998 if r["load"] == "zipf 1.2" else 0.99
            checks.append((f"{cell}: balancedness >= {floor}", r["bal_eep"] >= floor))
    for r in result["rescale"]:
        if r["load"] not in TARGET_LOADS or r.get("wide"):
            continue
        cell = f"rescale {r['load']} {r['scenario']}"
        limit = 2.0 if "fail" in r["scenario"] else 1.3
        checks.append((f"{cell}: balancedness >= 0.99", r["bal_eep"] >= 0.99))
        checks.append((f"{cell}: copies <= {limit}x lower bound", r["ratio_eep"] <= limit))
        checks.append((f"{cell}: plan_rescale <= 150 ms", r["ms_eep"] <= 150.0))
        checks.append((f"{cell}: makespan <= 1.15x its bound", r["makespan_ratio"] <= 1.15))
    return {
        "checked": len(checks),
        "met": sum(ok for _, ok in checks),
        "missed": [name for name, ok in checks if not ok],
    }


def render(result: Result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 172))
    t = Table(title="Placement (58 x 256): balancedness and p50 planner time")
    for col in ("load", "R x S", "bal eep", "bal base", "eep/base", "ms eep", "ms 1 proc",
                "ms base"):  # fmt: skip
        t.add_column(col, justify="right")
    for r in result["placement"]:
        t.add_row(
            r["load"], f"{r['ranks']}x{r['slots']}", f"{r['bal_eep']:.4f}",
            f"{r['bal_base']:.4f}", f"{r['bal_eep'] / r['bal_base']:.3f}",
            f"{r['ms_eep']:.1f}", f"{r['ms_eep_one_process']:.1f}", f"{r['ms_base']:.1f}",
        )  # fmt: skip
    console.print(t)
    t = Table(title="Rescale (44 MB/expert): copies vs the lower bound, balance, transfer time")
    cols = ("load", "scenario", "bal eep", "bal base", "copies eep", "base", "LB", "eep/LB",
            "base/LB", "GB eep", "GB base", "max in GB", "max out GB", "makespan/LB",
            "ms eep", "ms 1 proc", "ms base")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right")
    for r in result["rescale"]:
        t.add_row(
            r["load"], r["scenario"], f"{r['bal_eep']:.4f}", f"{r['bal_base']:.4f}",
            str(r["copies_eep"]), str(r["copies_base"]), str(r["lower_bound"]),
            f"{r['ratio_eep']:.2f}", f"{r['ratio_base']:.2f}", f"{r['gb_eep']:.0f}",
            f"{r['gb_base']:.0f}", f"{r['max_in_gb']:.1f}", f"{r['max_out_gb']:.1f}",
            f"{r['makespan_ratio']:.3f}", f"{r['ms_eep']:.0f}",
            f"{r['ms_eep_one_process']:.0f}", f"{r['ms_base']:.0f}",
        )  # fmt: skip
    console.print(t)
    console.print(
        f"Planning ran with {result['planner_workers']} planner worker process(es) besides this "
        "one ('ms 1 proc': this process alone; the plans are identical). Targets are checked on "
        "the issue's loads and shapes; 'mix 1.3' and the --wide 64-rank shapes are reported only."
    )
    targets = result["targets"]
    console.print(f"Targets met: {targets['met']} of {targets['checked']}")
    for name in targets["missed"]:
        console.print(f"  missed: {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer loads and repeats")
    parser.add_argument("--wide", action="store_true", help="also 64-rank shapes (reported)")
    parser.add_argument(
        "--sweep", action="store_true", help="only eep's time and balance over many shapes"
    )
    args = parser.parse_args()
    if args.sweep:
        found = sweep([(name.split()[0], float(name.split()[1])) for name in TARGET_LOADS], 3)
        if args.json:
            print(json.dumps(found))
        else:
            render_sweep(found)
        return
    result = run(args.quick, args.wide)
    result["targets"] = check_targets(result)
    if args.json:
        print(json.dumps(result))
    else:
        render(result)


if __name__ == "__main__":
    main()
