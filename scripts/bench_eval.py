#!/usr/bin/env python3
"""Evaluation harness: AlphaQ vs llama.cpp's own mixes and other baselines, at equal size.

    python scripts/bench_eval.py [--models mixtral-bench qwen2moe-bench] [--windows 12]
    python scripts/bench_eval.py --report-only          # rebuild bench/RESULTS.md and figures

For each benchmark model (.cache/zoo/NAME, HF) it converts to a BF16 GGUF once, writes every
variant with llama.cpp's quantiser under .cache/bench/NAME/, and evaluates it with llama.cpp
(llama-cpp-python) on both held-out domains (tests/fixtures/heldout/{prose,code}.txt, test split)
against the BF16 reference: perplexity, mean KL(ref || model) per token, top-1 agreement.
Each variant's result is cached as JSON (.cache/bench/NAME/results/VARIANT.json), so an
interrupted run resumes. bench/results.json, bench/RESULTS.md and bench/NAME.png are rebuilt at
the end from all cached results; bench/notes.md (hand-written), if present, heads RESULTS.md.

Variants (all from the same BF16 GGUF, all written by llama_model_quantize):
  stock-MIX             llama.cpp mixes Q2_K … Q4_K_M, uncalibrated
  stock-MIX+imatrix     the same with an importance matrix from val-split text (alphaq.importance.real_text);
                        also IQ2_XXS and IQ1_S, which llama.cpp writes only with one
  alphaq-gG@MIX+imatrix AlphaQ (calibration-free) at the size of the calibrated stock mix
  alphaq-all-g1@MIX     AlphaQ γ=1 at the mix's size with --allocate all (attention in the knapsack)
  alphaq-all-iq2-g1@MIX the same with IQ2_XXS added to the candidates
  alphaonly@MIX         ablation: importance (α̃/α)^1 · 2^(-2b) without Var(W), same knapsack and size
  uniform-T             every routed expert tensor T, non-experts on AlphaQ's policy (Q4_K)
  alphaq-bB             AlphaQ at nominal budget B bits (defaults: γ from App. A.7, paper noise)
  alphaq@MIX            AlphaQ with target size = the stock mix's actual file size
  random@MIX            same knapsack and size, log-normal random importance (seed 0)
  random-sK@MIX         the same with seed K (1..4): the spread of the sanity floor
  alphaq-iq1m@MIX       AlphaQ γ=1 at the mix's size, IQ1_M instead of IQ1_S as the 1-bit candidate
  alphaq-no1bit@MIX     AlphaQ γ=1 at the mix's size without a 1-bit candidate (Q2_K, Q3_K, Q4_K)
  freq@MIX              PMQ-style calibrated: routing frequency x quantisation loss on the calibration
                        text (ggml MSE weighted by the imatrix's activations), per-block budget
  stock-MIX+imatrix:D, freq:D@MIX  the same calibrated on one domain D only (prose or code)
  alphaq-b3-ABLATION    noise measured, scope block, γ in {0, 0.5, 1, 2}
  alphaq-gG@MIX         AlphaQ at the stock mix's size with γ = G (1, 4, 0)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alphaq.evaluate import baselines
from alphaq.errors import AlphaQError
from alphaq.allocate.plan import PlanConfig
from alphaq.gguf.quantize import STOCK_MIXES

DOMAINS = ("prose", "code")
CAL_MIXES = ("Q2_K", "Q3_K_M", "Q4_K_M")  # matched-size comparisons for freq/imatrix
RANDOM_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_M")  # matched-size random importance
NOMINAL = (2.5, 3.0, 3.5)
GAMMAS = (0.0, 0.5, 1.0, 2.0)
MATCHED_GAMMAS = (1.0, 4.0, 0.0)  # γ sweep at matched size (the default γ from App. A.7 is ~80 here)
ONE_BIT_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M")  # sizes where AlphaQ's plans use the 1-bit candidate
ONE_BIT_TYPES = {"alphaq-iq1m": ("IQ1_M", "Q2_K", "Q3_K", "Q4_K"), "alphaq-no1bit": ("Q2_K", "Q3_K", "Q4_K")}
SEED_MIXES = ("Q2_K", "Q3_K_M")  # extra random-importance seeds
LOW_MIXES = ("IQ2_XXS", "IQ1_S")  # llama.cpp's low-bit mixes: it writes them only with an imatrix
ALPHA_ONLY_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L")
CAL_DOMAINS = ("prose", "code")  # calibrated on one domain, evaluated on both: the domain bias
EXTRA_SEEDS = (1, 2, 3, 4)

log = logging.getLogger("bench_eval")



def family(name: str) -> str:
    if name.startswith("stock-") and "+imatrix" in name:
        return "stock+" + name.partition("+")[2]
    if name.split("@")[0] in ONE_BIT_TYPES:
        return name.split("@")[0] + " (matched size)"
    if name.startswith("alphaonly@"):
        return "alphaq ablation: α only (matched size)"
    for prefix in ("stock", "uniform", "random", "freq"):
        if name.startswith(prefix):
            return prefix
    if name.startswith("alphaq@"):
        return "alphaq (matched size)"
    if name.startswith("alphaq-all-"):
        return "alphaq γ=1, allocate all (matched size)"
    if name.startswith("alphaq-g") and "@" in name:
        return "alphaq γ=" + name[len("alphaq-g"):name.index("@")] + " (matched size)"
    if name.startswith("alphaq-b") and name.count("-") == 1:
        return "alphaq (nominal)"
    return "alphaq ablation"


def calibration_imatrix(model_dir: Path, bf16: Path, fm, work: Path, domain: str | None = None):
    """(imatrix, expert token counts) from val-split text: both domains, or one ``domain`` (the
    domain-bias study); cached in WORK/imatrix-{both,DOMAIN}.npz. The imatrix reads the first 64
    windows of 256 tokens (~16k tokens, ~65k characters), so both domains are interleaved in
    2,000-character pieces: a plain concatenation would be read as prose only."""
    path = work / f"imatrix-{domain or 'both'}.npz"
    if path.exists():
        z = np.load(path)
        return ({k[2:]: z[k] for k in z.files if k.startswith("d:")},
                {k[2:]: z[k] for k in z.files if k.startswith("e:")})
    from alphaq.evaluate.corpus import read_text
    from alphaq.importance.real_text import ImatrixConfig, compute_imatrix

    if domain is None:
        prose, code = read_text("prose", "val", max_chars=80_000), read_text("code", "val", max_chars=80_000)
        step = 2_000
        text = "\n\n".join(part for i in range(0, max(len(prose), len(code)), step)
                             for part in (prose[i:i + step], code[i:i + step]) if part)
    else:
        text = read_text(domain, "val", max_chars=160_000)
    res = compute_imatrix(model_dir, bf16, text, ImatrixConfig(max_windows=64))
    baselines.check_imatrix(fm, res.data)
    np.savez(path, **{f"d:{k}": v for k, v in res.data.items()}, **{f"e:{k}": v for k, v in res.expert_tokens.items()})
    return res.data, res.expert_tokens


class Bench:
    def __init__(self, model_dir: Path, work: Path, n_ctx: int, n_windows: int, threads: int):
        self.model_dir, self.work, self.n_ctx, self.n_windows, self.threads = model_dir, work, n_ctx, n_windows, threads
        work.mkdir(parents=True, exist_ok=True)
        (work / "results").mkdir(exist_ok=True)
        self.bf16 = work / "bf16.gguf"
        if not self.bf16.exists():
            from alphaq.model.weights import converter_mtp_args
            from convert.hf_to_gguf import convert_hf

            convert_hf(model_dir, self.bf16, extra=converter_mtp_args(model_dir))
        self.fm = baselines.FloatModel.open(self.bf16)
        from alphaq.spectral.analyze import analyze_model

        self.stats = analyze_model(self.bf16, progress=False)
        self._refs = None
        self._imatrix: dict = {}
        self._measured: dict = {}

    # ---- cached inputs -------------------------------------------------------------------------
    def refs(self):
        if self._refs is None:
            from alphaq.evaluate.perplexity import load_llama, reference_run

            ref = load_llama(self.bf16, self.n_ctx, n_threads=self.threads)
            self._refs = {d: reference_run(ref, (ROOT / "tests/fixtures/heldout" / f"{d}.txt").read_text(errors="replace"),
                                           name=d, n_ctx=self.n_ctx, max_windows=self.n_windows) for d in DOMAINS}
            del ref
        return self._refs

    def imatrix(self, domain: str | None = None):
        if domain not in self._imatrix:
            self._imatrix[domain] = calibration_imatrix(self.model_dir, self.bf16, self.fm, self.work, domain)
        return self._imatrix[domain]

    def measured(self, calibration: str | None = "none"):
        """Measured quantisation loss per slice and type: plain weight MSE ("none", the measured
        noise model), or weighted by the imatrix of calibration None (both domains) / "prose" /
        "code" (the loss on calibration text, for the PMQ-style baseline)."""
        if calibration not in self._measured:
            imat = None if calibration == "none" else self.imatrix(calibration)[0]
            self._measured[calibration] = baselines.measure_table(self.fm, self.stats, PlanConfig(noise="measured"),
                                                                  imatrix=imat)
        return self._measured[calibration]

    def stock_size(self, mix: str) -> int:
        """File size of stock-MIX (MIX may end in +imatrix: the calibrated mix)."""
        out = self.work / f"stock-{mix}.gguf"
        if not out.exists():
            imat = self.imatrix()[0] if mix.endswith("+imatrix") else None
            baselines.stock(self.fm, out, mix.removesuffix("+imatrix"), imatrix=imat, nthread=self.threads)
        return out.stat().st_size

    # ---- variants ------------------------------------------------------------------------------
    def produce(self, name: str) -> tuple[Path, dict]:
        """Write variant ``name``; returns its path and a description."""
        out = self.work / f"{name}.gguf"
        info: dict = {}
        if name.startswith("stock-"):
            mix, _, cal = name[len("stock-"):].partition("+")  # cal: "", "imatrix" or "imatrix:DOMAIN"
            imat = self.imatrix(cal.partition(":")[2] or None)[0] if cal else None
            if not out.exists():
                baselines.stock(self.fm, out, mix, imatrix=imat, nthread=self.threads)
            return out, {"mix": mix, "imatrix": imat is not None, "calibration": cal.partition(":")[2] or "both"}
        plan = None
        if name.startswith("uniform-"):
            plan = baselines.uniform_plan(self.fm, self.stats, name[len("uniform-"):])
        elif "@" in name:
            kind, mix = name.split("@")
            gamma = float(kind[len("alphaq-g"):]) if kind.startswith("alphaq-g") else None
            cfg = PlanConfig(budget_mode="size", budget=float(self.stock_size(mix)), gamma=gamma)
            if kind == "alphaq-all-g1":  # every in-block weight in the knapsack, not only experts
                cfg = PlanConfig(budget_mode="size", budget=cfg.budget, gamma=1.0, allocate="all")
            if kind == "alphaq-all-iq2-g1":  # the same with IQ2_XXS among the candidates
                cfg = PlanConfig(budget_mode="size", budget=cfg.budget, gamma=1.0, allocate="all",
                                 types=("IQ1_S", "IQ2_XXS", "Q2_K", "Q3_K", "Q4_K"))
            if kind in ONE_BIT_TYPES:  # against alphaq-g1@MIX: same γ, only the candidates differ
                cfg = PlanConfig(budget_mode="size", budget=cfg.budget, gamma=1.0, types=ONE_BIT_TYPES[kind])
            info["target_bytes"] = int(cfg.budget)
            if kind.startswith("alphaq"):
                plan = baselines.solve(self.fm, self.stats, cfg)
            elif kind == "alphaonly":  # importance (α̃/α)^1 · 2^(-2b): the noise model's Var left out
                plan = baselines.alpha_only_plan(self.fm, self.stats, cfg, gamma=1.0)
            elif kind == "random" or kind.startswith("random-s"):
                seed = int(kind[len("random-s"):]) if kind.startswith("random-s") else 0
                info["seed"] = seed
                plan = baselines.random_plan(self.fm, self.stats, cfg, seed=seed)
            elif kind == "freq" or kind.startswith("freq:"):  # freq:DOMAIN = calibrated on one domain
                domain = kind.partition(":")[2] or None
                plan = baselines.frequency_plan(self.fm, self.stats, cfg, self.imatrix(domain)[1], self.measured(domain))
        elif name.startswith("alphaq-b"):
            parts = name[len("alphaq-b"):].split("-")
            cfg = PlanConfig(budget=float(parts[0]))
            table = None
            for p in parts[1:]:
                if p == "measured":
                    cfg = PlanConfig(budget=cfg.budget, noise="measured")
                    table = self.measured()
                elif p == "block":
                    cfg = PlanConfig(budget=cfg.budget, scope="block")
                elif p.startswith("g"):
                    cfg = PlanConfig(budget=cfg.budget, gamma=float(p[1:]))
            plan = baselines.solve(self.fm, self.stats, cfg, table)
        if plan is None:
            raise ValueError(f"unknown variant {name}")
        if not out.exists():
            baselines.write_plan(self.fm, plan, out, nthread=self.threads)
        counts: dict[str, int] = {}
        for it in plan.items:
            counts[it.type.name] = counts.get(it.type.name, 0) + 1
        info.update(gamma=plan.settings["gamma"], expert_types=counts,
                    expert_nominal_bits=plan.totals.nominal_bits, expert_true_bpw=plan.totals.true_bpw)
        return out, info

    def run(self, name: str) -> dict:
        cache = self.work / "results" / f"{name}.json"
        if cache.exists():
            res = json.loads(cache.read_text())
            scored = {d["n_scored"] for d in res.get("domains", {}).values()}
            if "error" in res or scored == {self.n_ctx // 2 * self.n_windows}:
                return res  # else measured with another window count: measure again
        from alphaq.evaluate.perplexity import evaluate_vs_reference, load_llama

        t0 = time.time()
        try:
            path, info = self.produce(name)
        except AlphaQError as e:
            res = {"variant": name, "family": family(name), "error": str(e)}
            cache.write_text(json.dumps(res, indent=1))
            return res
        refs = self.refs()
        llm = load_llama(path, self.n_ctx, n_threads=self.threads)
        reports = {d: evaluate_vs_reference(llm, refs[d]) for d in DOMAINS}
        del llm
        n_weights = sum(t.n_elements for t in self.fm.tensors)
        size = path.stat().st_size
        res = {"variant": name, "family": family(name), "file_bytes": size, "bpw": 8 * size / n_weights,
               "info": info, "seconds": time.time() - t0,
               "domains": {d: {"ppl": r.ppl, "ref_ppl": r.ref_ppl, "kl": r.kl, "top1": r.top1,
                               "n_scored": r.n_scored} for d, r in reports.items()}}
        cache.write_text(json.dumps(res, indent=1))
        return res


def variants(ablations: bool, calibrated: bool) -> list[str]:
    v = [f"stock-{m}" for m in STOCK_MIXES]
    v += [f"alphaq-b{b:g}" for b in NOMINAL]
    v += [f"alphaq@{m}" for m in STOCK_MIXES]
    v += [f"uniform-{t}" for t in baselines.UNIFORM_TYPES]
    v += [f"random@{m}" for m in RANDOM_MIXES]
    v += [f"random-s{k}@{m}" for m in SEED_MIXES for k in EXTRA_SEEDS]
    if calibrated:
        v += [f"stock-{m}+imatrix" for m in CAL_MIXES]
        v += [f"stock-{m}+imatrix" for m in LOW_MIXES]
        v += [f"{k}@{m}+imatrix" for m in LOW_MIXES for k in ("alphaq-g1", "alphaq-g0", "alphaq-all-g1",
                                                                    "alphaq-all-iq2-g1")]
    if ablations:
        v += ["alphaq-b3-block"] + [f"alphaq-b3-g{g:g}" for g in GAMMAS] + ["alphaq-b3-measured"]
    if calibrated:
        v += [f"freq@{m}" for m in CAL_MIXES]
        v += [f"stock-{m}+imatrix:{d}" for d in CAL_DOMAINS for m in CAL_MIXES]
        v += [f"freq:{d}@{m}" for d in CAL_DOMAINS for m in CAL_MIXES]
    if ablations:
        v += [f"alphaq-g{g:g}@{m}" for g in MATCHED_GAMMAS for m in STOCK_MIXES]
        v += [f"{k}@{m}" for k in ONE_BIT_TYPES for m in ONE_BIT_MIXES]
        v += [f"alphaonly@{m}" for m in ALPHA_ONLY_MIXES]
    return v


# ---- report ------------------------------------------------------------------------------------
def table(title: str, head: list[str], rows: list[str]) -> list[str]:
    """A titled markdown table (rows already formatted), or nothing when there are no rows."""
    if not rows:
        return []
    return [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows, ""]


def _same_file(pa: Path, pb: Path) -> bool:
    """Whether two variants' GGUFs (still in the work dir) are byte-identical."""
    return pa.exists() and pb.exists() and pa.read_bytes() == pb.read_bytes()


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (smaller size and smaller ppl)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    best, front = math.inf, []
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def write_report(out_dir: Path, all_results: dict[str, list[dict]], meta: dict) -> None:
    """bench/RESULTS.md (notes.md, then per model: the table of every variant, the side tables and
    the figure), results.json and one figure per model."""
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "models": all_results}, indent=1) + "\n")
    lines = []
    notes = out_dir / "notes.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    lines += _report_intro(all_results, meta)
    colors: dict[str, str] = {}  # one colour per family across the models' figures
    for model, rows in all_results.items():
        ok = sorted((r for r in rows if "error" not in r), key=lambda r: r["file_bytes"])
        lines += _variant_table(model, rows, ok)
        by = {r["variant"]: r for r in ok}
        lines += _matched_size_table(by) + _seed_table(by) + _domain_bias_table(by)
        lines += _one_bit_table(model, rows, meta)
        _model_figure(out_dir, model, ok, colors)
        lines += [f"![{model}]({model}.png)", ""]
    (out_dir / "RESULTS.md").write_text("\n".join(lines) + "\n")


