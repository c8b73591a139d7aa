#!/usr/bin/env python3
"""bench/SELFCAL.md from bench/selfcal.json (scripts/bench_selfcal.py): the grid, wins and losses.

    python scripts/report_selfcal.py [--json bench/selfcal.json] [--out bench/SELFCAL.md]

A cell's baseline is the better (lower mean KL) of stock and stock+real-text importance. A
difference counts as a win or a loss only when it is at least 2 paired standard errors (the same
evaluation windows, prose and code); otherwise it is a tie.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("prose", "code")
GRID = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K", "IQ3_XXS", "IQ3_S", "IQ3_M", "Q3_K_S",
        "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
SHOWN = ("stock", "stock+real", "stock+self", "default", "real-driven", "direct", "fast", "paper")


def windows(cell: dict, domains=DOMAINS) -> np.ndarray:
    return np.concatenate([np.asarray(cell[d]) for d in domains])


def mean(cell: dict | None, domains=DOMAINS) -> float:
    return float("nan") if cell is None else float(np.mean([np.mean(cell[d]) for d in domains]))


def paired(a: dict, b: dict, domains=DOMAINS) -> tuple[float, float]:
    """(mean of a - b, its standard error) over the shared windows."""
    d = windows(a, domains) - windows(b, domains)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def verdict(cell: dict, variant: str = "default") -> tuple[str, str, float, float, float]:
    """(verdict, baseline name, ratio, diff, se) of ``variant`` against the better stock file."""
    base = min((b for b in ("stock", "stock+real") if cell.get(b)), key=lambda b: mean(cell[b]))
    if not cell.get(variant):
        return "no file", base, float("nan"), float("nan"), float("nan")
    diff, se = paired(cell[variant], cell[base])
    v = "win" if diff < -2 * se else "loss" if diff > 2 * se else "tie"
    return v, base, mean(cell[variant]) / mean(cell[base]), diff, se


def model_table(name: str, res: dict) -> list[str]:
    cols = [v for v in SHOWN if any(c.get(v) for c in res["cells"].values())]
    lines = [f"### {name}", "",
             "Mean KL to BF16 (nats/token, prose and code); default vs the better stock file: ratio, "
             "paired difference ± SE, verdict at 2 SE.", "",
             "| mix | " + " | ".join(cols) + " | default / best stock | diff ± SE | verdict |",
             "|---|" + "---|" * (len(cols) + 3)]
    for mix, cell in sorted(res["cells"].items(), key=lambda kv: GRID.index(kv[0]) if kv[0] in GRID else 99):
        v, base, ratio, diff, se = verdict(cell)
        vals = " | ".join("—" if not cell.get(c) else f"{mean(cell[c]):.5f}" for c in cols)
        lines.append(f"| {mix} | {vals} | {ratio:.2f} (vs {base}) | {diff:+.5f} ± {se:.5f} | {v} |")
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(res.get("seconds", {}).items()))
    return lines + ["", f"Stage times on this model (2-core CPU, shared): {secs}.", ""]


def summary(results: dict, variants=("default", "real-driven", "direct", "fast", "paper", "stock+self")) -> list[str]:
    lines = ["| variant | wins | ties | losses | no file | median ratio to best stock |", "|---|---|---|---|---|---|"]
    for variant in variants:
        counts = {"win": 0, "tie": 0, "loss": 0, "no file": 0}
        ratios = []
        for res in results.values():
            for cell in res["cells"].values():
                if variant not in cell:
                    continue
                v, _, ratio, _, _ = verdict(cell, variant)
                counts[v] += 1
                if np.isfinite(ratio):
                    ratios.append(ratio)
        if sum(counts.values()):
            lines.append(f"| {variant} | {counts['win']} | {counts['tie']} | {counts['loss']} | {counts['no file']} | "
                         f"{np.median(ratios):.2f} |")
    return lines


def head_to_head(results: dict, a: str, b: str, domains=DOMAINS) -> str:
    """'a vs b: W better, T ties, L worse (median ratio r)' over every cell with both files."""
    better = tie = worse = 0
    ratios = []
    for res in results.values():
        for cell in res["cells"].values():
            if not (cell.get(a) and cell.get(b)):
                continue
            diff, se = paired(cell[a], cell[b], domains)
            better += diff < -2 * se
            worse += diff > 2 * se
            tie += abs(diff) <= 2 * se
            ratios.append(mean(cell[a], domains) / mean(cell[b], domains))
    label = f"{a} vs {b}" + ("" if domains == DOMAINS else f", KL on {'+'.join(domains)}")
    return (f"| {label} | {better} | {tie} | {worse} | {np.median(ratios):.3f} | "
            f"{min(ratios):.2f}–{max(ratios):.2f} |")


def domain_bias(results: dict) -> list[str]:
    """Importance from one real domain against the model's own text, scored per domain."""
    lines = ["| comparison | first lower (≥ 2 SE) | tie | first higher | median KL ratio | range |",
             "|---|---|---|---|---|---|"]
    for src in ("stock+prose", "stock+code", "stock+real"):
        lines += [head_to_head(results, src, "stock+self", (d,)) for d in DOMAINS]
    return lines


