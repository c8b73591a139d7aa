#!/usr/bin/env python3
"""Sensitivity check (paper App. A.5, Fig. 10) at tensor granularity on stock llama.cpp.

    python scripts/bench_sensitivity.py [--model mixtral-bench] [--windows 8] [--type Q2_K]

Base model: every quantisable tensor Q8_0 (near-lossless, and a type llama.cpp runs everywhere;
BF16 would leave the rest exactly as trained but we want one runtime path for all variants).
Each variant quantises ONE routed-expert tensor (all experts of one blk.N.ffn_{gate,up,down}_exps)
to --type and keeps the rest at Q8_0. Degradation = ppl(variant) − ppl(base) and KL(base ||
variant), averaged over both held-out domains. It is correlated (Spearman) with
  * mean α of the tensor's expert slices (AlphaQ: lower α = more important, so expect ρ < 0),
  * the paper's noise Σ_e Var_e·2^(−2b) (importance-free),
  * the α-scaled noise Σ_e (α̃/α_e)^γ Var_e·2^(−2b) for γ = App. A.7 default, 1 and 2
    (α̃ = median over all expert slices of the model, as in the plan).
Expert-granular sensitivity (the paper's per-expert points) needs a per-expert runtime: not done.
Writes bench/sensitivity-MODEL.json and bench/sensitivity-MODEL.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf import GGMLQuantizationType

from alphaq.evaluate import baselines
from alphaq.allocate.costs import importance_weights
from alphaq.allocate.plan import llama_quantizes
from alphaq.gguf.qtypes import nominal_bits

DOMAINS = ("prose", "code")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mixtral-bench")
    p.add_argument("--work", type=Path, default=ROOT / ".cache/bench")
    p.add_argument("--out", type=Path, default=ROOT / "bench")
    p.add_argument("--type", default="Q2_K")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--n-ctx", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    from alphaq.spectral.analyze import analyze_model

    work = args.work / args.model / "sensitivity"
    work.mkdir(parents=True, exist_ok=True)
    bf16 = args.work / args.model / "bf16.gguf"
    if not bf16.exists():
        from convert.hf_to_gguf import convert_hf

        convert_hf(ROOT / ".cache/zoo" / args.model, bf16)
    fm = baselines.FloatModel.open(bf16)
    stats = analyze_model(bf16, progress=False)
    base_types = {t.name: GGMLQuantizationType.Q8_0 for t in fm.tensors if llama_quantizes(t.name, t.shape)}
    refs, base_ppl = base_reference(args, bf16, work, base_types)

    experts = [s for s in stats if s.is_expert]
    by_tensor: dict[str, list] = {}
    for s in experts:
        by_tensor.setdefault(s.tensor, []).append(s)
    gammas = {"default": importance_weights(experts, None).gamma, "1": 1.0, "2": 2.0}
    weights = {g: dict(zip([(s.tensor, s.expert) for s in experts], importance_weights(experts, v).weights))
               for g, v in gammas.items()}
    rows = []
    cache = work / f"results-{args.type}-{args.windows}.json"
    done = {r["tensor"]: r for r in json.loads(cache.read_text())} if cache.exists() else {}
    for name, slices in by_tensor.items():
        if name in done:
            rows.append(done[name])
            continue
        t0 = time.time()
        row = measure_tensor(args, bf16, work, base_types, refs, base_ppl, name, slices, weights)
        rows.append(row)
        cache.write_text(json.dumps(rows, indent=1))
        print(f"{name}: dppl {row['dppl']:+.4f} KL {row['kl']:.5f} alpha {row['alpha_mean']:.3f} "
              f"({time.time() - t0:.0f}s)", flush=True)

    corr = correlations(rows, ["alpha_mean", "noise"] + [f"scaled_noise_g{g}" for g in gammas])
    doc = {"model": args.model, "type": args.type, "windows": args.windows, "n_ctx": args.n_ctx,
           "base": "all quantisable tensors Q8_0", "base_ppl": base_ppl, "gammas": gammas,
           "spearman": corr, "rows": rows}
    args.out.mkdir(exist_ok=True)
    (args.out / f"sensitivity-{args.model}.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(rows, corr, args)
    for target, by_pred in corr.items():
        print(target, {k: round(v["rho"], 3) for k, v in by_pred.items()})
    return 0


def base_reference(args, bf16: Path, work: Path, base_types: dict) -> tuple[dict, dict[str, float]]:
    """The all-Q8_0 base model's reference run per domain and its perplexity on the scored halves."""
    from alphaq.evaluate.perplexity import load_llama, reference_run

    base = work / "base-q8_0.gguf"
    if not base.exists():
        from alphaq.gguf.quantize import quantize_gguf

        quantize_gguf(bf16, base, base_types, nthread=args.threads)
    texts = {d: (ROOT / "tests/fixtures/heldout" / f"{d}.txt").read_text(errors="replace") for d in DOMAINS}
    base_llm = load_llama(base, args.n_ctx, n_threads=args.threads)
    refs = {d: reference_run(base_llm, texts[d], name=d, n_ctx=args.n_ctx, max_windows=args.windows) for d in DOMAINS}
    half = args.n_ctx // 2
    base_ppl = {d: float(np.exp(-np.mean([lq[np.arange(len(c) - half), np.asarray(c[half:])].mean()
                                           for c, lq in zip(refs[d].chunks, refs[d].logprobs)]))) for d in DOMAINS}
    del base_llm
    return refs, base_ppl


