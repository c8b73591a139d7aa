#!/usr/bin/env python3
"""Benchmark the exact MCKP solvers of alphaq.allocate.solver (not a test; figures go to docs/ALLOCATION.md).

Instances follow the paper's Eq. 4-5: item i is a matrix with N_i parameters (a few MoE shapes),
option b in {1, 2, 3, 4, 5} nominal bits costs eta = w_i * Var_i * 2^(-2b) with log-normal
importance and variance, and weighs N_i * b; the capacity is budget * sum N_i. A "uniform" family
(random costs and sizes, no structure) is the harder case for the LP-based core.

    python scripts/bench_solver.py                       # dp on 20,000 x 5, several budgets
    python scripts/bench_solver.py --solvers dp,cbc,highs --items 2000 --time-limit 120
    python scripts/bench_solver.py --plan                # whole make_plan on a 20,000-slice MoE
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from alphaq.allocate.solver import solve_mckp


def paper_instance(rng: np.random.Generator, n: int, m: int):
    bits = np.arange(1, m + 1)
    # expert shapes of Qwen1.5-MoE / DeepSeek-V2-Lite (2048 x 1408), OLMoE (2048 x 1024), Mixtral (4096 x 14336)
    params = rng.choice([2048 * 1408, 2048 * 1024, 4096 * 14336], size=n)
    w = np.exp(rng.normal(0.0, 0.5, n)) * np.exp(rng.normal(-9.0, 0.5, n))
    return w[:, None] * np.exp2(-2.0 * bits)[None, :], params[:, None] * bits[None, :], params.sum()


def uniform_instance(rng: np.random.Generator, n: int, m: int):
    sizes = np.sort(rng.integers(1_000, 1_000_000, size=(n, m)), axis=1)
    costs = -np.sort(-rng.random((n, m)), axis=1)
    return costs, sizes, sizes.mean(axis=1).sum() / 3.0  # "budget" 3 ~ the middle


def bench_solvers(args) -> None:
    print(f"# {args.items} items x {args.types} types; {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}; best of {args.repeat}")
    print("| family | budget | solver | seconds | objective | rel. gap to LP bound | core items | proven |")
    print("|---|---|---|---|---|---|---|---|")
    for family in args.families.split(","):
        for budget in [float(b) for b in args.budgets.split(",")]:
            rng = np.random.default_rng(args.seed)
            make = paper_instance if family == "paper" else uniform_instance
            costs, sizes, unit = make(rng, args.items, args.types)
            cap = int(budget * unit)
            ref = None
            for name in args.solvers.split(","):
                times = []
                for _ in range(args.repeat if name == "dp" else 1):
                    t0 = time.perf_counter()
                    res = solve_mckp(costs, sizes, cap, solver=name, time_limit=args.time_limit)
                    times.append(time.perf_counter() - t0)
                if ref is None:
                    ref = res.objective
                elif abs(res.objective - ref) > 1e-9 * abs(ref):
                    print(f"  !! {name} objective {res.objective!r} differs from {ref!r}")
                print(f"| {family} | {budget} | {name} | {min(times):.3f} | {res.objective:.6e} | "
                      f"{res.gap / res.objective:.2e} | {res.core_items} | {res.proven_optimal} |")


def bench_plan(args) -> None:
    from alphaq.allocate.plan import PlanConfig, TensorInfo, make_plan
    from alphaq.records import MatrixStats

    rng = np.random.default_rng(args.seed)
    n_blocks, n_expert, embd, ff = 48, 139, 2048, 768  # 48 x 139 x 3 = 20,016 slices
    tensors, stats = [], []
    for b in range(n_blocks):
        for kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            rows, cols = (embd, ff) if kind == "ffn_down_exps" else (ff, embd)
            name = f"blk.{b}.{kind}.weight"
            tensors.append(TensorInfo(name, (n_expert, rows, cols), "BF16"))
            for e in range(n_expert):
                stats.append(MatrixStats(name, b, e, kind, rows, cols, rows * cols,
                                         float(rng.uniform(2, 6)), float(rng.uniform(1e-4, 1e-3)), 10, 100))
    types = ("IQ1_S", "Q2_K", "Q3_K", "Q4_K", "Q5_K")
    for budget in [float(b) for b in args.budgets.split(",")]:
        cfg = PlanConfig(budget=budget, types=types, granularity="expert")
        t0 = time.perf_counter()
        plan = make_plan(stats, tensors, cfg, fixed_bytes=0)
        dt = time.perf_counter() - t0
        print(f"make_plan, {len(plan.items)} expert slices x {len(types)} types, budget {budget}: {dt:.2f} s "
              f"(nominal {plan.totals.nominal_bits:.4f}, proven {plan.totals.proven_optimal})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--types", type=int, default=5)
    p.add_argument("--budgets", default="1.5,2.5,3.0,3.5,4.5")
    p.add_argument("--families", default="paper,uniform")
    p.add_argument("--solvers", default="dp")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=None, help="seconds, for highs / cbc")
    p.add_argument("--plan", action="store_true", help="time make_plan end to end instead")
    args = p.parse_args()
    if args.plan:
        bench_plan(args)
    else:
        bench_solvers(args)


if __name__ == "__main__":
    main()
