"""A cap on llama.cpp's quantiser time: the knapsack with a second constraint.

    min sum_i cost[i, x_i]  s.t.  bytes within the budget (per budget group, exact)
                                  sum_i time[i, x_i] <= time_cap

The types a plan picks set how long llama.cpp's quantiser runs (alphaq.gguf.speed: tens of ns per
weight for the k-quants, hundreds for the IQ grid types), and at a model's full size that stage
can take longer than everything else. The byte budget stays the exact knapsack of
alphaq.allocate.solver; the time is relaxed with one Lagrange multiplier mu shared by every budget
group: each step solves the knapsack on cost + mu * time, and a bisection over mu finds the
smallest multiplier whose solution meets the cap. So the cap is always met, the IQ types stay
where they buy the most, and for every mu tried, (lower bound of the penalised problem) - mu *
time_cap bounds the capped optimum from below (weak duality): the plan's gap stays a certificate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from alphaq.errors import BudgetError

logger = logging.getLogger(__name__)

# bisection steps over log(mu) once the cap is bracketed: the multiplier to ~1e-6 relative
_STEPS = 24

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
                      describe: Callable[[float], str]) -> CappedSolution:
    """The cheapest choice under the byte budget whose summed ``times`` stay within ``time_cap``.

    ``describe(time)`` words a time for the error when even the fastest types exceed the cap."""
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
    best = {"choice": fastest, "objective": total(costs, fastest), "mu": math.inf, "lower": -math.inf}

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
    objective = best["objective"]
    lower = min(best["lower"], objective)
    proven = objective - lower <= 1e-9 * max(abs(objective), 1e-300)
    logger.info("quantiser time cap binds: multiplier %.3g, objective %.6g (lower bound %.6g)", best["mu"], objective,
                lower)
    return CappedSolution(best["choice"], objective, lower, proven, best["mu"], total(times, best["choice"]))
