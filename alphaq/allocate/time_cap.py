"""A cap on llama.cpp's quantiser time: the knapsack with a second constraint.

    min sum_i cost[i, x_i]  s.t.  bytes within the budget (per budget group, exact)
                                  sum_i time[i, x_i] <= time_cap

The types a plan picks set how long llama.cpp's quantiser runs (alphaq.gguf.speed: tens of ns per
weight for the k-quants, hundreds for the IQ grid types), and at a model's full size that stage
can take longer than everything else. The byte budget stays the exact knapsack of
alphaq.allocate.solver; the time is relaxed with one Lagrange multiplier mu shared by every budget
group: each step solves the knapsack on cost + mu * time, and a bisection over mu finds the
smallest multiplier whose solution meets the cap. The Lagrangian moves in jumps (on a small
model the first feasible solution can sit well below the cap), so a greedy pass then spends the
slack: the single change of an item's type that lowers the cost most while both constraints hold,
repeated until none is left. Where a gap to the bound remains and the problem is small enough
(`_MILP_MAX_VARS`), HiGHS solves it with both constraints (scipy.optimize.milp, time-limited); its
answer is taken only if it is better and meets both caps in exact arithmetic. So the cap is
always met, the IQ types stay where they buy the most, and for every mu tried, (lower bound of
the penalised problem) - mu * time_cap bounds the capped optimum from below (weak duality): the
plan's gap stays a certificate.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from alphaq.errors import BudgetError

logger = logging.getLogger(__name__)

# bisection steps over log(mu) once the cap is bracketed: the multiplier to ~1e-6 relative
_STEPS = 24
# the greedy pass stops after this many moves (each one a scan of every option; the choice stays feasible)
_GREEDY_MAX_MOVES = 10_000
# HiGHS on both constraints when (items x options) stays below this, for at most _MILP_SECONDS
_MILP_MAX_VARS = 60_000
_MILP_SECONDS = 30.0

# solve(costs) -> (choice, penalised objective, penalised lower bound, proven optimal)
Solve = Callable[[np.ndarray], tuple[np.ndarray, float, float, bool]]


@dataclass(frozen=True)
class CappedSolution:
    choice: np.ndarray
    objective: float  # sum of the true costs of the choice
    lower_bound: float  # on the capped optimum
    proven_optimal: bool
    multiplier: float  # mu of the returned choice (0: the cap did not bind)
    time: float  # the choice's quantiser time, in the units of `times`


def solve_time_capped(solve: Solve, costs: np.ndarray, times: np.ndarray, time_cap: float, *,
                      sizes: np.ndarray, groups: list[tuple[np.ndarray, int]],
                      describe: Callable[[float], str]) -> CappedSolution:
    """The cheapest choice under the byte budget whose summed ``times`` stay within ``time_cap``.

    ``solve`` is the exact knapsack over every budget group; ``sizes`` and ``groups`` (item indices
    and capacity per group) are what it respects, for the greedy pass. ``describe(time)`` words a
    time for the error when even the fastest types exceed the cap."""
    rows = np.arange(costs.shape[0])

    def total(values: np.ndarray, choice: np.ndarray) -> float:
        return float(values[rows, choice].sum())

    choice, _, lower, proven = solve(costs)
    if total(times, choice) <= time_cap:  # the cap does not bind: the plain optimum
        return CappedSolution(choice, total(costs, choice), lower, proven, 0.0, total(times, choice))
    fastest, *_ = solve(np.where(np.isfinite(costs), times, np.inf))
    if total(times, fastest) > time_cap:
        raise BudgetError(f"the quantiser time cap cannot be met under this budget: the fastest types it allows take "
                          f"{describe(total(times, fastest))}, the cap is {describe(time_cap)}")
    best = {"choice": fastest, "objective": total(costs, fastest), "mu": math.inf, "lower": lower}  # mu = 0 bounds too

    def attempt(mu: float) -> bool:
        pick, _, pen_lower, _ = solve(costs + mu * times)
        best["lower"] = max(best["lower"], pen_lower - mu * time_cap)
        feasible = total(times, pick) <= time_cap
        if feasible and total(costs, pick) <= best["objective"]:
            best.update(choice=pick, objective=total(costs, pick), mu=mu)
        return feasible

    finite = np.isfinite(costs)
    lo = 0.0  # infeasible
    hi = float(np.abs(costs[finite]).sum()) / max(float(times[finite].sum()), 1e-300)  # first guess at the scale
    for _ in range(200):  # mu large enough makes time dominate: the fastest choice, which is feasible
        if attempt(hi):
            break
        lo, hi = hi, hi * 4
    for _ in range(_STEPS):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 4
        if attempt(mid):
            hi = mid
        else:
            lo = mid
    choice = _spend_slack(best["choice"], costs, times, time_cap, sizes, groups)
    objective = total(costs, choice)
    lower = min(best["lower"], objective)
    proven = objective - lower <= 1e-9 * max(abs(objective), 1e-300)
    if not proven and np.isfinite(costs).sum() <= _MILP_MAX_VARS:
        exact = _milp(costs, times, time_cap, sizes, groups)
        if exact is not None and total(costs, exact[0]) < objective:
            choice, objective = exact[0], total(costs, exact[0])
        if exact is not None and exact[1]:  # HiGHS proved its answer optimal
            lower, proven = objective, True
    logger.info("quantiser time cap binds: multiplier %.3g, objective %.6g (lower bound %.6g)", best["mu"], objective,
                lower)
    return CappedSolution(choice, objective, lower, proven, best["mu"], total(times, choice))


def _spend_slack(choice: np.ndarray, costs: np.ndarray, times: np.ndarray, time_cap: float, sizes: np.ndarray,
                 groups: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """Greedy improvement of a feasible choice: change one item's type at a time, the change that
    lowers the cost most among those that keep every group's bytes and the time within their caps."""
    choice = choice.copy()
    rows = np.arange(len(choice))
    group_of = np.zeros(len(choice), dtype=np.int64)
    size_slack = np.zeros(len(groups), dtype=np.int64)
    for g, (idx, cap) in enumerate(groups):
        group_of[idx] = g
        size_slack[g] = cap - int(sizes[idx, choice[idx]].sum())
    time_slack = time_cap - float(times[rows, choice].sum())
    finite = np.isfinite(costs)
    for _ in range(min(len(choice) * costs.shape[1], _GREEDY_MAX_MOVES)):  # each move lowers the cost
        gain = costs[rows, choice][:, None] - costs
        d_size = sizes - sizes[rows, choice][:, None]
        d_time = times - times[rows, choice][:, None]
        ok = finite & (gain > 0) & (d_size <= size_slack[group_of][:, None]) & (d_time <= time_slack)
        if not ok.any():
            break
        i, j = np.unravel_index(np.argmax(np.where(ok, gain, -np.inf)), costs.shape)
        size_slack[group_of[i]] -= int(d_size[i, j])
        time_slack -= float(d_time[i, j])
        choice[i] = j
    return choice


