#!/usr/bin/env python3
"""The default path (damage on the model's own text) against llama.cpp at every mix size.

    python scripts/bench_selfcal.py [--models mixtral qwen2moe] [--mixes Q2_K Q4_K_M] [--windows 24]

For each model (tests/fixtures/NAME, trained on real text) and each llama.cpp mix from IQ1_S to
Q6_K it writes, all from the same BF16 GGUF with llama.cpp's quantiser:

  stock           the mix without an importance matrix (llama.cpp refuses the IQ1/IQ2 mixes without one)
  stock+real      the mix with an importance matrix from real text (val split, prose and code)
  stock+self      the mix with the importance matrix from the model's own text
  default         alphaq's default: damage estimated on its own text, every tensor, full ladder
  real-driven     the same allocation and quantisation driven by real text (val split) instead:
                  the calibrated counterpart
  direct          the default with the damage measured directly for every type (ablation)
  fast, paper     AlphaQ without any forward pass (gamma 1 / App. A.7 gamma)

ablations (--variants): alpha-g1, alpha-gpaper (the default's damage times (alpha_tilde/alpha)^gamma,
gamma 1 and App. A.7's formula), experts-only (the default's damage, routed experts only, the rest on
the fast mode's policy types), no-imatrix (damage measured and files quantised without any importance
matrix), w4 / w2 / w1 (the damage measured on 4 / 2 / 1 of the 16 windows), a1 / a1w4 (depth anchors, alphaq.damage.anchors:
one block per tensor kind measured, the other block's damage interpolated from it; 16 / 4 windows), deep-default / deep-a4w16 /
deep-all (for models deeper than 4 blocks, --models DIR: the product's default when run (4 anchor blocks per kind on 4 windows, later 2; 8 anchors now); the same
on 16 windows; every block measured on 16 windows), deep-a4w2 / deep-a3w4 / deep-a3w2 (the cheaper depth settings:
4 anchors on 2 windows, 3 anchors on 4 and on 2; deep-a8w2: twice the anchors, for models much deeper than 8 blocks;
deep-a5w2 / deep-a6w2 / deep-a12w2 / deep-a16w2: 5, 6, 12 and 16 anchors on 2 windows, the spacing studies), mse64k (the default with the weighted errors on at most 64K
sampled weights per tensor instead of the default's DamageConfig.max_sampled_weights), domain-bias (the stock mix with an
importance matrix from prose only and from code only, next to the self and the mixed real one),
q8copy (the default's self text, importance matrix and damage all from a Q8_0 working copy of the model,
as --working-copy q8_0 does for models larger than RAM; the file is quantised from the BF16 model),
requantize (the product, alphaq.convert at --like MIX, given only a Q8_0 GGUF of the model, llama.cpp's Q8_0
mix, with --allow-requantize: every stage and the file's quantisation read the Q8_0 weights),
cheap-ladder (the default's damage, candidates restricted to the k-quants and Q8_0, --types
Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0: the types llama.cpp's quantiser writes fastest), capN (the default
under --max-quantise-ns N: the full ladder, the quantiser's estimated time capped at N ns per
weight), uncapped (the default without its auto cap on the quantiser's time, --max-quantise-ns
none: the default before that cap; every other damage variant carries the auto cap, as the
product does, alphaq.allocate.quantise_cap), expert (the default at --granularity expert: each expert slice of a merged expert tensor is
an item with its own type, its damage the tensor's measured damage shared out by the slices'
weighted errors; the file has expert groups, so a run with this variant re-starts itself under the
patched llama.cpp (ggml-patches/, convert/patched.py) and scores every file there, stock ones and the
tensor-granular default included); every cell also records each file's quantise cost per weight estimated from
alphaq/gguf/quantise_speed.json

every alphaq variant at no more than the stock file's size, and scores each against the BF16
model on the held-out test split (prose and code, tests/fixtures/heldout): mean KL per token,
per domain, with per-window values kept for paired standard errors. Results: bench/selfcal.json
(rebuilt report: bench/SELFCAL.md). Work files: .cache/bench-selfcal/NAME/ (reused).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alphaq.evaluate import baselines  # noqa: E402
from alphaq.damage import DamageConfig, Reference  # noqa: E402
from alphaq.damage.measure import measure  # noqa: E402
from alphaq.errors import AlphaQError  # noqa: E402
from alphaq.allocate.plan import MODES, PlanConfig, make_plan  # noqa: E402
from alphaq.allocate.quantise_cap import auto_capped_plan  # noqa: E402
from alphaq.gguf.qtypes import llama_quantizes, resolve_types  # noqa: E402
from alphaq.gguf.quantize import IMATRIX_MIXES, quantize_gguf  # noqa: E402

GRID = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K", "IQ3_XXS", "IQ3_S", "IQ3_M", "Q3_K_S",
        "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
DOMAINS = ("prose", "code")
# `--types` restricted to the k-quants and Q8_0: llama.cpp's quantiser writes them 2-25x faster per
# weight than the IQ types (alphaq/gguf/quantise_speed.json), at a quality cost the cheap-ladder variant measures
CHEAP_LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
# the weighted errors (alphaq.damage.measure) on fewer sampled weights per tensor than the default's 1M
SAMPLE_VARIANTS = {"mse64k": DamageConfig(max_sampled_weights=1 << 16)}
# the depth settings compared on a model deeper than 4 blocks (windows as the product picks them
# where a variant leaves them open): the product's, more windows, every block, and cheaper ones.
# "deep-default" is the product's setting when the run is made: 4 anchors on 4 windows in
# bench/selfcal-deep.json and bench/selfcal-deep-cheap.json, 4 anchors on 2 windows since f5fdb49
# (bench/selfcal-deep24.json), 8 anchors on 2 windows since that run (its deep-a8w2)
DEEP_VARIANTS = {"deep-default": DamageConfig(), "deep-a4w16": DamageConfig(anchors=4, n_windows=16),
                 "deep-all": DamageConfig(anchors=None), "deep-a4w2": DamageConfig(anchors=4, n_windows=2),
                 "deep-a3w4": DamageConfig(anchors=3, n_windows=4), "deep-a3w2": DamageConfig(anchors=3, n_windows=2),
                 "deep-a8w2": DamageConfig(anchors=8, n_windows=2),
                 # anchor spacing on the 24-block model: 24/5, 24/6 and 24/12 blocks apart (8 anchors at
                 # Qwen3-30B-A3B's 48 blocks stand 6.7 apart, between deep-a4w2's 8 and deep-a5w2's 6)
                 "deep-a5w2": DamageConfig(anchors=5, n_windows=2), "deep-a6w2": DamageConfig(anchors=6, n_windows=2),
                 "deep-a12w2": DamageConfig(anchors=12, n_windows=2),
                 # at 48 blocks: 16 anchors stand 3.2 blocks apart, as 8 do at 24
                 "deep-a16w2": DamageConfig(anchors=16, n_windows=2)}
# --fast with alpha from this many evenly spaced experts per merged tensor (--alpha-experts N): on
# the fixtures' 8 and 16 experts the sample is at least as noisy an estimate of a tensor's mean
# as the product's 16 of Qwen3-30B-A3B's 128 (finite-population standard error sqrt((1 - k/n) / k))
FAST_SAMPLE_VARIANTS = {"fast-e4": 4, "fast-e8": 8}
log = logging.getLogger("bench_selfcal")


class Model:
    def __init__(self, name: str, work: Path, n_ctx: int, windows: int, variants=()):
        from alphaq.evaluate.perplexity import load_llama, reference_run
        from alphaq.model.weights import converter_mtp_args
        from convert.hf_to_gguf import convert_hf

        self.name, self.work, self.n_ctx, self.variants = name, work, n_ctx, tuple(variants)
        # a fixture name, or the folder of another trained HF model (e.g. an 8-block bench model)
        self.hf = Path(name) if Path(name).is_dir() else ROOT / "tests" / "fixtures" / name
        work.mkdir(parents=True, exist_ok=True)
        self.bf16 = work / "bf16.gguf"
        if not self.bf16.exists():
            convert_hf(self.hf, self.bf16, extra=converter_mtp_args(self.hf))
        self.fm = baselines.FloatModel.open(self.bf16)
        ref = load_llama(self.bf16, n_ctx)
        self.refs = {d: reference_run(ref, (ROOT / "tests/fixtures/heldout" / f"{d}.txt").read_text(errors="replace"),
                                      name=d, n_ctx=n_ctx, max_windows=windows) for d in DOMAINS}
        self.names = [t.name for t in self.fm.tensors if llama_quantizes(t.name, t.shape)]
        self.seconds: dict[str, float] = {}
        self._calibrate()

    def _real_text(self, domain: str | None = None) -> str:
        from alphaq.evaluate.corpus import read_text

        if domain is not None:  # one domain only (the domain-bias study)
            return read_text(domain, "val", max_chars=80_000)
        prose, code = read_text("prose", "val", max_chars=80_000), read_text("code", "val", max_chars=80_000)
        step = 2_000  # interleaved: windows are read from the start, a concatenation would be all prose
        return "\n\n".join(p for i in range(0, max(len(prose), len(code)), step)
                           for p in (prose[i:i + step], code[i:i + step]) if p)

    def _calibrate(self) -> None:
        """Self text and real text: importance matrices and damage tables (estimate and direct)."""
        from alphaq.evaluate.perplexity import load_llama, windows
        from alphaq.runtime.forward import Session
        from alphaq.importance.collect import collect_imatrix
        from alphaq.selftext import SelfTextConfig, cached_sample

        t0 = time.perf_counter()
        self_tokens = cached_sample(self.bf16, SelfTextConfig())
        self.seconds["self_text"] = time.perf_counter() - t0
        llm = load_llama(self.bf16, self.n_ctx)
        real_tokens = np.array(windows(llm, self._real_text(), self.n_ctx, 16), dtype=np.int32)
        domain_tokens = {d: np.array(windows(llm, self._real_text(d), self.n_ctx, 16), dtype=np.int32)
                         for d in DOMAINS} if "domain-bias" in self.variants else {}
        del llm
        types = resolve_types(MODES["damage"]["types"])
        self.imatrix, self.damage = {}, {}
        with Session(self.bf16, self.n_ctx) as s:
            for d, toks in domain_tokens.items():  # prose-only and code-only importance (no damage table)
                self.imatrix[d] = collect_imatrix(s, toks).means()
            for src, toks in (("self", self_tokens), ("real", real_tokens)):
                t0 = time.perf_counter()
                im = collect_imatrix(s, toks)
                self.seconds[f"importance_{src}"] = time.perf_counter() - t0
                self.imatrix[src] = im.means()
                if src == "self":
                    self.counts_self = im.counts
                ref = Reference(s, toks[:16])
                methods = ("estimate", "direct") if src == "self" and "direct" in self.variants else ("estimate",)
                for method in methods:
                    t0 = time.perf_counter()
                    self.damage[(src, method)] = measure(s, ref, self.names, types, DamageConfig(method=method),
                                                         imatrix=self.imatrix[src], tokens=im.counts).costs
                    self.seconds[f"damage_{src}_{method}"] = time.perf_counter() - t0
            for n in (4, 2, 1):  # the damage measured on n windows instead of 16 (16/n x cheaper)
                if f"w{n}" in self.variants:
                    self.damage[("self", f"w{n}")] = measure(s, Reference(s, self_tokens[:n]), self.names, types,
                                                             DamageConfig(n_windows=n), imatrix=self.imatrix["self"],
                                                             tokens=self.counts_self).costs
            for v, cfg, n in (("a1", DamageConfig(anchors=1), 16), ("a1w4", DamageConfig(anchors=1), 4)):
                if v in self.variants:  # one anchor block per kind: the other block's damage interpolated
                    self.damage[("self", v)] = measure(s, Reference(s, self_tokens[:n]), self.names, types, cfg,
                                                       imatrix=self.imatrix["self"], tokens=self.counts_self).costs
            for v, cfg in {**DEEP_VARIANTS, **SAMPLE_VARIANTS}.items():
                if v in self.variants:  # depth or sample settings (windows as the product picks them)
                    n = cfg.windows(self.names)
                    self.damage[("self", v)] = measure(s, Reference(s, self_tokens[:n]), self.names, types, cfg,
                                                       imatrix=self.imatrix["self"], tokens=self.counts_self).costs
            if "expert" in self.variants:  # one item per expert slice (expert granularity)
                self.damage[("self", "expert")] = measure(s, Reference(s, self_tokens[:16]), self.names, types,
                                                          DamageConfig(), imatrix=self.imatrix["self"],
                                                          tokens=self.counts_self, per_expert=True).costs
            if "no-imatrix" in self.variants:
                self.damage[("none", "estimate")] = measure(s, Reference(s, self_tokens[:16]), self.names, types,
                                                            DamageConfig()).costs
        if "q8copy" in self.variants:  # the product's forward stages on a Q8_0 working copy (--working-copy q8_0)
            from alphaq.damage.run import self_calibrate

            t0 = time.perf_counter()
            calib = self_calibrate(self.bf16, self.names, types, working_copy="q8_0", work_dir=self.work)
            self.seconds["q8copy_stages"] = time.perf_counter() - t0
            self.imatrix["q8copy"], self.damage[("q8copy", "estimate")] = calib.imatrix.means(), calib.damage.costs

    # -- files --------------------------------------------------------------------------------------

    def stock(self, mix: str, imatrix: str | None) -> Path | None:
        out = self.work / f"stock-{mix}{'+' + imatrix if imatrix else ''}.gguf"
        if imatrix is None and mix in IMATRIX_MIXES:
            return None  # llama.cpp refuses
        if not out.exists():
            try:
                baselines.stock(self.fm, out, mix, imatrix=self.imatrix[imatrix] if imatrix else None)
            except RuntimeError as exc:  # llama.cpp refuses some mixes without an importance matrix
                log.info("%s stock %s: %s", self.name, mix, exc)
                return None
        return out

    def alphaq(self, variant: str, mix: str, size: int) -> Path | None:
        out = self.work / f"{variant}@{mix}.gguf"
        if out.exists():
            return out
        if variant == "requantize":
            return self._requantised(mix, size, out)
        src, method = {"default": ("self", "estimate"), "real-driven": ("real", "estimate"),
                       "direct": ("self", "direct"), "no-imatrix": ("none", "estimate"), "alpha-g1": ("self", "estimate"),
                       "alpha-gpaper": ("self", "estimate"), "experts-only": ("self", "estimate"), "w4": ("self", "w4"),
                       "w2": ("self", "w2"), "w1": ("self", "w1"),
                       "a1": ("self", "a1"), "a1w4": ("self", "a1w4"), "deep-default": ("self", "deep-default"),
                       **{v: ("self", v) for v in (*DEEP_VARIANTS, *SAMPLE_VARIANTS)},
                       "cheap-ladder": ("self", "estimate"),
                       "q8copy": ("q8copy", "estimate"), "expert": ("self", "expert"),
                       "uncapped": ("self", "estimate")}.get(variant, ("self", "estimate") if variant.startswith("cap")
                                                             else (None, None))
        try:
            if src is not None:
                changes = {"alpha-g1": dict(gamma=1.0), "alpha-gpaper": dict(gamma=None),
                           "experts-only": dict(allocate="experts"), "cheap-ladder": dict(types=CHEAP_LADDER),
                           "expert": dict(granularity="expert")}.get(variant, dict(max_quantise_ns=float(variant[3:])) if variant.startswith("cap") else {})
                cfg = replace(PlanConfig(**MODES["damage"]), budget_mode="size", budget=float(size), **changes)
                stats = self.spectral() if "gamma" in changes or "allocate" in changes else []
                grouped = cfg.granularity == "expert"  # expert groups: format keys in the header, the groups writer
                header = baselines.expert_header_bytes(self.fm) if grouped else self.fm.header
                def solve(c: PlanConfig):
                    return make_plan(stats, self.fm.tensors, c, fixed_bytes=header, damage=self.damage[(src, method)])

                # the product's auto cap on the quantiser's time, except where a variant sets its own
                own_cap = variant == "uncapped" or variant.startswith("cap")
                # (the cell's size is llama.cpp's mix: the product's --like MIX)
                plan = solve(cfg) if own_cap else auto_capped_plan(solve, cfg, self.bf16, like=mix)[0]
                if grouped:
                    baselines.write_expert_plan(self.fm, plan, out, imatrix=self.imatrix[src])
                else:
                    quantize_gguf(self.bf16, out, plan.tensor_types(), imatrix=self.imatrix.get(src))
            else:  # fast and paper: plans from alpha, no importance matrix
                mode, experts = ("fast", FAST_SAMPLE_VARIANTS[variant]) if variant in FAST_SAMPLE_VARIANTS else (variant, None)
                # the fast mode again, under another file name: beside "fast" files cached by an earlier
                # commit, what the plan's code of now makes (bench/selfcal-fast-twins.json)
                mode = "fast" if variant == "fast-now" else mode
                cfg = replace(PlanConfig(**MODES[mode]), budget_mode="size", budget=float(size))
                plan = baselines.solve(self.fm, self.spectral(experts), cfg)
                baselines.write_plan(self.fm, plan, out)
        except AlphaQError as exc:
            log.info("%s %s@%s: %s", self.name, variant, mix, exc)
            return None
        return out

    def _requantised(self, mix: str, size: int, out: Path) -> Path | None:
        """The product end to end (alphaq.convert, the default mode) on a Q8_0 GGUF of the model
        (llama.cpp's Q8_0 mix of the BF16 one), as --allow-requantize takes it: every stage reads the
        Q8_0 weights, the file is quantised from them."""
        import alphaq

        q8 = self.work / "q8_0.gguf"
        if not q8.exists():
            baselines.stock(self.fm, q8, "Q8_0")
        try:
            alphaq.convert(q8, out, like=mix, allow_requantize=True, progress=False)
        except AlphaQError as exc:
            log.info("%s requantize@%s: %s", self.name, mix, exc)
            return None
        assert out.stat().st_size <= size, (out, size)  # llama.cpp's mix from the Q8_0 is the BF16's size
        return out

    def spectral(self, max_experts: int | None = None):
        """Every matrix's statistics, or those of ``max_experts`` evenly spaced experts per merged tensor."""
        if not hasattr(self, "_stats"):
            self._stats = {}
        if max_experts not in self._stats:
            from alphaq.spectral.alpha import SpectralConfig
            from alphaq.spectral.analyze import analyze_model

            self._stats[max_experts] = analyze_model(self.bf16, SpectralConfig(max_experts=max_experts), progress=False)
        return self._stats[max_experts]

    # -- scoring ------------------------------------------------------------------------------------

    def score(self, path: Path) -> dict:
        from alphaq.evaluate.perplexity import load_llama, window_logprobs

        llm = load_llama(path, self.n_ctx)
        out = {"bytes": path.stat().st_size}
        first = self.n_ctx // 2
        pos = np.arange(first - 1, self.n_ctx - 1)
        for d, run in self.refs.items():
            kls = []
            for chunk, lq in zip(run.chunks, run.logprobs):
                lp = window_logprobs(llm, list(chunk))[pos]
                kls.append(float((np.exp(lq) * (lq - lp)).sum(axis=1).mean()))
            out[d] = kls
        return out


def run_model(name: str, args) -> dict:
    m = Model(name, ROOT / ".cache" / "bench-selfcal" / Path(name).name, args.n_ctx, args.windows, args.variants)
    res = {"seconds": m.seconds, "cells": {}}
    for mix in args.mixes:
        cell = {}
        files = {"stock": m.stock(mix, None), "stock+real": m.stock(mix, "real"), "stock+self": m.stock(mix, "self")}
        if args.no_stock:
            files = {k: v for k, v in files.items() if k == "stock+real"}
        if "domain-bias" in args.variants:  # the mix with importance from one real domain only
            files.update({f"stock+{d}": m.stock(mix, d) for d in DOMAINS})
        size = files["stock+real"].stat().st_size
        for v in args.variants:
            if v != "domain-bias":
                files[v] = m.alphaq(v, mix, size)
        for v, path in files.items():
            cell[v] = m.score(path) if path is not None else None
            if cell[v] is not None:  # what llama.cpp's quantiser would spend on this file's types
                cell[v]["quantise_ns_per_weight"] = quantise_rate(path, imatrix=v != "stock")
        cell["stock_bytes"] = size
        res["cells"][mix] = cell
        log.info("%s %s: %s", name, mix, {v: None if c is None else round(mean_kl(c), 5) for v, c in cell.items()
                                           if isinstance(c, dict)})
    return res


def quantise_rate(path: Path, imatrix: bool) -> float:
    """Mean ns per weight that llama.cpp's quantiser takes for this file's quantised tensors, one
    thread, from alphaq/gguf/quantise_speed.json (an estimate from per-type rates, not a timing of
    this file; the plan's totals.quantise_ns_per_weight is the same estimate)."""
    from gguf import GGUFReader

    from alphaq.gguf.speed import mean_quantise_ns

    quantised = [(int(t.n_elements), t.tensor_type) for t in GGUFReader(path).tensors
                 if llama_quantizes(t.name, tuple(int(d) for d in reversed(t.shape)))]  # not the F32 norms it copies
    return mean_quantise_ns(quantised, imatrix) if quantised else 0.0


def mean_kl(c: dict) -> float:
    return float(np.mean([np.mean(c[d]) for d in DOMAINS]))


def _under_patched_runtime() -> None:
    """Re-start this script with the patched llama_cpp first on its path (expert-granular files
    load only there); every file of the run is then scored by the same runtime."""
    import os

    from alphaq.runtime.isolated import child_env, patched_loaded

    if patched_loaded():
        return
    from convert.patched import patched_site

    env = child_env(patched_site())
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mixtral", "qwen2moe", "qwen3moe", "deepseek2"])
    p.add_argument("--mixes", nargs="+", default=list(GRID))
    p.add_argument("--variants", nargs="+", default=["default", "real-driven", "direct", "fast", "paper"])
    p.add_argument("--windows", type=int, default=24, help="evaluation windows per domain")
    p.add_argument("--n-ctx", type=int, default=256)
    p.add_argument("--no-stock", action="store_true", help="score only stock+real among the stock files (ablation runs)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "selfcal.json")
    args = p.parse_args()
    if "expert" in args.variants:
        _under_patched_runtime()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.models:
        results[name] = run_model(name, args)
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
