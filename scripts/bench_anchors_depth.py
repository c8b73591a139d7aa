#!/usr/bin/env python3
"""Depth anchors checked on a model deeper than 4 blocks: is the damage rate smooth over depth?

    python scripts/bench_anchors_depth.py MODEL_DIR [--anchors 4] [--mixes IQ2_XXS Q2_K Q3_K_M Q4_K_M Q6_K]

MODEL_DIR: a trained HF MoE checkpoint (e.g. scripts/train_tiny_moe.py --zoo bench --only mixtral-bench,
8 blocks). The damage stage (alphaq.damage.measure) runs once with every block measured (the model's
own text, 16 windows, the estimate at Q4_K). From that one table:

* **rates**: each tensor's damage per unit of importance-weighted error. The depth anchors
  (alphaq.damage.anchors) measure only ``--anchors`` blocks per tensor kind and interpolate this
  rate linearly over depth; here the interpolated rate of every other block is set against its
  measured one (ratio per tensor, and Spearman of the resulting damage over those tensors);
* **plans**: at each llama.cpp mix's size (the mix with the self importance matrix, llama.cpp's
  quantiser), a plan from the full table and a plan from the anchored table (the non-anchor tensors'
  costs interpolated, as the product does). Each plan's cost under the full table, and the files'
  mean KL to the BF16 model on the held-out test split (tests/fixtures/heldout, 24 windows per
  domain, the second half of each 256-token window scored), with the paired standard error.

"all-blocks" and "anchored" both use 16 windows, so their comparison isolates the interpolation;
"default" is the product's own table at this depth (DamageConfig(): the anchors measured on 4
windows), measured separately.
Results: bench/anchors-depth.json. Work files: .cache/bench-anchors/NAME/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOMAINS = ("prose", "code")


def measure_all(bf16: Path, names: list[str]):
    """Self text, importance, the damage table with every block measured (16 windows), and the
    product's own table at this depth (DamageConfig(): anchors, and the windows it picks)."""
    from alphaq.damage import DamageConfig, Reference
    from alphaq.damage.measure import measure
    from alphaq.runtime.forward import Session
    from alphaq.importance.collect import collect_imatrix
    from alphaq.allocate.plan import MODES
    from alphaq.gguf.qtypes import resolve_types
    from alphaq.selftext import SelfTextConfig, cached_sample

    tokens = cached_sample(bf16, SelfTextConfig())
    with Session(bf16, tokens.shape[1]) as s:
        im = collect_imatrix(s, tokens)
        t = time.perf_counter()
        table = measure(s, Reference(s, tokens[:16]), names, resolve_types(MODES["damage"]["types"]),
                        DamageConfig(anchors=None, n_windows=16), imatrix=im.means(), tokens=im.counts,
                        progress=True)
        seconds = {"all_blocks": time.perf_counter() - t}
        cfg = DamageConfig()
        t = time.perf_counter()
        product = measure(s, Reference(s, tokens[:cfg.windows(names)]), names,
                          resolve_types(MODES["damage"]["types"]), cfg, imatrix=im.means(), tokens=im.counts)
        seconds["default"] = time.perf_counter() - t
        seconds["default_windows"] = cfg.windows(names)
    return im, table, product, seconds


def anchored_costs(table, names: list[str], n_anchors: int) -> tuple[dict, list[dict]]:
    """The table's costs with every non-anchor tensor's costs interpolated from its kind's anchors,
    and per non-anchor tensor its measured and interpolated rate."""
    from alphaq.damage.anchors import depth_anchors

    anchors = depth_anchors(names, n_anchors)
    rate = {}  # the measured KL (at the reference type, after llama.cpp's fallback) per unit of error
    for n in names:
        (ref_type, kl), = table.measured[n].items()
        if table.weighted_error[(n, None)].get(ref_type, 0.0) > 0:
            rate[n] = kl / table.weighted_error[(n, None)][ref_type]
    # per tensor and type: damage / weighted error (the estimate scales one KL, so one rate per tensor)
    per_error = {n: {t: d / e if (e := table.weighted_error[(n, None)][t]) > 0 else 0.0
                     for t, d in table.costs[(n, None)].items()} for n in names}
    costs, rows = dict(table.costs), []
    for n in names:
        if n in anchors.measured:
            continue
        costs[(n, None)] = anchors.damage(n, per_error, table.weighted_error[(n, None)])
        got = anchors.interpolate(n, {a: rate[a] for a in anchors.of(n)})
        rows.append({"tensor": n, "measured_rate": rate.get(n), "interpolated_rate": got,
                     "ratio": got / rate[n] if rate.get(n) else None, "anchors": anchors.of(n)})
    return costs, rows


