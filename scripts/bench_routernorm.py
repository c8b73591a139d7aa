#!/usr/bin/env python3
"""Router-norm baseline (paper 004) vs AlphaQ, both at expert granularity, at llama.cpp's mix sizes.

    python scripts/bench_routernorm.py [--models mixtral-bench ...] [--mixes Q2_K Q3_K_M Q4_K_M] [--windows 8]
    python scripts/bench_routernorm.py --report-only     # table + bench/routernorm.json from the cache

For each benchmark model (.cache/zoo/NAME; BF16 GGUF .cache/bench/NAME/bf16.gguf, made by
scripts/bench_eval.py or here) and stock mix MIX, every variant below gets target size = the stock
mix's actual file size (as ``alphaq@MIX`` in bench_eval.py), the same candidates (IQ1_S…Q4_K),
the same non-expert policy and the same knapsack (alphaq.allocate.plan); they differ only in the cost:

  stock@MIX             llama.cpp's own mix (reference point; run in the patched runtime too)
  routernorm@MIX        paper 004 as we read its abstract: router-norm change Δ_e and max row
                        variance v_e -> importance x Var·2^(-2b) (alphaq.evaluate.baselines.RouterNormConfig)
  routernorm-delta@MIX  ablation: Δ_e only (no v_e promotion)
  routernorm-var@MIX    ablation: v_e promotion only (no Δ_e term)
  alphaq-g1@MIX         AlphaQ, γ = 1 (the repository default), expert granularity
  alphaq-g0@MIX         AlphaQ, γ = 0 (no α: importance 1), expert granularity
  alphaq-tensor-g1@MIX  AlphaQ γ = 1 at tensor granularity (a stock file), for the link to RESULTS.md
  pmq@MIX               PMQ-style (MC-MoE), calibrated: routing frequency x the quantisation loss on
                        val text (imatrix-weighted ggml error) per expert, per-block knapsack
  pmq-prose@MIX, pmq-code@MIX  the same calibrated on one domain only (the domain-bias check)

Every file is run by the patched llama-cpp-python (ggml-patches/, convert.patched; it runs stock
files bit-for-bit as stock does) in a child process; the BF16 reference by the stock one. Protocol
as bench_eval.py: n_ctx 256, --windows windows per domain of the held-out test split
(tests/fixtures/heldout/{prose,code}.txt), second half of each window scored; KL(BF16 || model)
per scored token, perplexity, top-1 agreement, and the KL of every window, so that two variants
can be compared paired on the same windows. Variant results are cached in
.cache/bench/NAME/routernorm/results/VARIANT.json (an interrupted run resumes); a file that is
byte-identical to one already evaluated (same sha256) reuses that result.

--types replaces the candidates of every knapsack variant (e.g. add Q5_K Q6_K so that the Q4_K_M
size binds; with the default IQ1_S…Q4_K the largest plan, all-Q4_K, is smaller than Q4_K_M); those
results are cached as VARIANT~TYPES and shown as separate rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_expert import bf16_of, scores, tokens_of

from alphaq.evaluate import baselines

from alphaq.runtime import isolated as runtime
from alphaq.errors import AlphaQError
from alphaq.gguf.expert import read_layouts
from alphaq.allocate.plan import PlanConfig, make_plan
from alphaq.gguf.qtypes import DEFAULT_CANDIDATES

DOMAINS = ("prose", "code")
MIXES = ("Q2_K", "Q3_K_M", "Q4_K_M")  # bench_eval.CAL_MIXES
# variant kind -> (what it is, how its plan is made); order = evaluation order
KINDS = {
    "routernorm": "router-norm (paper 004 reading), expert",
    "alphaq-g1": "AlphaQ γ=1, expert",
    "alphaq-g0": "AlphaQ γ=0, expert",
    "stock": "llama.cpp stock mix",
    "routernorm-delta": "router-norm, Δ only, expert",
    "routernorm-var": "router-norm, v only, expert",
    "alphaq-tensor-g1": "AlphaQ γ=1, tensor",
    "pmq": "PMQ-style (calibrated, both domains), expert",
    "pmq-prose": "PMQ-style calibrated on prose, expert",
    "pmq-code": "PMQ-style calibrated on code, expert",
}
ROUTERNORM_ABLATIONS = {
    "routernorm": baselines.RouterNormConfig(),
    "routernorm-delta": baselines.RouterNormConfig(promote_bits=0.0),
    "routernorm-var": baselines.RouterNormConfig(spread_bits=0.0),
}

log = logging.getLogger("bench_routernorm")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Bench:
    """One benchmark model: its BF16 GGUF, statistics, reference log-probs and cached results."""

    def __init__(self, name: str, zoo: Path, work: Path, n_ctx: int, windows: int, threads: int,
                 types: tuple[str, ...] = DEFAULT_CANDIDATES):
        from alphaq.spectral.analyze import analyze_model
        from convert.patched import ensure_site

        self.name, self.hf_dir, self.n_ctx, self.windows, self.threads = name, zoo / name, n_ctx, windows, threads
        self.types = tuple(types)
        self.tag = "" if self.types == tuple(DEFAULT_CANDIDATES) else "~" + "-".join(self.types)
        self.bench_dir = work / name  # bench_eval.py's files (bf16.gguf, stock-MIX.gguf)
        self.dir = self.bench_dir / "routernorm"
        (self.dir / "results").mkdir(parents=True, exist_ok=True)
        self.bf16 = bf16_of(name, zoo, work)
        self.fm = baselines.FloatModel.open(self.bf16)
        self.stats = analyze_model(self.bf16, progress=False)
        self.site = ensure_site()  # the cached patched build; never rebuilt here
        self.texts = {d: ROOT / "tests" / "fixtures" / "heldout" / f"{d}.txt" for d in DOMAINS}
        self._ref = self._tokens = None
        self._measured: dict = {}  # calibration domain -> measured loss table (pmq kinds)

    def reference(self):
        if self._ref is None:
            self._tokens = {d: tokens_of(self.bf16, t, self.n_ctx, self.windows) for d, t in self.texts.items()}
            self._ref = {}
            for d, t in self.texts.items():
                path = self.dir / f"ref-{d}-w{self.windows}.npy"
                self._ref[d] = runtime.logprobs(None, self.bf16, t, self.n_ctx, self.windows, path)
        return self._ref, self._tokens

    def stock_file(self, mix: str) -> Path:
        path = self.bench_dir / f"stock-{mix}.gguf"
        if not path.exists():
            baselines.stock(self.fm, path, mix, nthread=self.threads)
        return path

    def plan(self, kind: str, target: int):
        granularity = "tensor" if kind == "alphaq-tensor-g1" else "expert"
        cfg = PlanConfig(budget_mode="size", budget=float(target), granularity=granularity, types=self.types)
        header = baselines.expert_header_bytes(self.fm) if granularity == "expert" else self.fm.header
        if kind.startswith("pmq"):
            from bench_eval import calibration_imatrix

            domain = kind.partition("-")[2] or None
            imat, tokens = calibration_imatrix(self.hf_dir, self.bf16, self.fm, self.bench_dir, domain)
            if domain not in self._measured:
                self._measured[domain] = baselines.measure_table(
                    self.fm, self.stats, dataclasses.replace(cfg, noise="measured"), imatrix=imat)
            return baselines.frequency_plan(self.fm, self.stats, cfg, tokens, self._measured[domain], fixed_bytes=header)
        if kind in ROUTERNORM_ABLATIONS:
            return baselines.router_norm_plan(self.fm, self.stats, cfg, self.hf_dir, ROUTERNORM_ABLATIONS[kind],
                                              fixed_bytes=header)
        gamma = {"alphaq-g1": 1.0, "alphaq-g0": 0.0, "alphaq-tensor-g1": 1.0}[kind]
        return make_plan(self.stats, self.fm.tensors, dataclasses.replace(cfg, gamma=gamma),
                                   fixed_bytes=header)

    def produce(self, kind: str, mix: str) -> tuple[Path, dict]:
        stock = self.stock_file(mix)
        if kind == "stock":
            return stock, {}
        target = stock.stat().st_size
        plan = self.plan(kind, target)
        out = self.dir / f"{kind}@{mix}{self.tag}.gguf"
        baselines.write_expert_plan(self.fm, plan, out, nthread=self.threads)
        if out.stat().st_size > target:
            raise RuntimeError(f"{out.name}: {out.stat().st_size} B is over the target {target} B")
        return out, {"target_bytes": target, "predicted_bytes": plan.totals.predicted_file_bytes,
                     "expert_types": dict(Counter(it.type.name for it in plan.items)),
                     "expert_true_bpw": plan.totals.true_bpw, "grouped_tensors": len(read_layouts(out))}

    def run(self, kind: str, mix: str, by_hash: dict[str, dict]) -> dict:
        variant = f"{kind}@{mix}{self.tag}"
        cache = self.dir / "results" / f"{variant}.json"
        if cache.exists():
            res = json.loads(cache.read_text())
            by_hash.setdefault(res.get("sha256", ""), res)
            return res
        t0 = time.time()
        try:
            path, info = self.produce(kind, mix)
        except AlphaQError as e:
            res = {"model": self.name, "variant": variant, "kind": kind, "mix": mix, "types": list(self.types),
                   "error": str(e)}
            cache.write_text(json.dumps(res, indent=1))
            return res
        digest = sha256(path)
        res = {"model": self.name, "variant": variant, "kind": kind, "mix": mix, "types": list(self.types),
               "file_bytes": path.stat().st_size, "sha256": digest, "info": info}
        same = by_hash.get(digest)
        if same is not None:  # byte-identical file: the deterministic runtime gives the same numbers
            res.update(domains=same["domains"], same_file_as=same["variant"])
        else:
            ref, toks = self.reference()
            res["domains"] = {}
            for d, text in self.texts.items():
                npy = self.dir / f"lp-{d}.npy"
                lp = runtime.logprobs(self.site, path, text, self.n_ctx, self.windows, npy)
                npy.unlink()
                res["domains"][d] = {**scores(lp, ref[d], toks[d]), "kl_windows": window_kl(lp, ref[d]),
                                     "n_scored": int(toks[d][:, self.n_ctx // 2:].size)}
            by_hash[digest] = res
        res["seconds"] = time.time() - t0
        cache.write_text(json.dumps(res, indent=1))
        if path.parent == self.dir:
            path.unlink()  # cheap to rebuild; the result is cached
        return res


def window_kl(lp: np.ndarray, ref: np.ndarray) -> list[float]:
    """Mean KL(ref || lp) over the scored half of each window (the positions bench_expert.scores uses)."""
    n_ctx = lp.shape[1]
    pos = slice(n_ctx // 2 - 1, n_ctx - 1)
    q, p = ref[:, pos].astype(np.float64), lp[:, pos].astype(np.float64)
    return [float(x) for x in (np.exp(q) * (q - p)).sum(-1).mean(-1)]


def mean_kl(r: dict) -> float:
    return sum(r["domains"][d]["kl"] for d in DOMAINS) / len(DOMAINS)


def row_label(r: dict) -> str:
    types = r.get("types", list(DEFAULT_CANDIDATES))
    return r["mix"] if types == list(DEFAULT_CANDIDATES) else f"{r['mix']} (candidates {'/'.join(types)})"


def table(rows: list[dict], kinds: list[str]) -> str:
    """Mean KL (file MiB) per model x mix x variant kind."""
    by = {(r["model"], row_label(r), r["kind"]): r for r in rows if "error" not in r}
    shown = [k for k in kinds if any(k == r["kind"] for r in by.values())]
    lines = ["| model | mix | " + " | ".join(KINDS[k] for k in shown) + " |", "|---|---|" + "---|" * len(shown)]
    for model in dict.fromkeys(r["model"] for r in rows):
        for label in dict.fromkeys(row_label(r) for r in rows if r["model"] == model):
            cells = []
            for k in shown:
                r = by.get((model, label, k))
                cells.append("—" if r is None else f"{mean_kl(r):.4f} ({r['file_bytes'] / 2**20:.2f})")
            lines.append(f"| {model.removesuffix('-bench')} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean and standard error of KL(a) - KL(b) over the windows of both domains (same windows)."""
    d = np.array([x - y for dom in DOMAINS
                  for x, y in zip(a["domains"][dom]["kl_windows"], b["domains"][dom]["kl_windows"], strict=True)])
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))