def _milp(costs, times, time_cap, sizes, groups) -> tuple[np.ndarray, bool] | None:
    """HiGHS on the problem with both constraints: (choice, proven optimal), or None when it found
    nothing or its answer breaks a cap outside its float tolerance (checked exactly here)."""
    import scipy.sparse as sp
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, m = costs.shape
    item, opt = np.nonzero(np.isfinite(costs))
    c = costs[item, opt] - np.min(np.where(np.isfinite(costs), costs, np.inf), axis=1)[item]
    c = c / (c.max() or 1.0)  # shifted and scaled per problem: HiGHS's tolerances are absolute
    nv = len(item)
    rows = [sp.csr_matrix((np.ones(nv), (item, np.arange(nv))), shape=(n, nv))]
    lo, hi = [np.ones(n)], [np.ones(n)]
    for idx, cap in groups:
        member = np.isin(item, idx)
        scale = float(sizes.max()) or 1.0
        rows.append(sp.csr_matrix(np.where(member, sizes[item, opt] / scale, 0.0).reshape(1, -1)))
        lo.append([-np.inf]), hi.append([cap / scale])
    t_scale = float(times.max()) or 1.0
    rows.append(sp.csr_matrix((times[item, opt] / t_scale).reshape(1, -1)))
    lo.append([-np.inf]), hi.append([time_cap / t_scale])
    with _quiet_stdout():  # HiGHS prints solver internals to the C stdout even with disp off
        res = milp(c, constraints=LinearConstraint(sp.vstack(rows).tocsr(), np.concatenate(lo), np.concatenate(hi)),
                   integrality=np.ones(nv), bounds=Bounds(0, 1),
                   options={"mip_rel_gap": 0.0, "disp": False, "time_limit": _MILP_SECONDS})
    if res.x is None:
        return None
    x = res.x > 0.5
    if np.bincount(item[x], minlength=n).min() != 1 or np.bincount(item[x], minlength=n).max() != 1:
        return None
    choice = np.zeros(n, dtype=np.int64)
    choice[item[x]] = opt[x]
    r = np.arange(n)
    if float(times[r, choice].sum()) > time_cap or any(int(sizes[idx, choice[idx]].sum()) > cap for idx, cap in groups):
        logger.debug("HiGHS answer breaks a cap outside its tolerance; kept the Lagrangian one")
        return None
    return choice, res.status == 0


@contextmanager
def _quiet_stdout():
    """File descriptor 1 to /dev/null for the duration (C code's printf included)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
