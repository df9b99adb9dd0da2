"""`python -m bench.widen`: a wider or restarted local search against eep's rescale plans."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import widen
from eep_controller.planner import Placement, plan_placement, plan_rescale, refinement, search
from eep_controller.planner.placement import layer_balancedness
from eep_controller.planner.search import CHOOSE_ABOVE


def test_light_ranks_widens_the_search_and_restores_the_planner_settings_even_on_an_error() -> None:
    before = (search.FEW_SLOTS, search.FEW_SLOTS_LIGHT_RANKS, refinement.CANDIDATE_SLOTS)
    with pytest.raises(RuntimeError), widen.light_ranks(31, 9):
        assert search.FEW_SLOTS >= 9 and search.FEW_SLOTS_LIGHT_RANKS == 31
        assert refinement.CANDIDATE_SLOTS >= 31 * 9
        raise RuntimeError("leave the block")
    assert before == (search.FEW_SLOTS, search.FEW_SLOTS_LIGHT_RANKS, refinement.CANDIDATE_SLOTS)


def test_perturbed_loads_stay_close_non_negative_and_seeded() -> None:
    load = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    a = widen.perturbed(load, 0.01, np.random.default_rng(1))
    b = widen.perturbed(load, 0.01, np.random.default_rng(1))
    assert np.array_equal(a, b) and a.min() >= 0.0
    assert np.allclose(a, load, rtol=0.06) and not np.array_equal(a, load)


def _small_scale_down() -> tuple[np.ndarray, Placement, np.ndarray, list[int]]:
    """Four Zipf layers scaled from 12 ranks of 4 slots to 8: load, placement, the
    survivors' slots and the removed ranks."""
    rng = np.random.default_rng(11)
    load = np.stack([rng.permutation(1.0 / np.arange(1, 25) ** 1.2) for _ in range(4)])
    current = plan_placement(load, 12, 4)
    plan = plan_rescale(current, load, 8)
    removed = [r for r in range(12) if plan.rank_map[r] < 0]
    survivors = [r for r in range(12) if plan.rank_map[r] >= 0]
    return load, current, current.by_rank()[:, survivors], removed


def test_best_of_keeps_per_layer_the_fewest_copies_at_the_goal_and_never_a_worse_plan() -> None:
    load, current, origin, removed = _small_scale_down()
    rng = np.random.default_rng(0)
    plans = [plan_rescale(current, load, 8, removed_ranks=removed).placement.by_rank()]
    for _ in range(6):
        noisy = widen.perturbed(load, 0.003, rng)
        plans.append(plan_rescale(current, noisy, 8, removed_ranks=removed).placement.by_rank())
    best = widen.best_of(plans, load, origin)
    copies = np.stack([(p != origin).sum(axis=(1, 2)) for p in plans])  # [K, L]
    bal = np.stack([layer_balancedness(p, load) for p in plans])
    got_copies = (best != origin).sum(axis=(1, 2))
    got_bal = layer_balancedness(best, load)
    for layer in range(load.shape[0]):
        good = bal[:, layer] >= CHOOSE_ABOVE
        if good.any():
            assert got_bal[layer] >= CHOOSE_ABOVE
            assert got_copies[layer] == copies[good, layer].min()
        else:
            assert np.array_equal(best[layer], plans[0][layer])
    # not vacuous: restarts saved copies somewhere, and a cheaper plan below the goal was
    # passed over somewhere
    assert (got_copies < copies[0]).any()
    assert ((copies < got_copies) & (bal < CHOOSE_ABOVE)).any()
    # each layer is one of the candidates' layers, whole
    for layer in range(load.shape[0]):
        assert any(np.array_equal(best[layer], p[layer]) for p in plans)


def test_the_script_reports_every_variant_and_restarts_never_cost_copies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--json", "--load", "zipf:1.2", "--layers", "2", "--light", "5", "--restarts", "1"]
    assert widen.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    names = [v["variant"] for v in result["variants"]]
    assert names == ["eep", "5 light ranks", "eep + 1 restarts"]
    assert result["layers"] == 2 and len(result["removed_ranks"]) == 16
    eep, _, restarted = result["variants"]
    assert restarted["copies"] <= eep["copies"] and restarted["seconds"] > eep["seconds"]
    for v in result["variants"]:
        assert v["copies"] >= result["lower_bound"] > 0
        assert v["ratio"] == pytest.approx(v["copies"] / result["lower_bound"])


@pytest.mark.parametrize(
    "argv",
    [["--layers", "0"], ["--layers", "59"], ["--restarts", "-1"], ["--perturb", "0"],
     ["--light", "3,x"], ["--light", "0"]],
)  # fmt: skip
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        widen.main(argv)
    assert exc.value.code == 2
