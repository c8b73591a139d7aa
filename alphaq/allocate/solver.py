"""Exact solvers for the multiple-choice knapsack problem of the paper's Eq. 5.

    min  sum_i cost[i, x_i]   s.t.  sum_i size[i, x_i] <= capacity,   one option x_i per item.

`costs` is an (n_items, n_options) float array (np.inf marks an option an item cannot take),
`sizes` an (n_items, n_options) int64 array; sizes and the capacity are integers (bits or bytes) so
that feasibility is checked exactly, never up to a solver tolerance.

Three methods, all exact:

* ``"dp"`` (default): LP relaxation by the convex-hull greedy (Sinha & Zoltners), the Lagrangian
  bound at the critical slope, reduced-cost fixing against a greedy incumbent, and an exact
  dynamic programme with Pareto-dominance over the few items left in the "core" (Pisinger 1995,
  "A minimal algorithm for the multiple-choice knapsack problem"). The returned lower bound is a
  certificate: objective - lower_bound is the largest possible suboptimality (0 once proven).
* ``"highs"``: HiGHS branch-and-cut through ``scipy.optimize.milp`` with mip_rel_gap = 0.
* ``"cbc"``: CBC through PuLP with gapRel = 0, as in the paper.

HiGHS and CBC see costs shifted and scaled per item (the argmin does not change) so that their
absolute tolerances mean something; their answers are re-checked in exact integer arithmetic.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from alphaq.errors import AlphaQError, BudgetError, InternalError

logger = logging.getLogger(__name__)

SOLVERS = ("dp", "highs", "cbc")
DEFAULT_SOLVER = "dp"

# Past this many (state x option) pairs in one DP layer the core is handed to HiGHS instead.
_DP_MAX_PAIRS = 4_000_000


@dataclass(frozen=True)
class MCKPResult:
    choice: np.ndarray  # (n_items,) chosen option index per item
    objective: float  # sum of chosen costs, in the caller's units
    size: int  # sum of chosen sizes (<= capacity, exactly)
    lower_bound: float  # proven lower bound on the optimum (LP / Lagrangian bound, or solver's dual bound)
    proven_optimal: bool  # objective is optimal within floating-point rounding
    solver: str
    seconds: float  # wall time; not part of any deterministic output
    core_items: int = 0  # "dp": items the exact DP had to branch over

    @property
    def gap(self) -> float:
        return self.objective - self.lower_bound


@dataclass(frozen=True)
class _Normalised:
    cost: np.ndarray  # (n, m) shifted per item to min 0 and divided by `scale`; inf where unavailable
    size: np.ndarray  # (n, m) int64; 0 where unavailable (masked by `avail`)
    avail: np.ndarray  # (n, m) bool
    shift: np.ndarray  # (n,) per-item minimum cost
    scale: float


def _normalise(costs: np.ndarray, sizes: np.ndarray) -> _Normalised:
    costs = np.asarray(costs, dtype=np.float64)
    sizes = np.asarray(sizes)
    if costs.ndim != 2 or costs.shape != sizes.shape:
        raise ValueError(f"costs {costs.shape} and sizes {sizes.shape} must be equal 2-D shapes")
    if np.any(np.isnan(costs)):
        raise ValueError("costs contain NaN")
    avail = np.isfinite(costs)
    if not np.all(avail.any(axis=1)):
        bad = int(np.flatnonzero(~avail.any(axis=1))[0])
        raise ValueError(f"item {bad} has no available option")
    if not np.issubdtype(sizes.dtype, np.integer):
        if not np.all(np.equal(np.mod(sizes[avail], 1), 0)):
            raise ValueError("sizes must be integers (bits or bytes)")
    size = np.where(avail, sizes, 0).astype(np.int64)
    if np.any(size < 0):
        raise ValueError("sizes must be non-negative")
    shift = np.where(avail, costs, np.inf).min(axis=1)
    cost = np.where(avail, costs - shift[:, None], np.inf)
    finite = cost[avail]
    scale = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return _Normalised(cost / scale, size, avail, shift, scale)


def _check_capacity(norm: _Normalised, capacity: int) -> None:
    smallest = int(np.where(norm.avail, norm.size, np.iinfo(np.int64).max).min(axis=1).sum())
    if smallest > capacity:
        raise BudgetError(f"capacity {capacity} is below the smallest achievable total size {smallest}")


def _result(costs, sizes, choice, lower_bound, proven, solver, t0, core=0) -> MCKPResult:
    idx = np.arange(len(choice))
    c = np.asarray(costs, dtype=np.float64)
    objective = float(c[idx, choice].sum())
    size = int(np.asarray(sizes, dtype=np.int64)[idx, choice].sum())
    return MCKPResult(
        choice=np.asarray(choice, dtype=np.int64),
        objective=objective,
        size=size,
        lower_bound=_checked_bound(float(lower_bound), objective, c, solver),
        proven_optimal=bool(proven),
        solver=solver,
        seconds=time.perf_counter() - t0,
        core_items=core,
    )


def _checked_bound(lower: float, objective: float, costs: np.ndarray, solver: str) -> float:
    """The lower bound, which no feasible solution can beat: one above the objective of a feasible
    solution is wrong (a bug), not a rounding to hide. Only the rounding of summing and rescaling
    costs (relative 1e-9 of their magnitude) is clipped."""
    finite = np.abs(costs[np.isfinite(costs)])
    tol = 1e-9 * (float(finite.max(initial=0.0)) * costs.shape[0] + abs(objective)) + 1e-300
    if not lower <= objective + tol:  # also catches NaN
        raise InternalError(f"solver {solver}: lower bound {lower!r} exceeds the objective {objective!r} of a feasible "
                            f"solution by {lower - objective:.3g} (tolerance {tol:.3g}); the bound is invalid")
    return min(lower, objective)


def solve_mckp(
    costs: np.ndarray,
    sizes: np.ndarray,
    capacity: int,
    *,
    solver: str = DEFAULT_SOLVER,
    time_limit: float | None = None,
) -> MCKPResult:
    """Solve min sum cost s.t. sum size <= capacity, one option per item, to optimality.

    Raises AlphaQError if even the smallest option of every item exceeds `capacity`.
    """
    if solver not in SOLVERS:
        raise AlphaQError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    t0 = time.perf_counter()
    capacity = int(capacity)
    norm = _normalise(costs, sizes)
    _check_capacity(norm, capacity)
    if solver == "dp":
        choice, lb, proven, core = _solve_dp(norm, capacity, time_limit)
        lb = lb * norm.scale + float(norm.shift.sum())
        return _result(costs, sizes, choice, lb, proven, solver, t0, core)
    if solver == "highs":
        choice, lb, proven = _solve_milp_exact(norm, capacity, _highs, time_limit)
    else:
        choice, lb, proven = _solve_milp_exact(norm, capacity, _cbc, time_limit)
    lb = lb * norm.scale + float(norm.shift.sum())
    return _result(costs, sizes, choice, lb, proven, solver, t0)


# ----------------------------------------------------------------------------------------------
# LP relaxation (convex-hull greedy) and Lagrangian bound
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LP:
    lam: float  # critical slope (Lagrange multiplier of the capacity row); 0 if capacity is slack
    bound: float  # LP optimum = Lagrangian dual optimum (normalised units)
    choice: np.ndarray  # integer incumbent: greedy prefix of hull increments
    integral: bool  # the LP optimum is itself integral (no fractional item)


def _hull_increments(norm: _Normalised) -> tuple[np.ndarray, np.ndarray]:
    """Lower convex hull of each item's (size, cost) points, as increments.

    Returns (start, incs): start[i] is the smallest-size (then cheapest) option of item i; incs is a
    (k, 5) array of (item, from, to, d_size, efficiency) with efficiency = -d_cost / d_size > 0.
    """
    n, m = norm.cost.shape
    big = np.iinfo(np.int64).max
    size_masked = np.where(norm.avail, norm.size, big)
    # smallest size, ties broken by lowest cost, then lowest index
    order = np.lexsort((np.arange(m)[None, :].repeat(n, 0), norm.cost, size_masked), axis=1)
    start = order[:, 0]
    rows = np.arange(n)
    cur = start.copy()
    active = np.ones(n, dtype=bool)
    out = []
    for _ in range(m):
        cs = norm.size[rows, cur]
        cc = norm.cost[rows, cur]
        ds = norm.size - cs[:, None]
        dc = cc[:, None] - norm.cost  # cost decrease
        ok = norm.avail & (ds > 0) & (dc > 0) & active[:, None]
        eff = np.where(ok, dc / np.where(ok, ds, 1), -np.inf)
        best_eff = eff.max(axis=1)
        has = np.isfinite(best_eff)
        if not has.any():
            break
        # among options at the best efficiency (collinear) take the largest size
        tied = ok & (eff >= best_eff[:, None] * (1 - 1e-12))
        nxt = np.where(tied, norm.size, -1).argmax(axis=1)
        it = np.flatnonzero(has)
        out.append(
            np.column_stack(
                [it, cur[it], nxt[it], norm.size[it, nxt[it]] - cs[it], best_eff[it]]
            ).astype(np.float64)
        )
        cur = np.where(has, nxt, cur)
        active &= has
    incs = np.concatenate(out) if out else np.zeros((0, 5))
    return start, incs


def _lp_relaxation(norm: _Normalised, capacity: int) -> _LP:
    n, _ = norm.cost.shape
    rows = np.arange(n)
    start, incs = _hull_increments(norm)
    residual = capacity - int(norm.size[rows, start].sum())
    choice = start.copy()
    if len(incs) == 0:
        return _LP(0.0, float(norm.cost[rows, choice].sum()), choice, True)
    # greedy by efficiency; per item the efficiencies decrease along the hull, and the stable
    # sort keeps an item's increments in hull order when two are equally efficient
    order = np.lexsort((incs[:, 1], incs[:, 0], -incs[:, 4]))
    incs = incs[order]
    d_size = incs[:, 3].astype(np.int64)
    cum = np.cumsum(d_size)
    k = int(np.searchsorted(cum, residual, side="right"))  # increments [0, k) fit entirely
    taken = incs[:k]
    # applying a prefix in hull order leaves each item at the last 'to' it reached
    rev = taken[::-1]
    items, last = np.unique(rev[:, 0].astype(np.int64), return_index=True)
    choice[items] = rev[last, 2].astype(np.int64)
    base_cost = float(norm.cost[rows, choice].sum())
    if k == len(incs):
        return _LP(0.0, base_cost, choice, True)
    used = int(cum[k - 1]) if k > 0 else 0
    frac = (residual - used) / d_size[k]
    lam = float(incs[k, 4])
    bound = base_cost - frac * lam * d_size[k]
    return _LP(lam, bound, choice, frac == 0.0)


def _greedy_fill(norm: _Normalised, choice: np.ndarray, capacity: int, rounds: int = 64) -> np.ndarray:
    """Improve an incumbent: repeatedly take the single change with the largest cost decrease
    that still fits in the residual capacity."""
    n, _ = norm.cost.shape
    rows = np.arange(n)
    choice = choice.copy()
    for _ in range(rounds):
        residual = capacity - int(norm.size[rows, choice].sum())
        ds = norm.size - norm.size[rows, choice][:, None]
        gain = norm.cost[rows, choice][:, None] - norm.cost
        ok = norm.avail & (ds <= residual) & (gain > 0)
        if not ok.any():
            break
        gain = np.where(ok, gain, -np.inf)
        flat = int(np.argmax(gain))
        i, j = divmod(flat, gain.shape[1])
        choice[i] = j
    return choice


# ----------------------------------------------------------------------------------------------
# "dp": reduced-cost fixing + exact DP over the core
# ----------------------------------------------------------------------------------------------


class _CoreTooLarge(Exception):
    pass


def _solve_dp(norm: _Normalised, capacity: int, time_limit: float | None):
    n, m = norm.cost.shape
    rows = np.arange(n)
    lp = _lp_relaxation(norm, capacity)
    incumbent = _greedy_fill(norm, lp.choice, capacity)
    ub = float(norm.cost[rows, incumbent].sum())
    if lp.integral:  # the LP optimum has no fractional item: it is the integer optimum
        return lp.choice, lp.bound, True, 0

    lam = lp.lam
    # Lagrangian relaxation at the critical slope: L = sum_i min_j (c_ij + lam s_ij) - lam C.
    # For any feasible x: obj(x) = L + sum_i r_i(x_i) + lam (C - size(x)) >= L + sum_i r_i(x_i).
    pen = np.where(norm.avail, norm.cost + lam * norm.size, np.inf)
    base = np.argmin(pen, axis=1)
    pen_min = pen[rows, base]
    lagr = float(pen_min.sum() - lam * capacity)
    lower = max(lagr, lp.bound)  # equal in exact arithmetic (LP duality); both are valid bounds
    red = pen - pen_min[:, None]  # reduced costs r_ij >= 0, inf where unavailable
    tol = 1e-11 * (1.0 + abs(ub)) + 1e-12
    base_size = int(norm.size[rows, base].sum())
    cap_dev = capacity - base_size  # may be negative: the base (Lagrangian) choice can overfill

    # Expanding core (Pisinger): solve the DP over the few items with the cheapest deviations
    # first; its solution is a feasible incumbent that shrinks the gap, and with it the core of
    # the final, exact DP over every item that could still improve on the incumbent.
    core_len = 0
    for prefix in (256, None):
        gap = ub - lagr
        if gap <= tol:
            return incumbent, lower, True, core_len
        # any option with r_ij > gap cannot be in a solution better than the incumbent
        cand = (red <= gap + tol) & norm.avail
        cand[rows, base] = False
        core = np.flatnonzero(cand.any(axis=1))
        # cheapest deviations first: the pruning limit tightens early, and the DP stops as soon as
        # the next item's cheapest deviation exceeds it
        core = core[np.argsort(np.where(cand[core], red[core], np.inf).min(axis=1), kind="stable")]
        exact = prefix is None or len(core) <= prefix
        if not exact:
            core = core[:prefix]
        core_len = len(core)
        logger.debug("mckp dp: n=%d lambda=%.6g gap=%.3g core=%d exact=%s", n, lam, gap, core_len, exact)
        try:
            best = _core_dp(norm, red, base, core, cand, cap_dev, lam, gap, tol, time_limit)
        except _CoreTooLarge:
            if not exact:
                continue
            logger.warning("mckp: core of %d items too large for the DP; solving it with HiGHS", core_len)
            best = _core_milp(norm, base, core, cand, capacity, time_limit)
            if best is None:
                return incumbent, lower, False, core_len
        if best is not None:
            choice = base.copy()
            choice[core] = best
            if int(norm.size[rows, choice].sum()) > capacity:  # the DP checks this exactly
                raise InternalError("mckp dp produced an over-capacity solution")
            value = float(norm.cost[rows, choice].sum())
            if value < ub:
                incumbent, ub = choice, value
        if exact:
            # the DP saw every option that could beat the incumbent: the incumbent is optimal
            return incumbent, lower, True, core_len
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class _CoreBounds:
    """What the core DP knows before it starts, per core item (rows) and option (columns)."""

    base: np.ndarray  # the base option per item
    delta: np.ndarray  # (k, m) size change against the base
    rc: np.ndarray  # (k, m) reduced cost, 0 at the base, inf where not allowed
    min_dev: np.ndarray  # cheapest real deviation per item
    suffix: np.ndarray  # suffix[j]: largest total size decrease available from items j..k-1
    rate_up: np.ndarray  # cheapest reduced cost per unit of size increase over items j..k-1
    rate_down: np.ndarray  # the same per unit of decrease


def _core_bounds(norm, red, base, core, cand) -> _CoreBounds:
    k = len(core)
    kr = np.arange(k)
    base_c = base[core]
    allow = cand[core].copy()  # (k, m) deviations still allowed, plus the base option
    allow[kr, base_c] = True
    delta = norm.size[core] - norm.size[core, base_c][:, None]
    rc = np.where(allow, red[core], np.inf)
    rc[kr, base_c] = 0.0
    min_dev = np.where(cand[core], red[core], np.inf).min(axis=1)
    min_delta = np.where(allow, delta, 0).min(axis=1)
    suffix = np.concatenate([np.cumsum(min_delta[::-1])[::-1], [0]])
    # closing a size gap of z costs at least rate * z
    dev = cand[core]
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(dev & (delta > 0), red[core] / np.where(delta > 0, delta, 1), np.inf).min(axis=1)
        down = np.where(dev & (delta < 0), red[core] / np.where(delta < 0, -delta, 1), np.inf).min(axis=1)
    rate_up = np.concatenate([np.minimum.accumulate(up[::-1])[::-1], [np.inf]])
    rate_down = np.concatenate([np.minimum.accumulate(down[::-1])[::-1], [np.inf]])
    return _CoreBounds(base_c, delta, rc, min_dev, suffix, rate_up, rate_down)


def _completion_bound(b: _CoreBounds, nD, nR, nxt: int, cap_dev, lam) -> np.ndarray:
    """Lower bound on (objective - L) of any completion of states (nD, nR) after item nxt - 1.
    Under capacity with slack z: stay (lam * z) or deviate again (at least the next item's cheapest
    deviation, and at least min(rate_up, lam) * z to use or leave the slack). Over capacity by e:
    deviate down, at least max(next deviation, rate_down * e)."""
    next_dev = b.min_dev[nxt] if nxt < len(b.min_dev) else np.inf
    z = (cap_dev - nD).astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf * 0 in the branch np.where discards
        under = np.minimum(lam * z, np.maximum(next_dev, min(b.rate_up[nxt], lam) * z))
        over = np.maximum(next_dev, b.rate_down[nxt] * -z)
    return nR + np.where(z >= 0, under, over)


def _pareto(nD, nR, par, pick, lam, tol):
    """Drop states dominated by one with smaller-or-equal D and smaller-or-equal R - lam*D."""
    v = nR - lam * nD
    order = np.lexsort((v, nD))
    nD, nR, par, pick, v = nD[order], nR[order], par[order], pick[order], v[order]
    run = np.minimum.accumulate(v)
    keep = np.ones(len(v), dtype=bool)
    keep[1:] = v[1:] < run[:-1] - tol
    return nD[keep], nR[keep], par[keep], pick[keep]


def _core_dp(norm, red, base, core, cand, cap_dev, lam, gap, tol, time_limit):
    """Exact DP over core items with states (size deviation D, reduced cost R) from the base.

    A state is dominated by one with smaller-or-equal D and smaller-or-equal R - lam*D (both are
    additive, so dominance survives any completion); states with R above the gap are pruned, as
    are states that cannot get back under capacity with the remaining items' largest decreases.
    Returns the option index per core item of the best solution strictly better than the
    incumbent (objective L + gap), or None if there is none.
    """
    t0 = time.perf_counter()
    b = _core_bounds(norm, red, base, core, cand)
    D = np.zeros(1, dtype=np.int64)
    R = np.zeros(1, dtype=np.float64)
    parents: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    limit = gap  # prune states whose R cannot beat the best known objective (L + limit)
    best_final: tuple[float, int, int] | None = None  # (value, layer, state) for early completions

    for layer in range(len(core)):
        if b.min_dev[layer] > limit + tol:
            break  # items are sorted by cheapest deviation: no later item can deviate either
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            raise _CoreTooLarge
        js = np.flatnonzero(b.rc[layer] <= limit + tol)  # includes the base (r = 0)
        if len(D) * len(js) > _DP_MAX_PAIRS:
            raise _CoreTooLarge
        nD = (D[:, None] + b.delta[layer, js][None, :]).ravel()
        nR = (R[:, None] + b.rc[layer, js][None, :]).ravel()
        par = np.repeat(np.arange(len(D)), len(js))
        pick = np.tile(js, len(D))
        bound = _completion_bound(b, nD, nR, layer + 1, cap_dev, lam)
        keep = (bound < limit - tol) & (nD + b.suffix[layer + 1] <= cap_dev)
        if not keep.any():
            break
        D, R, par, pick = _pareto(nD[keep], nR[keep], par[keep], pick[keep], lam, tol)
        parents.append(par)
        picks.append(pick)
        # tighten the limit with states that are already feasible when the remaining core items
        # stay at their base option: objective - L = R + lam * (slack left)
        feas = D <= cap_dev
        if feas.any():
            vals = R[feas] + lam * (cap_dev - D[feas])
            j = int(np.argmin(vals))
            if vals[j] < limit - tol:
                limit = float(vals[j])
                best_final = (limit, layer, int(np.flatnonzero(feas)[j]))
    if best_final is None:
        return None
    _, layer, state = best_final
    chosen = b.base.copy()  # base for core items after `layer`
    for li in range(layer, -1, -1):
        chosen[li] = picks[li][state]
        state = int(parents[li][state])
    return chosen


def _core_milp(norm, base, core, cand, capacity, time_limit):
    """Fallback for a huge core: the reduced problem (non-core items fixed at base) with HiGHS."""
    rows = np.arange(norm.cost.shape[0])
    fixed = np.ones(len(rows), dtype=bool)
    fixed[core] = False
    cap = capacity - int(norm.size[rows[fixed], base[fixed]].sum())
    allow = cand[core].copy()
    allow[np.arange(len(core)), base[core]] = True
    sub = _Normalised(
        cost=np.where(allow, norm.cost[core], np.inf),
        size=np.where(allow, norm.size[core], 0),
        avail=allow,
        shift=np.zeros(len(core)),
        scale=1.0,
    )
    choice, _, proven = _solve_milp_exact(sub, cap, _highs, time_limit)
    return choice if proven else None


# ----------------------------------------------------------------------------------------------
# MILP back-ends (HiGHS, CBC)
# ----------------------------------------------------------------------------------------------


def _solve_milp_exact(norm: _Normalised, capacity: int, backend, time_limit):
    """Run a MILP back-end; if its float tolerance let the integer size exceed the capacity,
    tighten the capacity by the excess and solve again."""
    rows = np.arange(norm.cost.shape[0])
    cap = capacity
    lp = _lp_relaxation(norm, capacity)
    for _ in range(5):
        choice, proven = backend(norm, cap, time_limit)
        over = int(norm.size[rows, choice].sum()) - capacity
        if over <= 0:
            return choice, lp.bound, proven
        cap -= over
        logger.debug("MILP solution over capacity by %d (tolerance); re-solving", over)
    raise InternalError("MILP solver kept exceeding the capacity")


def _flat_problem(norm: _Normalised):
    n, m = norm.cost.shape
    item, opt = np.nonzero(norm.avail)
    smax = float(norm.size.max()) or 1.0
    return n, item, opt, norm.cost[item, opt], norm.size[item, opt] / smax, smax


def _highs(norm: _Normalised, capacity: int, time_limit):
    import scipy.sparse as sp
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, item, opt, c, s, smax = _flat_problem(norm)
    nv = len(item)
    a_eq = sp.csr_matrix((np.ones(nv), (item, np.arange(nv))), shape=(n, nv))
    a = sp.vstack([a_eq, sp.csr_matrix(s.reshape(1, -1))]).tocsr()
    lo = np.concatenate([np.ones(n), [-np.inf]])
    hi = np.concatenate([np.ones(n), [capacity / smax]])
    options = {"mip_rel_gap": 0.0, "disp": False}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    res = milp(c, constraints=LinearConstraint(a, lo, hi), integrality=np.ones(nv), bounds=Bounds(0, 1), options=options)
    if res.x is None:
        raise AlphaQError(f"HiGHS found no solution: {res.message}")
    x = res.x > 0.5
    choice = np.zeros(n, dtype=np.int64)
    choice[item[x]] = opt[x]
    if np.bincount(item[x], minlength=n).min() != 1:
        raise InternalError("HiGHS returned a solution without exactly one option per item")
    return choice, res.status == 0


def _cbc(norm: _Normalised, capacity: int, time_limit):
    import warnings

    import pulp

    n, item, opt, c, s, smax = _flat_problem(norm)
    prob = pulp.LpProblem("alphaq_mckp", pulp.LpMinimize)
    if hasattr(prob, "add_variable"):  # PuLP >= 3.3
        xs = [prob.add_variable(f"x{v}", 0, 1, cat=pulp.LpBinary) for v in range(len(item))]
    else:
        xs = [pulp.LpVariable(f"x{v}", 0, 1, cat=pulp.LpBinary) for v in range(len(item))]
    prob += pulp.LpAffineExpression(list(zip(xs, c.tolist())))
    by_item: list[list[int]] = [[] for _ in range(n)]
    for v, i in enumerate(item.tolist()):
        by_item[i].append(v)
    for i, vs in enumerate(by_item):
        prob += pulp.LpAffineExpression([(xs[v], 1.0) for v in vs]) == 1, f"one_{i}"
    prob += pulp.LpAffineExpression(list(zip(xs, s.tolist()))) <= capacity / smax, "capacity"
    with warnings.catch_warnings():
        # PuLP 3.3 deprecates its bundled CBC (for PuLP 4.0); it is the CBC this package ships
        warnings.simplefilter("ignore", DeprecationWarning)
        cmd = pulp.PULP_CBC_CMD(msg=False, gapRel=0.0, timeLimit=time_limit)
        status = prob.solve(cmd)
    feasible = (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    if prob.sol_status not in feasible:
        raise AlphaQError(f"CBC did not solve the allocation: status {pulp.LpStatus[status]}")
    vals = np.array([v.varValue or 0.0 for v in xs])
    x = vals > 0.5
    choice = np.zeros(n, dtype=np.int64)
    choice[item[x]] = opt[x]
    if np.bincount(item[x], minlength=n).min() != 1:
        raise InternalError("CBC returned a solution without exactly one option per item")
    return choice, prob.sol_status == pulp.LpSolutionOptimal  # not proven when stopped by the time limit