def comparisons(results: dict, pairs) -> list[str]:
    lines = ["| comparison | first lower (≥ 2 SE) | tie | first higher | median KL ratio | range |",
             "|---|---|---|---|---|---|"]
    return lines + [head_to_head(results, a, b) for a, b in pairs]


def per_mix(results: dict, a: str, b: str) -> list[str]:
    """Per mix, over the models: ``a`` against ``b`` (paired, 2 SE) and both files' estimated quantiser time."""
    lines = [f"| mix | {a} / {b}, median KL ratio | range | {a} lower / tie / higher | {a} ns/weight, median | "
             f"{b} ns/weight, median |", "|---|---|---|---|---|---|"]
    for mix in GRID:
        cells = [res["cells"][mix] for res in results.values()
                 if mix in res["cells"] and res["cells"][mix].get(a) and res["cells"][mix].get(b)]
        if not cells:
            continue
        ratios = [mean(c[a]) / mean(c[b]) for c in cells]
        counts = [0, 0, 0]
        for c in cells:
            diff, se = paired(c[a], c[b])
            counts[0 if diff < -2 * se else 2 if diff > 2 * se else 1] += 1
        rate = {v: np.median([c[v]["quantise_ns_per_weight"] for c in cells]) for v in (a, b)}
        lines.append(f"| {mix} | {np.median(ratios):.3f} | {min(ratios):.2f}–{max(ratios):.2f} | "
                     f"{counts[0]} / {counts[1]} / {counts[2]} | {rate[a]:.0f} | {rate[b]:.0f} |")
    return lines


