"""alphaq.allocate.solver against known optimal answers: brute force, and the three exact methods against each other."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linprog

from alphaq.allocate import solver
from alphaq.errors import AlphaQError, InternalError
from alphaq.allocate.solver import solve_mckp


def brute_force(costs, sizes, capacity):
    n, m = costs.shape
    best, best_choice = np.inf, None
    for combo in itertools.product(range(m), repeat=n):
        idx = np.array(combo)
        if sizes[np.arange(n), idx].sum() <= capacity:
            v = costs[np.arange(n), idx].sum()
            if v < best:
                best, best_choice = v, idx
    return best, best_choice


def random_instance(rng, n, m, kind):
    if kind == "paper":  # eta = w * Var * 2^-2b, size = params * b, a few shapes
        bits = np.sort(rng.choice(np.arange(1, 9), size=m, replace=False))
        params = rng.choice([768 * 1024, 1408 * 2048, 512 * 4096], size=n)
        w = np.exp(rng.normal(0, 0.6, n)) * np.exp(rng.normal(-9, 0.5, n))
        return w[:, None] * np.exp2(-2.0 * bits)[None, :], params[:, None] * bits[None, :]
    costs = rng.random((n, m)) * 10
    sizes = rng.integers(1, 60, size=(n, m))
    if kind == "holes":  # unavailable options
        costs[rng.random((n, m)) < 0.25] = np.inf
        costs[np.isinf(costs).all(axis=1), 0] = 1.0
    if kind == "ties":  # equal sizes and costs across items
        sizes = np.tile(rng.integers(1, 10, size=m), (n, 1))
        costs = np.tile(rng.random(m), (n, 1))
    return costs, sizes


def capacity_between(rng, costs, sizes):
    avail = np.isfinite(costs)
    lo = int(np.where(avail, sizes, 10**12).min(axis=1).sum())
    hi = int(np.where(avail, sizes, 0).max(axis=1).sum())
    return int(rng.integers(lo, hi + 1))


@pytest.mark.parametrize("kind", ["paper", "uniform", "holes", "ties"])
def test_dp_matches_brute_force(kind):
    rng = np.random.default_rng(11)
    cores = 0
    for _ in range(60):
        n, m = int(rng.integers(1, 7)), int(rng.integers(1, 5))
        costs, sizes = random_instance(rng, n, m, kind)
        cap = capacity_between(rng, costs, sizes)
        best, _ = brute_force(costs, sizes, cap)
        res = solve_mckp(costs, sizes, cap, solver="dp")
        assert res.size <= cap
        assert res.objective == pytest.approx(best, rel=1e-12, abs=1e-300)
        assert res.proven_optimal
        assert res.lower_bound <= best * (1 + 1e-12)
        cores += res.core_items > 0
    if kind in ("uniform", "holes"):
        assert cores > 0  # the exact DP over a non-empty core was exercised, not only the LP


@pytest.mark.parametrize("which", ["highs", "cbc"])
def test_milp_solvers_match_brute_force(which):
    rng = np.random.default_rng(5)
    for _ in range(8):
        costs, sizes = random_instance(rng, int(rng.integers(2, 6)), 3, "holes")
        cap = capacity_between(rng, costs, sizes)
        best, _ = brute_force(costs, sizes, cap)
        res = solve_mckp(costs, sizes, cap, solver=which)
        assert res.size <= cap
        assert res.objective == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_three_exact_methods_agree_on_larger_random_instances(seed):
    rng = np.random.default_rng(100 + seed)
    kind = ["paper", "uniform", "paper"][seed]
    costs, sizes = random_instance(rng, 150, 4, kind)
    cap = capacity_between(rng, costs, sizes)
    results = {s: solve_mckp(costs, sizes, cap, solver=s) for s in ("dp", "highs", "cbc")}
    ref = results["dp"].objective
    for name, r in results.items():
        assert r.size <= cap, name
        assert r.objective == pytest.approx(ref, rel=1e-9), name


def test_lower_bound_is_the_lp_relaxation():
    """The certificate equals the LP relaxation of Eq. 5, solved independently by HiGHS' LP."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        costs, sizes = random_instance(rng, 40, 4, "uniform")
        cap = capacity_between(rng, costs, sizes)
        n, m = costs.shape
        a_eq = np.kron(np.eye(n), np.ones(m))
        lp = linprog(costs.ravel(), A_ub=sizes.reshape(1, -1), b_ub=[cap], A_eq=a_eq, b_eq=np.ones(n), bounds=(0, 1))
        res = solve_mckp(costs, sizes, cap)
        assert res.lower_bound == pytest.approx(lp.fun, rel=1e-9)
        assert res.lower_bound <= res.objective


