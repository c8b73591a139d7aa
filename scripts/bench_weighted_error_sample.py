#!/usr/bin/env python3
"""The damage stage's weighted errors on a smaller sample: time and the error ratios, side by side.

    python scripts/bench_weighted_error_sample.py MODEL-BF16.gguf [--caps 1048576 524288] [--repeats 2]

For a merged expert tensor (up, down), an attention tensor and the output head of a float GGUF (a
real-shape random model, scripts/make_large_random_moe.py, converted to BF16), it computes the
importance-weighted errors of every candidate type (alphaq.damage.measure.weighted_errors, a seeded
random importance vector) under each cap on sampled weights (DamageConfig.max_sampled_weights),
alternating the caps, and prints the seconds and how far each type's error ratio to Q4_K moves
between the first and the last cap. Random weights: the times are real, the ratios only show the
sampling noise of weights without structure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alphaq.damage import DamageConfig, matrices  # noqa: E402
from alphaq.damage.measure import sample_size, sampled_experts, split_means, weighted_errors  # noqa: E402
from alphaq.gguf.qtypes import effective_type, resolve_type  # noqa: E402
from alphaq.runtime.forward import Session  # noqa: E402

LADDER = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "Q2_K", "Q3_K", "IQ4_XS", "Q4_K",
          "Q5_K", "Q6_K", "Q8_0")
TENSORS = ("blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight", "blk.0.attn_q.weight", "output.weight")


def one_tensor(s: Session, name: str, caps: list[int], repeats: int) -> str:
    buf = s.weights[name]
    types = list(dict.fromkeys(effective_type(resolve_type(t), buf.shape[-1]) for t in LADDER))
    means = split_means(np.random.default_rng(0).uniform(0.5, 2, matrices(buf) * buf.shape[-1]), buf)
    weighted_errors(buf, types, means, None, 16, sampled_experts(matrices(buf), 16))  # warm-up (quantiser grids)
    cells, totals = [], {}
    for cap in caps * repeats:
        cfg = DamageConfig(max_sampled_weights=cap)
        experts = sampled_experts(matrices(buf), cfg.max_experts)
        rows = sample_size(buf, experts, cfg)
        t0 = time.perf_counter()
        errs = weighted_errors(buf, types, means, None, rows, experts)
        cells.append(f"{cap >> 10}K ({rows} rows) {time.perf_counter() - t0:.2f} s")
        totals[cap] = {t.name: sum(e[t.name] for e in errs.values()) for t in types}
    a, b = totals[caps[0]], totals[caps[-1]]
    moved = [(b[t] / b["Q4_K"]) / (a[t] / a["Q4_K"]) for t in a]
    return f"| {name} | {' / '.join(cells)} | {min(moved):.3f}–{max(moved):.3f} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--caps", type=int, nargs="+", default=[1 << 20, 1 << 19])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    print("| tensor | cap (rows per sampled matrix) seconds, alternating | ratio to Q4_K, last cap / first |")
    print("|---|---|---|")
    with Session(args.model, 256) as s:
        for name in TENSORS:
            print(one_tensor(s, name, args.caps, args.repeats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