def rate_summary(rows: list[dict], table) -> dict:
    from scipy.stats import spearmanr

    ratios = np.array([r["ratio"] for r in rows if r["ratio"]])
    measured, interpolated = [], []
    for r in rows:
        (ref_type, kl), = table.measured[r["tensor"]].items()
        measured.append(kl)
        interpolated.append(r["interpolated_rate"] * table.weighted_error[(r["tensor"], None)].get(ref_type, 0.0))
    return {"tensors": len(rows), "median_ratio": float(np.median(ratios)),
            "median_abs_log2_ratio": float(np.median(np.abs(np.log2(ratios)))),
            "within_25pct": int(np.sum((ratios > 0.8) & (ratios < 1.25))), "min_ratio": float(ratios.min()),
            "max_ratio": float(ratios.max()), "spearman_damage": float(spearmanr(measured, interpolated)[0])}


def score(path: Path, refs: dict, n_ctx: int) -> dict:
    from alphaq.evaluate.perplexity import load_llama, window_logprobs

    llm = load_llama(path, n_ctx)
    pos = np.arange(n_ctx // 2 - 1, n_ctx - 1)
    out = {"bytes": path.stat().st_size}
    for d, run in refs.items():
        out[d] = [float((np.exp(lq) * (lq - window_logprobs(llm, list(chunk))[pos])).sum(axis=1).mean())
                  for chunk, lq in zip(run.chunks, run.logprobs)]
    return out


def plans(fm, bf16: Path, work: Path, im, full: dict, variants: dict, mixes: list[str], n_ctx: int) -> dict:
    """Per mix: stock+self and a plan from each table of ``variants`` (label -> costs), with the
    plan's cost under the full table and the file's KL."""
    from alphaq.evaluate import baselines
    from alphaq.evaluate.perplexity import load_llama, reference_run
    from alphaq.allocate.plan import MODES, PlanConfig, make_plan
    from alphaq.gguf.quantize import quantize_gguf

    ref = load_llama(bf16, n_ctx)
    refs = {d: reference_run(ref, (ROOT / "tests/fixtures/heldout" / f"{d}.txt").read_text(errors="replace"),
                             name=d, n_ctx=n_ctx, max_windows=24) for d in DOMAINS}
    del ref
    out = {}
    for mix in mixes:
        stock = work / f"stock+self@{mix}.gguf"
        if not stock.exists():
            baselines.stock(fm, stock, mix, imatrix=im.means())
        cell = {"stock+self": score(stock, refs, n_ctx)}
        cfg = replace(PlanConfig(**MODES["damage"]), budget_mode="size", budget=float(stock.stat().st_size))
        for label, costs in variants.items():
            plan = make_plan([], fm.tensors, cfg, fixed_bytes=fm.header, damage=costs)
            types = plan.tensor_types()
            path = work / f"{label}@{mix}.gguf"
            quantize_gguf(bf16, path, types, imatrix=im.means())
            cell[label] = score(path, refs, n_ctx)
            cell[label]["full_table_cost"] = float(sum(full[(n, None)][t.name] for n, t in types.items()
                                                       if (n, None) in full))
        out[mix] = cell
        print(mix, {k: round(float(np.mean([np.mean(v[d]) for d in DOMAINS])), 5) for k, v in cell.items()}, flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--anchors", type=int, default=4)
    p.add_argument("--mixes", nargs="+", default=["IQ2_XXS", "Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K"])
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "anchors-depth.json")
    args = p.parse_args()
    from alphaq.evaluate import baselines
    from alphaq.gguf.qtypes import llama_quantizes
    from convert.hf_to_gguf import convert_hf

    work = ROOT / ".cache" / "bench-anchors" / args.model.name
    work.mkdir(parents=True, exist_ok=True)
    bf16 = work / "bf16.gguf"
    if not bf16.exists():
        convert_hf(args.model, bf16)
    fm = baselines.FloatModel.open(bf16)
    names = [t.name for t in fm.tensors if llama_quantizes(t.name, t.shape)]
    im, table, product, seconds = measure_all(bf16, names)
    anchored, rows = anchored_costs(table, names, args.anchors)
    summary = rate_summary(rows, table)
    print(json.dumps(summary, indent=1), flush=True)
    cells = plans(fm, bf16, work, im, table.costs,
                  {"all-blocks": table.costs, "anchored": anchored, "default": product.costs}, args.mixes, 256)
    args.json.write_text(json.dumps({"model": str(args.model), "anchors": args.anchors, "measure_seconds": seconds,
                                     "rates": summary, "tensors": rows, "cells": cells}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