def test_budget_extremes():
    rng = np.random.default_rng(9)
    costs, sizes = random_instance(rng, 30, 4, "paper")  # sizes increase, costs decrease with bits
    lo, hi = int(sizes[:, 0].sum()), int(sizes[:, -1].sum())
    for which in solver.SOLVERS:
        assert np.all(solve_mckp(costs, sizes, lo, solver=which).choice == 0)
        assert np.all(solve_mckp(costs, sizes, hi, solver=which).choice == 3)
        assert np.all(solve_mckp(costs, sizes, 10 * hi, solver=which).choice == 3)
    with pytest.raises(AlphaQError):
        solve_mckp(costs, sizes, lo - 1)


def test_core_too_large_falls_back_to_highs_and_stays_exact(monkeypatch):
    monkeypatch.setattr(solver, "_DP_MAX_PAIRS", 1)
    rng = np.random.default_rng(21)
    checked = 0
    for _ in range(20):
        costs, sizes = random_instance(rng, 6, 3, "uniform")
        cap = capacity_between(rng, costs, sizes)
        best, _ = brute_force(costs, sizes, cap)
        res = solve_mckp(costs, sizes, cap)
        assert res.objective == pytest.approx(best, rel=1e-12)
        checked += res.core_items > 0
    assert checked > 0


def test_input_validation():
    with pytest.raises(ValueError):
        solve_mckp(np.ones((2, 2)), np.ones((2, 3), dtype=int), 10)
    with pytest.raises(ValueError):
        solve_mckp(np.array([[np.inf, np.inf]]), np.array([[1, 2]]), 10)
    with pytest.raises(ValueError):
        solve_mckp(np.ones((1, 2)), np.array([[1.5, 2.0]]), 10)
    with pytest.raises(AlphaQError):
        solve_mckp(np.ones((1, 2)), np.array([[1, 2]]), 10, solver="gurobi")


@pytest.mark.parametrize("kind", ["paper", "uniform", "holes"])
def test_raw_lower_bound_never_exceeds_the_brute_force_optimum(kind):
    """The bound the DP computes, before solve_mckp checks it, against the true optimum: the
    result's bound used to be capped at the objective, which would hide a bound that is too high."""
    rng = np.random.default_rng(17)
    for _ in range(40):
        costs, sizes = random_instance(rng, int(rng.integers(1, 7)), int(rng.integers(2, 5)), kind)
        cap = capacity_between(rng, costs, sizes)
        best, _ = brute_force(costs, sizes, cap)
        norm = solver._normalise(costs, sizes)
        _, lb, _, _ = solver._solve_dp(norm, cap, None)
        raw = lb * norm.scale + float(norm.shift.sum())
        assert raw <= best + 1e-12 * (1 + abs(best)), (raw, best)


def test_an_invalid_lower_bound_is_an_internal_error(monkeypatch):
    """A bound above a feasible solution's objective is a bug: raised, never clipped to the objective."""
    rng = np.random.default_rng(4)
    costs, sizes = random_instance(rng, 8, 3, "uniform")
    cap = capacity_between(rng, costs, sizes)
    assert solve_mckp(costs, sizes, cap).lower_bound <= solve_mckp(costs, sizes, cap).objective
    real = solver._lp_relaxation

    def inflated(norm, capacity):
        lp = real(norm, capacity)
        return solver._LP(lp.lam, lp.bound + 1.0, lp.choice, lp.integral)  # +1 = the largest cost, normalised

    monkeypatch.setattr(solver, "_lp_relaxation", inflated)
    for which in solver.SOLVERS:
        with pytest.raises(InternalError, match="lower bound .* exceeds the objective"):
            solve_mckp(costs, sizes, cap, solver=which)