def _report_intro(all_results: dict[str, list[dict]], meta: dict) -> list[str]:
    # the window count as measured (cached results), not as requested
    scored = sorted({d["n_scored"] for rows in all_results.values() for r in rows for d in r.get("domains", {}).values()})
    n_win = "/".join(str(n // (meta["n_ctx"] // 2)) for n in scored) or "?"
    return ["## Tables (generated by scripts/bench_eval.py)", "",
            (f"Evaluation: llama.cpp via llama-cpp-python 0.3.36, n_ctx {meta['n_ctx']}, {n_win} "
             "non-overlapping windows per domain, second half of each window scored "
             f"({'/'.join(map(str, scored))} tokens per domain); KL = mean KL(BF16 || model) "
             "per scored token in nats; top-1 = agreement of argmax tokens with BF16. Sizes are the "
             "true file sizes; bpw = 8·file bytes / all weights in the file."), ""]


def _variant_table(model: str, rows: list[dict], ok: list[dict]) -> list[str]:
    """Every variant of ``model`` by size (``ok``: those that were written), then those that could not be."""
    lines = [f"### {model}", ""]
    if ok:
        ref = ok[0]["domains"]
        lines += ["BF16 reference ppl: " + ", ".join(f"{d} {ref[d]['ref_ppl']:.3f}" for d in DOMAINS), ""]
    lines += ["| variant | family | size (B) | bpw | " + " | ".join(f"{d} ppl | {d} KL | {d} top-1" for d in DOMAINS) + " |",
              "|---|---|---|---|" + "---|---|---|" * len(DOMAINS)]
    for r in ok:
        cells = []
        for d in DOMAINS:
            x = r["domains"][d]
            cells += [f"{x['ppl']:.3f}", f"{x['kl']:.4f}", f"{x['top1']:.3f}"]
        lines.append(f"| {r['variant']} | {r['family']} | {r['file_bytes']:,} | {r['bpw']:.3f} | " + " | ".join(cells) + " |")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['family']} | — | — | not possible: {r['error']} |")
    return lines + [""]


def _matched_size_table(by: dict[str, dict]) -> list[str]:
    head = []
    for mix in STOCK_MIXES:
        s, a = by.get(f"stock-{mix}"), by.get(f"alphaq@{mix}")
        if s and a:
            cells = [mix, f"{s['file_bytes']:,}", f"{a['file_bytes']:,}"]
            for d in DOMAINS:
                cells += [f"{s['domains'][d]['ppl']:.3f}", f"{a['domains'][d]['ppl']:.3f}"]
            for key in (f"random@{mix}", f"stock-{mix}+imatrix", f"freq@{mix}"):
                o = by.get(key)
                cells.append(" / ".join(f"{o['domains'][d]['ppl']:.3f}" for d in DOMAINS) if o else "—")
            head.append("| " + " | ".join(cells) + " |")
    return table("Matched size (AlphaQ's target = the stock mix's file size): perplexity",
                 ["mix", "stock bytes", "alphaq bytes", "stock prose", "alphaq prose", "stock code",
                  "alphaq code", "random prose / code", "stock+imatrix prose / code", "freq prose / code"], head)


def _seed_table(by: dict[str, dict]) -> list[str]:
    """The random floor's spread over seeds."""
    seeds = []
    for mix in SEED_MIXES:
        rs = [by[k] for k in [f"random@{mix}"] + [f"random-s{k}@{mix}" for k in EXTRA_SEEDS] if k in by]
        ours = [by.get(f"alphaq-g{g}@{mix}") for g in ("1", "0")]
        if len(rs) > 1 and all(ours):
            kl = [float(np.mean([r["domains"][d]["kl"] for d in DOMAINS])) for r in rs]
            cells = [mix, str(len(rs)), f"{min(kl):.4f} / {float(np.mean(kl)):.4f} / {max(kl):.4f}"]
            cells += [f"{float(np.mean([r['domains'][d]['kl'] for d in DOMAINS])):.4f}" for r in ours]
            seeds.append("| " + " | ".join(cells) + " |")
    return table("Random importance over seeds (same knapsack, same size), mean KL over both domains",
                 ["mix", "seeds", "random: min / mean / max", "AlphaQ γ=1", "AlphaQ γ=0 (no α)"], seeds)


def _domain_bias_table(by: dict[str, dict]) -> list[str]:
    """Calibrated on one domain, evaluated on both: the domain bias."""
    bias = []
    for mix in CAL_MIXES:
        keys = [f"stock-{mix}", f"stock-{mix}+imatrix:prose", f"stock-{mix}+imatrix:code",
                f"freq:prose@{mix}", f"freq:code@{mix}", f"alphaq-g1@{mix}"]
        if all(k in by for k in keys):
            cells = [mix] + [" / ".join(f"{by[k]['domains'][d]['kl']:.4f}" for d in DOMAINS) for k in keys]
            bias.append("| " + " | ".join(cells) + " |")
    return table("Calibrated on one domain's val text, evaluated on both: KL prose / code",
                 ["mix", "stock, no imatrix", "stock + imatrix (prose)", "stock + imatrix (code)",
                  "freq (prose)", "freq (code)", "AlphaQ γ=1 (no calibration)"], bias)


def _one_bit_table(model: str, rows: list[dict], meta: dict) -> list[str]:
    """Which 1-bit candidate (or none) at matched size."""
    onebit = []
    every = {r["variant"]: r for r in rows}
    for mix in ONE_BIT_MIXES:
        rs = {k: every.get(f"{k}@{mix}") for k in ("alphaq-g1", *ONE_BIT_TYPES)}
        if not all(rs.values()):
            continue
        cells = [mix]
        for k, r in rs.items():
            if "error" in r:
                cells.append("not feasible: " + r["error"].split(";")[0])
                continue
            n1 = sum(v for t, v in r["info"]["expert_types"].items() if t.startswith("IQ1"))
            work = Path(meta["work"]) / model
            same = k != "alphaq-g1" and _same_file(work / f"{k}@{mix}.gguf", work / f"alphaq-g1@{mix}.gguf")
            cells.append(f"{r['file_bytes']:,} B, {n1} × 1-bit: " +
                         " / ".join(f"{r['domains'][d]['kl']:.4f}" for d in DOMAINS) +
                         (" (same file)" if same else ""))
        onebit.append("| " + " | ".join(cells) + " |")
    return table("The 1-bit candidate at matched size, AlphaQ γ=1: file size, expert tensors at 1 bit, "
                 "KL prose / code", ["mix", "IQ1_S (default)", "IQ1_M", "no 1-bit type"], onebit)


def _model_figure(out_dir: Path, model: str, ok: list[dict], colors: dict[str, str]) -> None:
    """Perplexity (top) and KL to BF16 (bottom) against file size, per domain: out_dir/MODEL.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(DOMAINS), figsize=(13, 9))
    for row, metric in enumerate(("ppl", "kl")):
        for ax, d in zip(axes[row], DOMAINS):
            pts = [(r["file_bytes"] / 2**20, r["domains"][d][metric]) for r in ok]
            for fam in sorted({r["family"] for r in ok}):
                xs = [pt for pt, r in zip(pts, ok) if r["family"] == fam]
                c = colors.setdefault(fam, f"C{len(colors) % 10}")
                ax.scatter([pt[0] for pt in xs], [pt[1] for pt in xs], label=fam, color=c, s=22,
                           marker="o" if len(colors) <= 10 else "s")
            front = pareto(pts)
            fx = [pts[i] for i in front]
            ax.plot([pt[0] for pt in fx], [pt[1] for pt in fx], "k--", lw=0.8, label="Pareto front")
            for i in front:
                ax.annotate(ok[i]["variant"], pts[i], fontsize=6, xytext=(3, 3), textcoords="offset points")
            if metric == "ppl" and ok:
                ax.axhline(ok[0]["domains"][d]["ref_ppl"], color="grey", lw=0.6, ls=":", label="BF16")
            if metric == "kl":
                ax.set_yscale("log")
            ax.set_xlabel("file size (MiB)")
            ax.set_ylabel(f"perplexity ({d})" if metric == "ppl" else f"KL(BF16 || model), {d}, nats/token")
            ax.set_title(f"{model}: {d}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"{model}.png", dpi=110)
    plt.close(fig)


# ---- expert granularity through the torch reference (no stock runtime runs these plans) -------
EXPERT_CONFIGS = {
    "tensor, γ default": {}, "expert, γ default": {"granularity": "expert"},
    "tensor, γ=1": {"gamma": 1.0}, "expert, γ=1": {"granularity": "expert", "gamma": 1.0},
    "tensor, γ=0": {"gamma": 0.0}, "expert, γ=0": {"granularity": "expert", "gamma": 0.0},
}


def torch_expert_granular(model: str, zoo: Path, work: Path, n_ctx: int, windows: int, budgets) -> list[dict]:
    """KL(BF16 || plan) through alphaq.runtime.torch_ref for tensor- vs expert-granular AlphaQ plans at the
    same nominal budget; both granularities are quantised with ggml and run in float32 torch."""
    import torch
    from transformers import AutoTokenizer

    from alphaq.runtime import torch_ref

    bench = Bench(zoo / model, work / model, n_ctx, windows, 1)
    tok = AutoTokenizer.from_pretrained(zoo / model)
    xs = {}
    for d in DOMAINS:
        ids = tok((ROOT / "tests/fixtures/heldout" / f"{d}.txt").read_text(errors="replace"),
                  add_special_tokens=False)["input_ids"]
        x = torch.tensor(ids[: windows * n_ctx]).view(windows, n_ctx)
        x[:, 0] = tok.bos_token_id
        xs[d] = x
    first = n_ctx // 2

    def logprobs(m):
        with torch.no_grad():
            return {d: torch.log_softmax(m(input_ids=x).logits[:, first - 1:n_ctx - 1].double(), -1) for d, x in xs.items()}

    ref = logprobs(torch_ref.load_hf(zoo / model))
    rows = []
    for budget in budgets:
        for label, kw in EXPERT_CONFIGS.items():
            plan = baselines.solve(bench.fm, bench.stats, PlanConfig(budget=budget, **kw))
            types = {(it.tensor, it.expert): it.type for it in plan.items}
            types.update({(f.tensor, None): f.type for f in plan.fixed if f.quantised})
            lp = logprobs(torch_ref.from_types(zoo / model, bench.bf16, types))
            res = {"model": model, "budget": budget, "config": label, "gamma": plan.settings["gamma"],
                   "true_bpw_experts": plan.totals.true_bpw, "predicted_bytes": plan.totals.predicted_file_bytes}
            for d in DOMAINS:
                tgt = xs[d][:, first:]
                q = ref[d]
                res[f"{d}_kl"] = float((q.exp() * (q - lp[d])).sum(-1).mean())
                res[f"{d}_ppl"] = float(torch.exp(-lp[d].gather(-1, tgt[..., None]).mean()))
                res[f"{d}_ref_ppl"] = float(torch.exp(-q.gather(-1, tgt[..., None]).mean()))
            rows.append(res)
            print(f"{model} b{budget:g} {label}: KL prose {res['prose_kl']:.4f} code {res['code_kl']:.4f} "
                  f"(expert true bpw {res['true_bpw_experts']:.3f})", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mixtral-bench", "qwen2moe-bench", "qwen3moe-bench"])
    p.add_argument("--zoo", type=Path, default=ROOT / ".cache/zoo")
    p.add_argument("--work", type=Path, default=ROOT / ".cache/bench")
    p.add_argument("--out", type=Path, default=ROOT / "bench")
    p.add_argument("--n-ctx", type=int, default=256)
    p.add_argument("--windows", type=int, default=8,
                   help="windows per domain (default: %(default)s, what bench/RESULTS.md was measured with; "
                        "cached results measured with another count are recomputed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--no-calibrated", action="store_true")
    p.add_argument("--only", nargs="*", help="run only these variants")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--torch-expert", action="store_true",
                   help="instead: tensor vs expert granularity through the torch reference; writes bench/expert-granular.json")
    args = p.parse_args()
    if args.torch_expert:
        rows = [r for m in args.models for r in torch_expert_granular(m, args.zoo, args.work, args.n_ctx, args.windows, (2.5, 3.0))]
        (args.out / "expert-granular.json").write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    names = args.only or variants(not args.no_ablations, not args.no_calibrated)
    if not args.report_only:
        for m in args.models:
            bench = Bench(args.zoo / m, args.work / m, args.n_ctx, args.windows, args.threads)
            for v in names:
                t = time.time()
                r = bench.run(v)
                msg = r.get("error") or " ".join(f"{d} ppl {r['domains'][d]['ppl']:.3f} KL {r['domains'][d]['kl']:.4f}" for d in DOMAINS)
                print(f"{m} {v}: {r.get('file_bytes', '-')} B {msg} ({time.time() - t:.0f}s)", flush=True)
    all_results = {}
    for m in sorted(p.name for p in args.work.iterdir() if (p / "results").is_dir()):
        all_results[m] = [json.loads(f.read_text()) for f in sorted((args.work / m / "results").glob("*.json"))]
    args.out.mkdir(exist_ok=True)
    write_report(args.out, all_results, {"n_ctx": args.n_ctx, "windows": args.windows, "work": str(args.work)})
    print(f"wrote {args.out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