def seed_table(results: dict) -> list[str]:
    """bench/selfcal-seeds.json (scripts/bench_seeds.py): each seed's KL per model, mix and variant."""
    lines = ["| model | self text | mix | better stock file | variant | KL per seed | mean | worst / best seed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        text = f"{res.get('n_seq', 16)} seq, {res.get('windows') or 'default'} windows"
        for mix, stock in res["stock"].items():
            best = min(mean(c) for c in stock.values())
            for v in ("default", "uncapped"):
                kls = [mean(res["seeds"][s][mix][v]) for s in res["seeds"]]
                lines.append(f"| {name} | {text} | {mix} | {best:.5f} | {v} | {' / '.join(f'{k:.5f}' for k in kls)} | "
                             f"{np.mean(kls):.5f} | {max(kls) / min(kls):.2f} |")
    return lines


DEEP = ("stock", "stock+real", "stock+self", "deep-all", "deep-a4w16", "deep-default")


def deep_table(results: dict, columns: tuple[str, ...] = DEEP, subject: str = "deep-default") -> list[str]:
    """Per model and mix: the depth settings against every block measured and against stock;
    ``subject``: the setting the last three columns are about."""
    lines = ["| model | mix | " + " | ".join(columns) + f" | {subject} / all blocks (diff ± SE) | {subject} / best stock "
             "| verdict |", "|---|---|" + "---|" * (len(columns) + 3)]
    for name, res in results.items():
        for mix, cell in sorted(res["cells"].items(), key=lambda kv: GRID.index(kv[0]) if kv[0] in GRID else 99):
            vals = " | ".join("—" if not cell.get(c) else f"{mean(cell[c]):.5f}" for c in columns)
            diff, se = paired(cell[subject], cell["deep-all"])
            v, base, ratio, _, _ = verdict(cell, subject)
            lines.append(f"| {Path(name).name} | {mix} | {vals} | {mean(cell[subject]) / mean(cell['deep-all']):.3f} "
                         f"({diff:+.5f} ± {se:.5f}) | {ratio:.2f} (vs {base}) | {v} |")
    return lines


SPACING = ("deep-a4w2", "deep-a5w2", "deep-a6w2", "deep-a8w2", "deep-a12w2")
DEEP48 = ("deep-a4w2", "deep-a8w2", "deep-a16w2")
DEEP48_MIXES = ("IQ1_S", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M")  # its distinct cells (bench/SELFCAL.md says why)


def only_mixes(results: dict, mixes: tuple[str, ...]) -> dict:
    """``results`` with each model's cells restricted to ``mixes``."""
    return {name: {**res, "cells": {m: c for m, c in res["cells"].items() if m in mixes}} for name, res in results.items()}


def deep48_study(results: dict) -> list[str]:
    """bench/selfcal-deep48.json on its distinct cells: the anchor counts against every block."""
    res = only_mixes(results, DEEP48_MIXES)
    return [*comparisons(res, [(v, "deep-all") for v in DEEP48] + [("deep-a16w2", "deep-a8w2")]), "",
            *summary(res, (*DEEP48, "deep-all")), "",
            *deep_table(res, ("stock", "stock+real", "deep-all", *DEEP48), subject="deep-a8w2")]


def quantise_cost(results: dict) -> list[str]:
    """Estimated quantiser ns per weight of each variant's files (bench_selfcal.quantise_rate)."""
    lines = ["| variant | estimated quantise ns/weight, median | range | files |", "|---|---|---|---|"]
    rates: dict[str, list[float]] = {}
    for res in results.values():
        for c in res["cells"].values():
            for v, r in c.items():
                if isinstance(r, dict) and "quantise_ns_per_weight" in r:
                    rates.setdefault(v, []).append(r["quantise_ns_per_weight"])
    for v, rs in sorted(rates.items(), key=lambda kv: -np.median(kv[1])):  # slowest first
        lines.append(f"| {v} | {np.median(rs):.0f} | {min(rs):.0f}–{max(rs):.0f} | {len(rs)} |")
    return lines


# (side file, title ({} = the file), what it compares, its tables): each study's section, when its file exists
SIDE_STUDIES = (
    ("selfcal-ablation.json", "Ablations (bench/{}; 5 sizes per model)",
     "Each against the default on the same cells. w4: damage measured on 4 windows of own text "
     "instead of 16; alpha-g1 / alpha-gpaper: the damage times (α̃/α)^γ with γ = 1 / the App. A.7 "
     "formula; experts-only: only routed experts allocated, the rest on the fast mode's policy; "
     "no-imatrix: no importance matrix anywhere (damage and quantisation).",
     lambda res: comparisons(res, [(v, "default") for v in ("w4", "alpha-g1", "alpha-gpaper", "experts-only",
                                                            "no-imatrix")])),
    ("selfcal-windows.json", "Fewer windows for the damage (bench/{}; 5 sizes per model)",
     "How many windows of own text the damage measurement needs (each measurement's forward pass is "
     "linear in them; the speed lever for deep models). w4 / w2 / w1: the damage measured on the first "
     "4 / 2 / 1 of the 16 windows (256 tokens each), every tensor measured; against the default (16 "
     "windows on these 2-block models; deeper models used 4 with the depth anchors then, 2 since) and against each "
     "other, on the same cells, all with the auto cap.",
     lambda res: comparisons(res, [("w4", "default"), ("w2", "default"), ("w1", "default"), ("w2", "w4"),
                                   ("w1", "w4")])),
    ("selfcal-anchors.json", "Depth anchors (bench/{}; 5 sizes per model)",
     "The deep-model damage path (alphaq.damage.anchors) at its extreme on these 2-block models: one "
     "block per tensor kind measured, the other block's damage = the measured block's damage per "
     "unit of importance-weighted error times its own weighted error. a1: 16 windows; a1w4: 4 "
     "windows, as the default uses once anchors stand in for blocks. Each against the default "
     "(every tensor measured, 16 windows) on the same cells.",
     lambda res: comparisons(res, [(v, "default") for v in ("a1", "a1w4")])),
    ("selfcal-deep.json", "Depth anchors on an 8-block model (bench/{})",
     "A model deeper than 4 blocks, trained here like the fixtures (scripts/train_tiny_moe.py --zoo bench "
     "--only mixtral-bench --steps 1000, CPU). deep-all: every block measured on 16 windows; deep-a4w16: "
     "4 anchor blocks per tensor kind (0, 2, 5, 7), the others interpolated over depth, 16 windows; "
     "deep-default: what the product does at this depth (4 anchors, 4 windows). Every file at most the "
     "stock file's size.",
     lambda res: [*comparisons(res, [("deep-default", "deep-all"), ("deep-a4w16", "deep-all"),
                                     ("deep-default", "deep-a4w16")]), "", *deep_table(res)]),
    ("selfcal-deep24.json", "Depth anchors on a 24-block model (bench/{})",
     "Where 4 anchors stand for 24 blocks: the bench Mixtral at 24 blocks, trained here "
     "(scripts/train_tiny_moe.py --zoo deep, 500 steps of 16 x 256 tokens on the CPU; held-out perplexity 67 "
     "on prose and 62 on code, against 324 and 297 for a unigram model: trained, though less than the "
     "zoo). deep-default: the product's setting when run (4 anchor blocks per tensor kind, 0, 8, 15 and 23, "
     "on 2 windows); deep-a4w16: the same anchors on 16 windows; deep-a8w2: 8 anchors on 2 windows, the "
     "product's default since this run; "
     "deep-all: every block measured on 16 windows. Every file at most the stock file's size.",
     lambda res: [*comparisons(res, [("deep-default", "deep-all"), ("deep-a4w16", "deep-all"),
                                     ("deep-a8w2", "deep-all"), ("deep-default", "deep-a8w2")]), "",
                  *summary(res, ("deep-default", "deep-a4w16", "deep-a8w2", "deep-all")), "",
                  *deep_table(res, ("stock", "stock+real", "stock+self", "deep-all", "deep-a4w16", "deep-a8w2",
                                    "deep-default"))]),
    ("selfcal-deep24-spacing.json", "Anchor spacing on the 24-block model (bench/{})",
     "How far apart the anchors may stand, for models deeper than 24 blocks (8 anchors stand 6.7 blocks apart "
     "in Qwen3-30B-A3B's 48, 8.7 in DeepSeek-V3's 61): the same 24-block model with 4, 5, 6, 8 and 12 anchor "
     "blocks per tensor kind (7.7, 5.8, 4.6, 3.3 and 2.1 blocks apart), each on 2 windows as the product "
     "measures at depth, against every block measured on 16 windows (deep-all), all made and scored in one "
     "run. deep-a4w2 is the earlier deep-default (its 7 files came out byte-identical to that run's); "
     "deep-a8w2 is the product's default.",
     lambda res: [*comparisons(res, [(v, "deep-all") for v in SPACING] + [("deep-a12w2", "deep-a8w2")]), "",
                  *summary(res, (*SPACING, "deep-all")), "",
                  *deep_table(res, ("stock", "stock+real", "deep-all", *SPACING), subject="deep-a8w2")]),
    ("selfcal-deep48.json", "Depth anchors on a 48-block model (bench/{})",
     "Qwen3-30B-A3B's depth, where the default's 8 anchors stand 6.7 blocks apart: a Mixtral-style model of "
     "48 blocks trained here (scripts/train_tiny_moe.py --zoo deep --only mixtral-deep48, 500 steps of 16 x "
     "256 tokens on the CPU, 26 min; 22.3M parameters; held-out perplexity 111 on prose and 96 on code, "
     "against a unigram model's 324 and 297: trained, less than the 24-block model). To train in the "
     "session it is half as wide (hidden size and expert width 128), and that has a price: llama.cpp's "
     "k-quants and IQ types need rows a multiple of 256 wide, so on every tensor of this model they fall "
     "back to IQ4_NL, Q4_0, Q5_0, Q5_1 or Q8_0, and the study measures the anchors' interpolation over 48 "
     "blocks on that ladder of five types, not the full one. It also merges cells: the IQ1_S and IQ2_XXS "
     "sizes are the same files (both mixes fall back alike), and at Q6_K's size every file is all Q8_0; "
     "those two cells are left out below (their scores are in the JSON). deep-a4w2 / deep-a8w2 / "
     "deep-a16w2: 4, 8 (the default) and 16 anchors (15.7, 6.7 and 3.1 blocks apart) on 2 windows; "
     "deep-all: every block measured on 16 windows. All made and scored in one run.",
     deep48_study),
    ("selfcal-sample.json", "Fewer sampled weights for the weighted errors (bench/{}; 5 sizes per model)",
     "mse64k: the default with each tensor's importance-weighted errors (the ratios that scale its one "
     "measured KL to every type, alphaq.damage.measure) computed on at most 64K sampled weights instead of "
     "1M (the default then; 512K now, which leaves these models' samples as they were; on these models only the merged expert tensors are above 64K: 32 instead of 128 rows per "
     "sampled expert). Against the default on the same cells; 18 of the 20 files came out byte-identical "
     "to the default's (cmp), all but Mixtral's at Q2_K's and Q3_K_M's sizes.",
     lambda res: comparisons(res, [("mse64k", "default")])),
    ("selfcal-deep-cheap.json", "Cheaper depth settings on the 8-block model (bench/{})",
     "The same 8-block model (retrained here with the same command), the product's depth setting "
     "(deep-default: 4 anchor blocks per kind, 4 windows) against cheaper ones: deep-a4w2 (4 anchors, 2 "
     "windows: half the forward passes), deep-a3w4 (3 anchors, blocks 0, 4, 7: a quarter fewer "
     "measurements), deep-a3w2 (both), mse64k (the product's setting with the weighted errors on at most 64K "
     "sampled weights per tensor instead of 1M, the default then); and each against every block measured on 16 windows (deep-all). "
     "Every file at most the stock file's size.",
     lambda res: [*comparisons(res, [(v, "deep-default") for v in ("deep-a4w2", "deep-a3w4", "deep-a3w2", "mse64k")]
                               + [(v, "deep-all") for v in ("deep-default", "deep-a4w2", "deep-a3w4", "deep-a3w2")]),
                  "", *summary(res, ("deep-default", "deep-a4w2", "deep-a3w4", "deep-a3w2"))]),
    ("selfcal-fast-sample.json", "Sampled experts in --fast (bench/{}; 6 sizes per model)",
     "fast-eN: --fast with alpha from N evenly spaced experts of each merged tensor (--alpha-experts N), the "
     "tensor's cost scaled up to all its experts, against --fast with every expert (what the product does on "
     "these models: they have 8 or 16 experts, at most the default sample of 16). A sample of 4 of 8 or 16, "
     "or 8 of 16, estimates a tensor's mean at least as noisily as 16 of Qwen3-30B-A3B's 128 (standard error "
     "sqrt((1 - N/n) / N): 0.35 and 0.43 for 4, 0.25 for 8, 0.23 for 16 of 128). No file where --fast cannot "
     "reach the size. scripts/bench_alpha_sample.py prices the same plans' costs (bench/alpha-sample.json).",
     lambda res: comparisons(res, [("fast-e4", "fast"), ("fast-e8", "fast")])),
    ("selfcal-fast-sample-deep.json", "Sampled experts in --fast on the 8-block model (bench/{}; 6 sizes)",
     "The same on the 8-block trained model (8 experts per tensor, 24 expert tensors): 4 of 8 experts.",
     lambda res: comparisons(res, [("fast-e4", "fast")])),
    ("selfcal-fast-cap.json", "The fast mode's cap on the quantiser's time (bench/{}; 7 sizes per model)",
     "fast-capped: --fast with an auto cap on llama.cpp's quantiser time, tried at commit 7940fde and dropped "
     "(docs/ALLOCATION.md, \"The fast and paper modes are never capped by it\"): the file's types no slower per "
     "weight than the mix of this size without an importance matrix (estimated from "
     "alphaq/gguf/quantise_speed.json); fast: the same plans without the cap, as the product makes them. The "
     "cell's size is the mix's (--like MIX). No file where --fast cannot reach the size.",
     lambda res: comparisons(res, [("fast-capped", "fast")])),
    ("selfcal-fast-twins.json", "The fast mode's fallback twins (bench/{}; 7 sizes per model)",
     "fast-now: --fast as the product makes it since 72b629e: of two options the fast mode's cost cannot tell "
     "apart (same nominal bits, same bytes: on rows not a multiple of 256 wide IQ1_S falls back to IQ4_NL, Q2_K "
     "and Q3_K to Q4_0) the plan takes the one llama.cpp writes faster (Q4_0, about 2 ns a weight, against "
     "IQ4_NL's 250). fast: the files made before it (commits 836d0ad and 7940fde; cached, not re-made). On the "
     "qwen2moe and qwen3moe fixtures the down projections (96 and 128 wide) fall back; Mixtral's and "
     "DeepSeek-V2's do not.",
     lambda res: comparisons(res, [("fast-now", "fast")])),
    ("selfcal-fast-grid.json", "--fast on the whole grid, as it is now (bench/{}; 19 sizes per model)",
     "fast: --fast re-made with today's code (the faster fallback twin since 72b629e, 16 sampled experts and the "
     "256-block FARMS cap, neither of which changes a fixture's file) on the two fixtures whose down projections "
     "fall back (qwen2moe, qwen3moe), against the better of stock and stock+real made and scored in the same run. "
     "Mixtral's and DeepSeek-V2's `--fast` files are unchanged by it (their rows in bench/selfcal.json stand); "
     "\"all four\" adds them.",
     lambda res: fast_today(res)),
    ("selfcal-unseen.json", "Unseen architectures: DeepSeek-V3, GLM-4.5 and Qwen3.5-MoE (bench/{}; 19 sizes each)",
     "Three models of architectures outside the zoo, trained here on the zoo's corpus "
     "(`scripts/train_tiny_moe.py --zoo unseen`, 1000 steps each on the CPU, not committed) after the product's "
     "settings were fixed: no setting was tuned on any of them. deepseek3: DeepseekV3ForCausalLM (MLA, a dense "
     "first block, 16 routed experts in 4 groups with sigmoid scores and a correction bias, top-4, 1 shared "
     "expert; 5.4M parameters). glm45: Glm4MoeForCausalLM (grouped KV heads, half-rotary, a dense first block, "
     "16 routed experts top-4 with sigmoid scores, 1 shared; 4.9M). qwen35moe: Qwen3_5MoeForCausalLM (gated "
     "DeltaNet linear attention with 2 value heads per key head in blocks 0-2, gated full attention in block 3, "
     "16 routed experts top-4, 1 shared; 8.7M, of which 0.5M embedding rows past the tokenizer's 1,024; "
     "trained 23 min; added in a later session, after the first two were measured). Everything else as in the "
     "grid.",
     lambda res: summary(res, ("default", "fast", "stock+self")) + [""]
     + [line for name, r in res.items() for line in model_table(Path(name).name, r)]),
    ("selfcal-q8copy.json", "Q8_0 working copy (bench/{}; 5 sizes per model)",
     "q8copy: the default's self text, importance matrix and damage all from a Q8_0 copy of the model "
     "(--working-copy q8_0, what auto picks when the float model does not fit in RAM), the file quantised "
     "from the BF16 model with that importance matrix; against the default (every stage on the BF16 "
     "model) on the same cells, and both against the better stock file (stock+real here).",
     lambda res: [*comparisons(res, [("q8copy", "default")]), "", *summary(res, ("default", "q8copy"))]),
    ("selfcal-q8copy-deep.json", "Q8_0 working copy on the 8-block model (bench/{}; 6 sizes)",
     "The same on the 8-block trained model of the depth-anchor study, against the product's own setting "
     "there (deep-default: 4 anchor blocks per kind, 4 windows; the copy's stages run the same settings).",
     lambda res: [*comparisons(res, [("q8copy", "deep-default")]), "", *summary(res, ("deep-default", "q8copy"))]),
    ("selfcal-requantize.json", "Requantising from Q8_0 (bench/{}; 19 sizes per model)",
     "requantize: the product end to end (`alphaq.convert(..., like=MIX, allow_requantize=True)`, i.e. "
     "`--allow-requantize`) given only llama.cpp's Q8_0 of the model: its self text, importance matrix, damage "
     "and the file's quantisation all read the Q8_0 weights. Against the default made from the BF16 model in "
     "the same run, and both against the better stock file, which is made from the BF16 model: the "
     "comparison a user with only the Q8_0 file cannot make, so it shows what the Q8_0 costs, not what a "
     "requantising user would get from llama-quantize.",
     lambda res: [*comparisons(res, [("requantize", "default")]), "", *summary(res, ("default", "requantize")),
                  "", *per_mix(res, "requantize", "default")]),
    ("selfcal-requantize-unseen.json", "Requantising from Q8_0 on the unseen Qwen3.5-MoE-style model (bench/{}; 19 sizes)",
     "The same on the model of \"Unseen architectures\" that is still on disk (the other two were deleted "
     "before this study), nothing changed after the zoo's run.",
     lambda res: [*comparisons(res, [("requantize", "default")]), "", *summary(res, ("default", "requantize"))]),
    ("selfcal-cheap.json", "A cheap ladder (bench/{}; 5 sizes per model)",
     "cheap-ladder: the default's damage with the candidates restricted to the k-quants and Q8_0 (--types "
     "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0), the types llama.cpp's quantiser writes fastest. Quality against the "
     "default (full ladder) and the stock files; speed as llama.cpp's quantiser time per weight for each "
     "file's types, estimated from the per-type rates then in bench/qtype-speed.json (one thread; not a "
     "timing; that table is now alphaq/gguf/quantise_speed.json, re-measured, about 25 % lower throughout).",
     lambda res: [*comparisons(res, [("cheap-ladder", "default")]), "",
                  *summary(res, ("default", "cheap-ladder")), "", *quantise_cost(res)]),
    ("selfcal-cap.json", "A cap on the quantiser's time (bench/{}; 5 sizes per model)",
     "capN: the default (full ladder, same damage) under --max-quantise-ns N: the file's types may take "
     "llama.cpp's quantiser at most N ns per weight on average (one thread, per-type rates of "
     "alphaq/gguf/quantise_speed.json; an estimate, not a timing). No file where even the fastest types "
     "under the size exceed the cap. Quality against the default and the stock files; the estimated "
     "quantiser time of every variant's files.",
     lambda res: [*comparisons(res, [("cap150", "default"), ("cap100", "default")]), "",
                  *summary(res, ("default", "cap150", "cap100")), "", *quantise_cost(res)]),
    ("selfcal-autocap.json", "The auto cap on the whole grid (bench/{}; 19 sizes per model)",
     "default: the product's default as it is now, with its auto cap on llama.cpp's quantiser time "
     "(--max-quantise-ns auto: the larger of 150 ns per weight and llama.cpp's own mix at that size with an "
     "importance matrix, alphaq/allocate/quantise_cap.py); uncapped: the same damage table without the cap "
     "(--max-quantise-ns none), which is what `default` means in bench/selfcal.json and every other study on "
     "this page measured before the cap. Quality against each other and against the better stock file; the "
     "estimated quantiser time of every file.",
     lambda res: [*comparisons(res, [("default", "uncapped")]), "", *summary(res, ("default", "uncapped")), "",
                  *per_mix(res, "default", "uncapped"), "", *quantise_cost(res)]),
    ("selfcal-seeds.json", "The self-text seed (bench/{}; 3 sizes, seeds 0-3)",
     "The same model and sizes with the self text drawn from seeds 0, 1, 2 and 3 (scripts/bench_seeds.py): "
     "self text, importance matrix and damage table per seed, the default's plan (auto cap) and the uncapped "
     "one, at the stock+real file's size, scored like the grid's cells.", seed_table),
    ("selfcal-seeds-n64.json", "More self text for the importance (bench/{}; 3 sizes, seeds 0-3)",
     "As above on DeepSeek-V2, with 64 sequences of self text instead of 16 (4x the importance matrix's "
     "tokens); the damage still measured on the first 16 windows, as the product does.", seed_table),
    ("selfcal-seeds-n64w64.json", "More self text for importance and damage (bench/{}; 3 sizes, seeds 0-3)",
     "As above with the damage measured on all 64 windows (4x the measurement's tokens).", seed_table),
    ("selfcal-granularity.json", "Tensor against expert granularity, patched runtime (bench/{}; 5 sizes per model)",
     "expert: the default at --granularity expert: every expert slice of a merged expert tensor is an item with "
     "its own type, its damage the tensor's measured damage (one KL measurement per tensor, as at tensor "
     "granularity) shared out by the slices' importance-weighted errors; the file stores expert groups, which "
     "only the patched llama.cpp (ggml-patches/) loads. Every file of this study, the stock one and the "
     "tensor-granular default included, was scored in that patched runtime. Sizes at most the stock file's; "
     "the expert file pays for its group layout inside the same size.",
     lambda res: [*comparisons(res, [("expert", "default")]), "", *summary(res, ("default", "expert"))]),
    ("selfcal-domain.json", "Domain bias (bench/{}; IQ2_XXS, Q3_K_M, Q5_K_M sizes)",
     "llama.cpp's mix quantised with an importance matrix from prose only, code only, or both "
     "(real text, val split, 16 windows each) against the one from the model's own text, with "
     "the KL scored on each held-out domain separately.", domain_bias),
)


def fast_today(res: dict) -> list[str]:
    """--fast's summary on the re-made models, then with bench/selfcal.json's other models added."""
    grid = json.loads((ROOT / "bench" / "selfcal.json").read_text())
    every = {**{m: r for m, r in grid.items() if m not in res}, **res}
    here, total = summary(res, ("fast",)), summary(every, ("fast",))
    return here + [total[-1].replace("| fast |", f"| fast, all four models ({', '.join(sorted(every))}) |")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "selfcal.json")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "SELFCAL.md")
    args = p.parse_args()
    results = json.loads(args.json.read_text())
    out = ["# The default path against llama.cpp's mixes, at every size", "",
           "Generated by `scripts/report_selfcal.py` from `bench/selfcal.json` (`scripts/bench_selfcal.py`). "
           "Every alphaq file is at most the stock file's size. Evaluation: the held-out test split "
           "(tests/fixtures/heldout), 24 windows of 256 tokens per domain, the second half of each "
           "window scored. Verdicts need 2 paired standard errors. The grid of `bench/selfcal.json` and the "
           "side studies were measured before the default capped llama.cpp's quantiser time: their `default` is "
           "today's `--max-quantise-ns none`; the default as it is now is measured on the whole grid in "
           "\"The auto cap on the whole grid\".", "",
           "## Summary (every model and mix)", "", *summary(results), "",
           "## Head to head (same cells)", "",
           *comparisons(results, [("default", "real-driven"), ("default", "direct"), ("stock+self", "stock+real")]),
           ""]
    for file, title, intro, body in SIDE_STUDIES:
        side = args.json.with_name(file)
        if side.exists():
            out += [f"## {title.format(file)}", "", intro, "", *body(json.loads(side.read_text())), ""]
    for name, res in results.items():
        out += model_table(name, res)
    args.out.write_text("\n".join(out) + "\n")
    print("\n".join(summary(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
