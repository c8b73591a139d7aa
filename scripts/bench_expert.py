#!/usr/bin/env python3
"""Expert vs tensor granularity on llama.cpp itself (the patched runtime), at equal true file size.

    python scripts/bench_expert.py [--models mixtral-bench ...] [--budgets 2.5 3] [--windows 8]

For each benchmark model (.cache/zoo/NAME; its BF16 GGUF is reused from .cache/bench/NAME/bf16.gguf
when scripts/bench_eval.py made one) and nominal budget B:
  tensor   AlphaQ, tensor granularity (a stock file), --target-size S
  expert   AlphaQ, expert granularity, --target-size S
where S is the size of AlphaQ's file at nominal budget B (both in size mode, so only the
granularity differs).
Quality: both run in the patched llama-cpp-python (ggml-patches/), the BF16 reference in the stock
one, on both held-out domains: perplexity, mean KL(BF16 || model), top-1 agreement.
Speed (a benchmark, not a test): prefill and decode tokens/s of both files in the patched runtime,
and of the tensor file in the stock runtime, interleaved in the same run, best of --repeats.
Results: bench/expert-runtime.json (+ a markdown table on stdout).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alphaq import runtime  # noqa: E402
from alphaq.convert import ConvertConfig, run_convert  # noqa: E402
from alphaq.expert_gguf import read_layouts  # noqa: E402
from alphaq.plan import PlanConfig  # noqa: E402

DOMAINS = ("prose", "code")
# the patched llama.cpp's other graph for grouped projections (what GPUs run): a sum of masked
# mul_mat_id instead of the fused ggml_mul_mat_id_groups op the CPU runs (ggml-patches/0004, 0005)
MASKED_SUM = {"LLAMA_EXPERT_GROUPS_NO_FUSE": "1"}


def bf16_of(name: str, zoo: Path, work: Path) -> Path:
    path = work / name / "bf16.gguf"
    if not path.exists():
        from convert.hf_to_gguf import convert_hf

        path.parent.mkdir(parents=True, exist_ok=True)
        convert_hf(zoo / name, path, outtype="bf16")
    return path


def scores(lp: np.ndarray, ref: np.ndarray, tokens: np.ndarray) -> dict:
    """lp, ref: (windows, n_ctx, vocab) log-probs; second half of each window scored."""
    n_ctx = lp.shape[1]
    first = n_ctx // 2
    pos = slice(first - 1, n_ctx - 1)
    q, p = ref[:, pos].astype(np.float64), lp[:, pos].astype(np.float64)
    tgt = tokens[:, first:]
    nll = -np.take_along_axis(p, tgt[..., None], -1).mean()
    return {"ppl": float(np.exp(nll)), "kl": float((np.exp(q) * (q - p)).sum(-1).mean()),
            "top1": float((q.argmax(-1) == p.argmax(-1)).mean())}


def tokens_of(bf16: Path, text: Path, n_ctx: int, windows: int) -> np.ndarray:
    import llama_cpp

    from alphaq.evaluate import windows as make_windows

    llm = llama_cpp.Llama(model_path=str(bf16), vocab_only=True, verbose=False)
    return np.array(make_windows(llm, text.read_text(errors="replace"), n_ctx, windows))


def split_overhead(name: str, bf16: Path, tensor_file: Path, site: Path, groups: int, repeats: int,
                   threads: int) -> dict:
    """The runtime cost of the group machinery alone: every expert tensor of ``tensor_file`` split
    into ``groups`` groups of its own type (same bytes, same arithmetic, exact same logits — see
    tests/test_patched_runtime.py), decode/prefill against the unsplit file, interleaved."""
    from gguf import GGMLQuantizationType

    from alphaq.expert_gguf import ExpertGroups, write_expert_gguf
    from alphaq.gguf_io import read_tensors

    split = tensor_file.with_name(tensor_file.stem + f"-split{groups}.gguf")
    layouts = {}
    for t in read_tensors(tensor_file):
        if "_exps.weight" in t.name and len(t.shape) == 3:
            n = t.shape[0]
            layouts[t.name] = ExpertGroups(t.name, t.shape, (GGMLQuantizationType(t.type),) * groups,
                                           tuple(tuple(range(g, n, groups)) for g in range(groups)))
    write_expert_gguf(tensor_file, bf16, layouts, {}, split)
    runs = {"unsplit": [], "split": [], "split-masked": []}
    for _ in range(repeats):
        runs["unsplit"].append(runtime.speed(site, tensor_file, 128, 64, 1, threads))
        runs["split"].append(runtime.speed(site, split, 128, 64, 1, threads))
        runs["split-masked"].append(runtime.speed(site, split, 128, 64, 1, threads, env=MASKED_SUM))
    row = {"model": name, "file": tensor_file.name, "groups": groups, "split_tensors": len(layouts)}
    for k, v in runs.items():
        row[f"{k}_decode_tps"] = max(r["decode_tps"] for r in v)
        row[f"{k}_prefill_tps"] = max(r["prefill_tps"] for r in v)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mixtral-bench", "qwen2moe-bench", "qwen3moe-bench"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0])
    ap.add_argument("--zoo", type=Path, default=ROOT / ".cache" / "zoo")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "expert-runtime.json")
    ap.add_argument("--speed-only", action="store_true", help="reuse cached files and quality; re-measure speed")
    ap.add_argument("--split-overhead", type=int, metavar="G", default=0,
                    help="instead: time each model's tensor file against itself split into G same-type groups")
    args = ap.parse_args()

    from convert.patched import ensure_site

    site = ensure_site()
    if args.split_overhead:
        rows = []
        for name in args.models:
            bf16 = bf16_of(name, args.zoo, args.work)
            for budget in args.budgets:
                f = args.work / name / "granularity" / f"tensor-b{budget:g}.gguf"
                rows.append(split_overhead(name, bf16, f, site, args.split_overhead, args.repeats, args.threads))
                print(json.dumps(rows[-1]), flush=True)
        args.out.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
        print("\n| model | file | split tensors × groups | decode tok/s unsplit / split (×) | prefill tok/s unsplit / split (×) "
              "| masked sum: decode × / prefill × |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['file']} | {r['split_tensors']} × {r['groups']} "
                  f"| {r['unsplit_decode_tps']:.1f} / {r['split_decode_tps']:.1f} ({r['split_decode_tps'] / r['unsplit_decode_tps']:.2f}×) "
                  f"| {r['unsplit_prefill_tps']:.1f} / {r['split_prefill_tps']:.1f} ({r['split_prefill_tps'] / r['unsplit_prefill_tps']:.2f}×) "
                  f"| {r['split-masked_decode_tps'] / r['unsplit_decode_tps']:.2f}× / "
                  f"{r['split-masked_prefill_tps'] / r['unsplit_prefill_tps']:.2f}× |")
        return 0
    rows = []
    for name in args.models:
        bf16 = bf16_of(name, args.zoo, args.work)
        out = args.work / name / "granularity"
        out.mkdir(parents=True, exist_ok=True)
        texts = {d: ROOT / "tests" / "fixtures" / "heldout" / f"{d}.txt" for d in DOMAINS}
        toks = {d: tokens_of(bf16, t, args.n_ctx, args.windows) for d, t in texts.items()}
        ref = {d: runtime.logprobs(None, bf16, t, args.n_ctx, args.windows, out / f"ref-{d}.npy")
               for d, t in texts.items()} if not args.speed_only else {}
        for budget in args.budgets:
            files = {"tensor": out / f"tensor-b{budget:g}.gguf", "expert": out / f"expert-b{budget:g}.gguf"}
            cached = out / f"quality-size-b{budget:g}-w{args.windows}.json"  # files + quality: resumable
            if cached.exists() and all(f.exists() for f in files.values()):
                row = json.loads(cached.read_text())
            else:
                # the size anchor: AlphaQ at nominal budget B; then both granularities are solved
                # for that same file size (same budget mode, so only the granularity differs)
                anchor = out / f"anchor-b{budget:g}.gguf"
                run_convert(ConvertConfig(model=bf16, output=anchor, plan=PlanConfig(budget=budget),
                                          force=True, compare_stock=False, progress=False))
                size = anchor.stat().st_size
                for g, path in files.items():
                    run_convert(ConvertConfig(model=bf16, output=path,
                                              plan=PlanConfig(budget=size, budget_mode="size", granularity=g),
                                              force=True, compare_stock=False, progress=False))
                row = {"model": name, "budget": budget, "grouped_tensors": len(read_layouts(files["expert"]))}
                for g, path in files.items():
                    row[f"{g}_bytes"] = path.stat().st_size
                    for d, t in texts.items():
                        lp = runtime.logprobs(site, path, t, args.n_ctx, args.windows, out / f"{g}-{d}.npy")
                        row.update({f"{g}_{d}_{k}": v for k, v in scores(lp, ref[d], toks[d]).items()})
                cached.write_text(json.dumps(row))
            # speed: interleave the three runs per repeat so machine load hits them alike
            speeds = {"tensor@patched": [], "expert@patched": [], "expert@patched-masked": [], "tensor@stock": []}
            for _ in range(args.repeats):
                speeds["tensor@patched"].append(runtime.speed(site, files["tensor"], 128, 64, 1, args.threads))
                speeds["expert@patched"].append(runtime.speed(site, files["expert"], 128, 64, 1, args.threads))
                speeds["expert@patched-masked"].append(
                    runtime.speed(site, files["expert"], 128, 64, 1, args.threads, env=MASKED_SUM))
                speeds["tensor@stock"].append(runtime.speed(None, files["tensor"], 128, 64, 1, args.threads))
            for k, v in speeds.items():
                row[f"{k}_prefill_tps"] = max(s["prefill_tps"] for s in v)
                row[f"{k}_decode_tps"] = max(s["decode_tps"] for s in v)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"n_ctx": args.n_ctx, "windows": args.windows, "repeats": args.repeats,
                                    "threads": args.threads, "rows": rows}, indent=1) + "\n")

    print("\n| model | budget | bytes tensor / expert | grouped | KL prose tensor → expert | KL code tensor → expert "
          "| decode tok/s tensor / expert (×) | prefill tok/s tensor / expert (×) | masked sum: decode × / prefill × "
          "| stock runtime decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['budget']:g} | {r['tensor_bytes']:,} / {r['expert_bytes']:,} | {r['grouped_tensors']} "
              f"| {r['tensor_prose_kl']:.4f} → {r['expert_prose_kl']:.4f} | {r['tensor_code_kl']:.4f} → {r['expert_code_kl']:.4f} "
              f"| {r['tensor@patched_decode_tps']:.0f} / {r['expert@patched_decode_tps']:.0f} "
              f"({r['expert@patched_decode_tps'] / r['tensor@patched_decode_tps']:.2f}×) "
              f"| {r['tensor@patched_prefill_tps']:.0f} / {r['expert@patched_prefill_tps']:.0f} "
              f"({r['expert@patched_prefill_tps'] / r['tensor@patched_prefill_tps']:.2f}×) "
              f"| {r['expert@patched-masked_decode_tps'] / r['tensor@patched_decode_tps']:.2f}× / "
              f"{r['expert@patched-masked_prefill_tps'] / r['tensor@patched_prefill_tps']:.2f}× "
              f"| {r['tensor@stock_decode_tps']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
