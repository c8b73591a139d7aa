#!/usr/bin/env python3
"""How much the default's files depend on the self-text sample: the same model and sizes, the self
text drawn with several seeds.

    python scripts/bench_seeds.py [--models deepseek2 mixtral] [--mixes IQ4_XS Q3_K_M Q6_K] [--seeds 0 1 2 3]

Per model (a fixture, with bench_selfcal's work folder, stock files and held-out scoring) and seed:
the self text (SelfTextConfig(seed=S), cached), its importance matrix and damage table, then at each
mix's size (the stock+real file of bench_selfcal, which must exist) the default's plan (auto cap) and
the uncapped plan, quantised and scored on the held-out test split like bench_selfcal's cells
(mean KL per token over prose and code). Results: bench/selfcal-seeds.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_selfcal  # noqa: E402  (the work folders, stock files and scoring)
from alphaq.allocate.plan import MODES, PlanConfig, make_plan  # noqa: E402
from alphaq.allocate.quantise_cap import auto_capped_plan  # noqa: E402
from alphaq.damage import DamageConfig, Reference  # noqa: E402
from alphaq.damage.measure import measure  # noqa: E402
from alphaq.gguf.qtypes import resolve_types  # noqa: E402
from alphaq.gguf.quantize import quantize_gguf  # noqa: E402


def calibrate(m: bench_selfcal.Model, seed: int, n_seq: int = 16, windows: int | None = None):
    """(importance means, damage costs) of ``n_seq`` sequences of self text drawn with ``seed``, the
    damage measured on the first ``windows`` of them (None: as many as the product takes)."""
    from alphaq.importance.collect import collect_imatrix
    from alphaq.runtime.forward import Session
    from alphaq.selftext import SelfTextConfig, cached_sample

    tokens = cached_sample(m.bf16, SelfTextConfig(seed=seed, n_seq=n_seq))
    cfg = DamageConfig(n_windows=windows)
    with Session(m.bf16, m.n_ctx) as s:
        im = collect_imatrix(s, tokens)
        damage = measure(s, Reference(s, tokens[: cfg.windows(m.names)]), m.names,
                         resolve_types(MODES["damage"]["types"]), cfg, imatrix=im.means(), tokens=im.counts).costs
    return im.means(), damage


def cell(m: bench_selfcal.Model, mix: str, seed: int, means, damage) -> dict:
    size = (m.work / f"stock-{mix}+real.gguf").stat().st_size
    cfg = PlanConfig(**MODES["damage"], budget_mode="size", budget=float(size))

    def solve(c: PlanConfig):
        return make_plan([], m.fm.tensors, c, fixed_bytes=m.fm.header, damage=damage)

    out = {}
    for variant, plan in (("default", auto_capped_plan(solve, cfg, m.bf16, like=mix)[0]), ("uncapped", solve(cfg))):
        path = m.work / f"seed{seed}-{variant}@{mix}.gguf"
        quantize_gguf(m.bf16, path, plan.tensor_types(), imatrix=means)
        out[variant] = m.score(path)
        path.unlink()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["deepseek2", "mixtral"])
    p.add_argument("--mixes", nargs="+", default=["IQ4_XS", "Q3_K_M", "Q6_K"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--n-seq", type=int, default=16, help="self-text sequences (the product's default: 16)")
    p.add_argument("--windows", type=int, default=None,
                   help="windows the damage is measured on (default: as the product picks them)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "selfcal-seeds.json")
    args = p.parse_args()
    results = {}
    for name in args.models:
        m = bench_selfcal.Model(name, ROOT / ".cache" / "bench-selfcal" / name, 256, 24, ())
        res = results[name] = {"n_seq": args.n_seq, "windows": args.windows, "stock": {}, "seeds": {}}
        for mix in args.mixes:
            res["stock"][mix] = {v: m.score(f) for v in ("stock", "stock+real")
                                 if (f := m.work / f"stock-{mix}{'+real' if v == 'stock+real' else ''}.gguf").exists()}
        for seed in args.seeds:
            means, damage = calibrate(m, seed, args.n_seq, args.windows)
            res["seeds"][str(seed)] = {mix: cell(m, mix, seed, means, damage) for mix in args.mixes}
            for mix, c in res["seeds"][str(seed)].items():
                kl = {v: np.mean([np.mean(c[v][d]) for d in ("prose", "code")]) for v in c}
                print(f"{name} seed {seed} {mix}: " + ", ".join(f"{v} {x:.5f}" for v, x in kl.items()), flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
