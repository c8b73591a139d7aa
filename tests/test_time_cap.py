"""The quantiser time cap (alphaq.allocate.time_cap, --max-quantise-ns): against brute force on
small instances with both constraints, through make_plan, and at the command line."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from alphaq import cli
from alphaq.allocate.plan import MODES, PlanConfig, make_plan
from alphaq.allocate.solver import solve_mckp
from alphaq.allocate.time_cap import solve_time_capped
from alphaq.errors import AlphaQError, BudgetError
from alphaq.gguf.qtypes import FULL_LADDER, allowed_type_names
from alphaq.gguf.speed import measured_types, quantise_ns
from test_plan import moe_model


def _solver(sizes, capacity):
    def solve(costs):
        r = solve_mckp(costs, sizes, capacity)
        return r.choice, r.objective, r.lower_bound, r.proven_optimal
    return solve


def _brute(costs, sizes, times, capacity, time_cap):
    n, m = costs.shape
    rows = np.arange(n)
    best = math.inf
    for combo in itertools.product(range(m), repeat=n):
        c = np.array(combo)
        if sizes[rows, c].sum() <= capacity and times[rows, c].sum() <= time_cap:
            best = min(best, costs[rows, c].sum())
    return best


@pytest.mark.parametrize("with_milp", [True, False])
def test_capped_solution_against_the_brute_force_optimum(with_milp, monkeypatch):
    """Whatever the cap, the answer meets both constraints and its lower bound is below the true
    capped optimum. With HiGHS (small problems) it is that optimum, proven; the Lagrangian and the
    greedy pass alone (what a problem too large for HiGHS gets) reach it in most instances."""
    from alphaq.allocate import time_cap

    if not with_milp:
        monkeypatch.setattr(time_cap, "_MILP_MAX_VARS", 0)
    rng = np.random.default_rng(3)
    bound = optimal = 0
    for _ in range(40):
        n, m = int(rng.integers(2, 6)), int(rng.integers(2, 5))
        sizes = rng.integers(1, 40, size=(n, m))
        costs = rng.random((n, m)) * 10
        times = rng.random((n, m)) * 5
        capacity = max(int(np.ceil(sizes.max(axis=1).sum() * 0.7)), int(sizes.min(axis=1).sum()))
        plain = solve_mckp(costs, sizes, capacity)
        fastest = _brute(times, sizes, times, capacity, math.inf)
        cap = fastest + rng.random() * (times[np.arange(n), plain.choice].sum() - fastest)
        res = solve_time_capped(_solver(sizes, capacity), costs, times, cap, describe=str, sizes=sizes,
                                groups=[(np.arange(n), capacity)])
        rows = np.arange(n)
        assert sizes[rows, res.choice].sum() <= capacity
        assert times[rows, res.choice].sum() <= cap + 1e-9
        best = _brute(costs, sizes, times, capacity, cap)
        assert res.lower_bound <= best + 1e-9 <= res.objective + 2e-9
        assert res.objective == pytest.approx(costs[rows, res.choice].sum())
        bound += res.multiplier > 0
        optimal += res.objective == pytest.approx(best, rel=1e-12)
        if with_milp:
            assert res.objective == pytest.approx(best, rel=1e-12) and res.proven_optimal
    assert bound > 10  # the cap bound in most instances: the Lagrangian search was exercised
    assert optimal >= 32  # measured 37 of 40 without HiGHS


def test_a_cap_that_does_not_bind_changes_nothing_and_an_impossible_one_is_refused():
    costs = np.array([[3.0, 1.0], [2.0, 0.5]])
    sizes = np.array([[1, 2], [1, 2]])
    times = np.array([[1.0, 10.0], [1.0, 10.0]])
    loose = solve_time_capped(_solver(sizes, 4), costs, times, 100.0, describe=str, sizes=sizes,
                              groups=[(np.arange(2), 4)])
    assert loose.choice.tolist() == [1, 1] and loose.multiplier == 0.0 and loose.proven_optimal
    tight = solve_time_capped(_solver(sizes, 4), costs, times, 11.0, describe=str, sizes=sizes,
                              groups=[(np.arange(2), 4)])
    assert tight.choice.tolist() == [1, 0]  # the slow option where it buys the most
    with pytest.raises(BudgetError, match="fastest types it allows take 2.0, the cap is 1.5"):
        solve_time_capped(_solver(sizes, 4), costs, times, 1.5, describe=str, sizes=sizes,
                              groups=[(np.arange(2), 4)])


def test_every_type_a_plan_can_write_has_a_measured_speed():
    """A plan's estimate covers every candidate, every shape fallback and the float types."""
    assert set(allowed_type_names()) <= set(measured_types())
    assert quantise_ns(T.IQ2_XS) > quantise_ns(T.IQ4_XS) > quantise_ns(T.Q3_K) > quantise_ns(T.Q8_0)


def _damage(tensors, seed=0):
    """Synthetic damage per (tensor, None) and type: falls with the type's true size, with a
    per-tensor sensitivity, so that IQ types win at equal size as they do in measurements."""
    from alphaq.gguf.qtypes import resolve_type, true_bpw

    rng = np.random.default_rng(seed)
    out = {}
    for t in tensors:
        if len(t.shape) < 2 or t.name.endswith("norm.weight") or "ffn_gate_inp" in t.name:
            continue
        s = float(rng.uniform(0.5, 2.0))
        out[(t.name, None)] = {n: s * 2.0 ** (-2 * true_bpw(resolve_type(n))) * (0.8 if n.startswith("IQ") else 1.0)
                               for n in FULL_LADDER + ("IQ4_NL", "Q4_0", "Q5_0", "Q5_1", "F16")}
    return out


def _damage_plan(tensors, damage, **changes):
    cfg = PlanConfig(**MODES["damage"], budget_mode="bpw", budget=3.5, **changes)
    return make_plan([], tensors, cfg, fixed_bytes=0, damage=damage)


def test_plan_under_a_cap_meets_it_and_reports_its_estimate():
    tensors, _ = moe_model(n_blocks=2, n_expert=4)
    damage = _damage(tensors)
    free = _damage_plan(tensors, damage)
    cap = (free.totals.quantise_ns_per_weight + 60) / 2
    capped = _damage_plan(tensors, damage, max_quantise_ns=cap)
    assert capped.totals.quantise_ns_per_weight <= cap < free.totals.quantise_ns_per_weight
    assert capped.totals.objective >= free.totals.objective  # the cap costs quality, never gains it
    assert capped.totals.lower_bound <= capped.totals.objective
    assert capped.totals.true_bpw <= 3.5 and capped.settings["max_quantise_ns"] == cap
    # the estimate is the parameter-weighted mean of the table over every quantised weight
    parts = [(it.params, it.type) for it in capped.items] + [(math.prod(f.shape), f.type) for f in capped.fixed
                                                             if f.quantised]
    assert capped.totals.quantise_ns_per_weight == pytest.approx(
        sum(n * quantise_ns(t) for n, t in parts) / sum(n for n, _ in parts))
    with pytest.raises(AlphaQError, match="ns per allocated weight"):
        _damage_plan(tensors, damage, max_quantise_ns=1.0)


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_cli_refuses_a_bad_cap_in_one_line(value, tmp_path, capsys):
    rc = cli.main(["plan", str(tmp_path / "missing.gguf"), "--budget", "3", "--json", str(tmp_path / "p.json"),
                   f"--max-quantise-ns={value}"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and f"--max-quantise-ns {float(value):g} must be" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "p.json").exists()