def measure_tensor(args, bf16: Path, work: Path, base_types: dict, refs: dict, base_ppl: dict, name: str,
                   slices: list, weights: dict) -> dict:
    """One expert tensor at --type, the rest Q8_0: its degradation and the predictors' values."""
    from alphaq.evaluate.perplexity import evaluate_vs_reference, load_llama
    from alphaq.gguf.quantize import quantize_gguf

    qt = GGMLQuantizationType[args.type]
    b = nominal_bits(qt)
    out = work / f"{name.removesuffix('.weight')}-{args.type}.gguf"
    if not out.exists():
        quantize_gguf(bf16, out, {**base_types, name: qt}, nthread=args.threads)
    llm = load_llama(out, args.n_ctx, n_threads=args.threads)
    rep = {d: evaluate_vs_reference(llm, refs[d]) for d in DOMAINS}
    del llm
    out.unlink()  # 24 near-full-size files are not worth keeping
    return {
        "tensor": name, "alpha_mean": float(np.mean([s.alpha for s in slices])),
        "noise": float(sum(s.variance * 2.0 ** (-2 * b) for s in slices)),
        **{f"scaled_noise_g{g}": float(sum(w[(s.tensor, s.expert)] * s.variance * 2.0 ** (-2 * b) for s in slices))
           for g, w in weights.items()},
        "dppl": float(np.mean([rep[d].ppl - base_ppl[d] for d in DOMAINS])),
        "kl": float(np.mean([rep[d].kl for d in DOMAINS])),
        "per_domain": {d: {"ppl": rep[d].ppl, "kl": rep[d].kl} for d in DOMAINS},
    }


def correlations(rows: list[dict], predictors: list[str]) -> dict:
    """Spearman's rho (and p) of each predictor against each degradation measure."""
    from scipy.stats import spearmanr

    corr = {}
    for target in ("dppl", "kl"):
        y = [r[target] for r in rows]
        corr[target] = {}
        for pred in predictors:
            res = spearmanr([r[pred] for r in rows], y)
            corr[target][pred] = {"rho": float(res.statistic), "p": float(res.pvalue)}
    return corr


def plot(rows: list[dict], corr: dict, args) -> None:
    """KL against three predictors, one colour per tensor kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    kinds = sorted({r["tensor"].split(".")[2] for r in rows})
    for ax, pred in zip(axes, ["alpha_mean", "noise", "scaled_noise_gdefault"]):
        for i, k in enumerate(kinds):
            sel = [r for r in rows if r["tensor"].split(".")[2] == k]
            ax.scatter([r[pred] for r in sel], [r["kl"] for r in sel], label=k, color=f"C{i}", s=20)
        if pred != "alpha_mean":
            ax.set_xscale("log")
        ax.set_xlabel(pred)
        ax.set_ylabel(f"KL(base || one tensor at {args.type})")
        ax.set_title(f"Spearman ρ = {corr['kl'][pred]['rho']:.2f}")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{args.model}: one expert tensor at {args.type}, the rest Q8_0")
    fig.tight_layout()
    fig.savefig(args.out / f"sensitivity-{args.model}.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