def paired_table(rows: list[dict], pairs: list[tuple[str, str]]) -> str:
    """KL(a) - KL(b) ± 1 SE, paired over windows, for each (a, b) in pairs."""
    by = {(r["model"], row_label(r), r["kind"]): r for r in rows if "error" not in r}
    lines = ["| model | mix | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |", "|---|---|" + "---|" * len(pairs)]
    for model, label in dict.fromkeys((m, lab) for m, lab, _ in by):
        cells = []
        for a, b in pairs:
            ra, rb = by.get((model, label, a)), by.get((model, label, b))
            if ra is None or rb is None or "kl_windows" not in ra["domains"]["prose"]:
                cells.append("—")
            elif ra["sha256"] == rb["sha256"]:
                cells.append("same file")
            else:
                m, se = paired(ra, rb)
                cells.append(f"{m:+.4f} ± {se:.4f}")
        lines.append(f"| {model.removesuffix('-bench')} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mixtral-bench", "qwen2moe-bench", "qwen3moe-bench"])
    ap.add_argument("--mixes", nargs="+", default=list(MIXES))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--zoo", type=Path, default=ROOT / ".cache" / "zoo")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8, help="windows per domain (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="quantiser threads")
    ap.add_argument("--types", nargs="+", default=list(DEFAULT_CANDIDATES),
                    help="candidate types of the knapsack variants (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "routernorm.json")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    rows = []
    if not args.report_only:
        benches = {m: Bench(m, args.zoo, args.work, args.n_ctx, args.windows, args.threads, args.types)
                   for m in args.models}
        by_hash: dict[str, dict[str, dict]] = {m: {} for m in args.models}
        for kind in args.kinds:  # every model's main variants before any ablation
            for m, bench in benches.items():
                for mix in args.mixes:
                    t = time.time()
                    r = bench.run(kind, mix, by_hash[m])
                    msg = r.get("error") or (f"{r['file_bytes']:,} B, KL prose {r['domains']['prose']['kl']:.4f} "
                                             f"code {r['domains']['code']['kl']:.4f}"
                                             + (f" (= {r['same_file_as']})" if "same_file_as" in r else ""))
                    print(f"{m} {r['variant']}: {msg} ({time.time() - t:.0f}s)", flush=True)
    for m in args.models:
        for f in sorted((args.work / m / "routernorm" / "results").glob("*.json")):
            rows.append(json.loads(f.read_text()))
    order = {k: i for i, k in enumerate(KINDS)}
    mix_order = {x: i for i, x in enumerate(args.mixes)}
    rows = [r for r in rows if r["mix"] in mix_order]
    rows.sort(key=lambda r: (args.models.index(r["model"]), mix_order[r["mix"]], len(r.get("types", ())),
                             order[r["kind"]]))
    meta = {"n_ctx": args.n_ctx, "windows": args.windows, "scored_tokens_per_domain": args.n_ctx // 2 * args.windows,
            "runtime": "patched llama-cpp-python 0.3.36 (ggml-patches), BF16 reference in the stock one",
            "routernorm": {k: dataclasses.asdict(c) for k, c in ROUTERNORM_ABLATIONS.items()}}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"\nMean KL(BF16 || model) over prose and code, nats/token (file size MiB); "
          f"n_ctx {args.n_ctx}, {args.windows} windows per domain\n")
    print(table(rows, list(KINDS)))
    print("\nPaired differences of mean KL on the same windows (negative: the first is better), ± 1 standard "
          f"error over {2 * args.windows} windows\n")
    print(paired_table(rows, [("routernorm", "alphaq-g1"), ("routernorm", "alphaq-g0"), ("alphaq-g1", "alphaq-g0"),
                              ("routernorm-delta", "alphaq-g0"), ("routernorm-var", "alphaq-g0")]))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
