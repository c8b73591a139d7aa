#!/usr/bin/env python3
"""How well alpha from a sample of each merged tensor's experts (--alpha-experts N) stands for all of them.

    python scripts/bench_alpha_sample.py MODEL.gguf [...] --experts 4 8 16 --json out.json

For each float GGUF, every matrix is analysed once (alphaq.spectral.analyze; a sample's
statistics are exactly those of its experts, tests/test_alpha_sample.py), then for each sample size
N the fast mode's plan is made from the evenly spaced N experts of every merged tensor and compared
with the plan from all of them, at the given budgets (nominal bits over the expert weights):

  * cost error: each expert tensor's cost under the sample (its slices' sum x n_experts / N) over
    its cost under every expert, divided by the median of that ratio over the tensors (alpha_tilde,
    a global scale, moves with the sample and changes no choice); reported as the median and the
    largest |ratio - 1|;
  * plan agreement: the share of expert tensors given the same type;
  * objective: the sampled plan's types priced with the full costs over the full plan's objective
    (>= 1; 1 when the choice is the same or as good).

A model with at most N experts per tensor is analysed whole either way (no row for it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alphaq.allocate.plan import MODES, PlanConfig, gguf_model_infos, make_plan  # noqa: E402
from alphaq.model.weights import sampled_experts  # noqa: E402
from alphaq.spectral.analyze import analyze_model  # noqa: E402


def sample(stats, n_experts: dict[str, int], k: int):
    keep = {t: set(sampled_experts(n, k) or range(n)) for t, n in n_experts.items()}
    return [s for s in stats if s.expert is None or s.expert in keep[s.tensor]]


def compare(full_plan, sampled_plan) -> dict:
    ratios = []
    for a, b in zip(sampled_plan.items, full_plan.items):
        t = next(iter(b.costs))
        ratios.append(a.costs[t] / b.costs[t])
    mid = statistics.median(ratios)
    errors = [abs(r / mid - 1) for r in ratios]
    same = sum(a.type == b.type for a, b in zip(sampled_plan.items, full_plan.items))
    # the full plan's cost of the sampled plan's written type, through a candidate written as it
    # (a candidate's cost is that of its written type, so any such candidate gives the same number)
    priced = sum(b.costs[next(c for c, w in b.written.items() if w == a.type.name)]
                 for a, b in zip(sampled_plan.items, full_plan.items))
    return {"items": len(ratios), "cost_error_median": statistics.median(errors), "cost_error_max": max(errors),
            "same_type": same / len(ratios), "objective_ratio": priced / full_plan.totals.objective}


def run(path: Path, ks: list[int], budgets: list[float]) -> dict:
    stats = analyze_model(path, progress=True)
    tensors, header = gguf_model_infos(path, 32)
    n_experts = {t.name: int(t.shape[0]) for t in tensors if len(t.shape) == 3 and "_exps" in t.name}
    out = {"model": str(path), "experts": sorted(set(n_experts.values())), "rows": []}
    for budget in budgets:
        cfg = dataclasses.replace(PlanConfig(**MODES["fast"]), budget=budget)
        full = make_plan(stats, tensors, cfg, fixed_bytes=header)
        for k in ks:
            if all(n <= k for n in n_experts.values()):
                continue
            row = {"k": k, "budget": budget, **compare(full, make_plan(sample(stats, n_experts, k), tensors, cfg,
                                                                        fixed_bytes=header))}
            out["rows"].append(row)
            print(json.dumps({"model": f"{path.parent.name}/{path.name}", **row}), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="float GGUF files")
    p.add_argument("--experts", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--budgets", nargs="+", type=float, default=[2.0, 2.5, 3.0, 3.5])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    results = [run(m, args.experts, args.budgets) for m in args.models]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
