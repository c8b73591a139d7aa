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
Speed (a benchmark, not a test): prefill and decode tokens/s of both files loaded in *one* patched
process and timed in alternating rounds (--rounds of a 128-token prefill then --n-gen decode steps),
so each round gives a paired expert/tensor ratio; reported: the median over --processes processes
of each process's median ratio, and the range of those. Per-process speeds on a shared VM swing by
up to 2x, which made the earlier best-of-N-processes figures carry +-15 % noise; paired rounds in
one process cancel most of that. The masked sum (the GPU graph) is timed the same way in other
processes; the stock runtime's speed on the tensor file in others again (unpaired, for reference).
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

from alphaq.runtime import isolated as runtime  # noqa: E402
from alphaq.pipeline.convert import ConvertConfig, run_convert  # noqa: E402
from alphaq.gguf.expert import read_layouts  # noqa: E402
from alphaq.allocate.plan import PlanConfig  # noqa: E402

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

    from alphaq.evaluate.perplexity import windows as make_windows

    llm = llama_cpp.Llama(model_path=str(bf16), vocab_only=True, verbose=False)
    return np.array(make_windows(llm, text.read_text(errors="replace"), n_ctx, windows))


def paired_speed(site: Path | None, files: dict[str, Path], args: argparse.Namespace,
                 env: dict[str, str] | None = None) -> dict:
    """Median prefill/decode tok/s of each of ``files``, loaded together in one process and timed in
    alternating rounds; for every file after the first, the median of its per-round ratio to the
    first. That is repeated in ``args.processes`` processes: per-round ratios are tight within a
    process (bootstrap intervals of +-1 %) but process medians still differ by up to ~8 % (memory
    placement), so the reported ratio is the median of the process medians and its spread the
    range of the process medians."""
    names = list(files)
    runs = [runtime.interleaved_speed(site, list(files.values()), 128, args.n_gen, args.rounds, args.threads, env=env)
            for _ in range(args.processes)]
    row = {}
    for phase in ("prefill", "decode"):
        tps = np.array([r[phase] for r in runs])  # (process, file, round)
        for k, name in enumerate(names):
            row[f"{name}_{phase}_tps"] = float(np.median(tps[:, k]))
            if k:
                per_process = np.median(tps[:, k] / tps[:, 0], axis=1)
                row[f"{name}/{names[0]}_{phase}"] = float(np.median(per_process))
                row[f"{name}/{names[0]}_{phase}_processes"] = [float(x) for x in per_process]
    return row


def fused_and_masked(site: Path, files: dict[str, Path], args: argparse.Namespace) -> dict:
    """`paired_speed` with the CPU's fused op, then with the masked sum (keys prefixed "masked:")."""
    row = paired_speed(site, files, args)
    row.update({f"masked:{k}": v for k, v in paired_speed(site, files, args, env=MASKED_SUM).items()})
    return row


def fmt_ratio(row: dict, key: str) -> str:
    per = row[key + "_processes"]
    return f"{row[key]:.2f}× ({min(per):.2f}–{max(per):.2f})"


def write_split(tensor_file: Path, bf16: Path, groups: int) -> tuple[Path, int]:
    """``tensor_file`` with every expert tensor split into ``groups`` groups of its own type (same
    bytes, same arithmetic): the file and the number of tensors split."""
    from gguf import GGMLQuantizationType

    from alphaq.gguf.expert import ExpertGroups, write_expert_gguf
    from alphaq.gguf.io import read_tensors

    split = tensor_file.with_name(tensor_file.stem + f"-split{groups}.gguf")
    layouts = {}
    for t in read_tensors(tensor_file):
        if "_exps.weight" in t.name and len(t.shape) == 3:
            n = t.shape[0]
            layouts[t.name] = ExpertGroups(t.name, t.shape, (GGMLQuantizationType(t.type),) * groups,
                                           tuple(tuple(range(g, n, groups)) for g in range(groups)))
    write_expert_gguf(tensor_file, bf16, layouts, {}, split)
    return split, len(layouts)


def split_overhead(name: str, bf16: Path, tensor_file: Path, site: Path, groups: int,
                   args: argparse.Namespace) -> dict:
    """The runtime cost of the group machinery alone: every expert tensor of ``tensor_file`` split
    into ``groups`` groups of its own type (same bytes, same arithmetic, exact same logits — see
    tests/test_patched_runtime.py), decode/prefill against the unsplit file, paired rounds."""
    split, n_split = write_split(tensor_file, bf16, groups)
    row = {"model": name, "file": tensor_file.name, "groups": groups, "split_tensors": n_split}
    row.update(fused_and_masked(site, {"unsplit": tensor_file, "split": split}, args))
    return row


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mixtral-bench", "qwen2moe-bench", "qwen3moe-bench"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0])
    ap.add_argument("--zoo", type=Path, default=ROOT / ".cache" / "zoo")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=60, help="paired timing rounds per process")
    ap.add_argument("--processes", type=int, default=3, help="processes per file pair")
    ap.add_argument("--n-gen", type=int, default=128, help="decode steps per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "expert-runtime.json")
    ap.add_argument("--speed-only", action="store_true", help="reuse cached files and quality; re-measure speed")
    ap.add_argument("--split-overhead", type=int, metavar="G", default=0,
                    help="instead: time each model's tensor file against itself split into G same-type groups")
    return ap.parse_args()


def run_split_overhead(args, site) -> int:
    """--split-overhead G: each model's tensor file against itself split into G groups."""
    rows = []
    for name in args.models:
        bf16 = bf16_of(name, args.zoo, args.work)
        for budget in args.budgets:
            f = args.work / name / "granularity" / f"tensor-b{budget:g}.gguf"
            rows.append(split_overhead(name, bf16, f, site, args.split_overhead, args))
            print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "processes": args.processes, "n_gen": args.n_gen,
                                    "rows": rows}, indent=1) + "\n")
    print("\n| model | file | split tensors × groups | decode tok/s unsplit / split | decode split/unsplit (range over processes) "
          "| prefill split/unsplit | masked sum: decode / prefill |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['file']} | {r['split_tensors']} × {r['groups']} "
              f"| {r['unsplit_decode_tps']:.0f} / {r['split_decode_tps']:.0f} | {fmt_ratio(r, 'split/unsplit_decode')} "
              f"| {fmt_ratio(r, 'split/unsplit_prefill')} "
              f"| {fmt_ratio(r, 'masked:split/unsplit_decode')} / {fmt_ratio(r, 'masked:split/unsplit_prefill')} |")
    return 0


def quality_row(name: str, budget: float, bf16: Path, files: dict, texts: dict, toks: dict, ref: dict, site,
                args) -> dict:
    """Both granularities' files at one size and their quality, from the cache when it has them."""
    out = files["tensor"].parent
    cached = out / f"quality-size-b{budget:g}-w{args.windows}.json"  # files + quality: resumable
    if cached.exists() and all(f.exists() for f in files.values()):
        return json.loads(cached.read_text())
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
    return row


def print_table(rows: list[dict]) -> None:
    print("\n| model | budget | bytes tensor / expert | grouped | KL prose tensor → expert | KL code tensor → expert "
          "| decode tok/s tensor / expert | decode expert/tensor (range over processes) | prefill expert/tensor "
          "| masked sum: decode / prefill | stock runtime: tensor decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['budget']:g} | {r['tensor_bytes']:,} / {r['expert_bytes']:,} | {r['grouped_tensors']} "
              f"| {r['tensor_prose_kl']:.4f} → {r['expert_prose_kl']:.4f} | {r['tensor_code_kl']:.4f} → {r['expert_code_kl']:.4f} "
              f"| {r['tensor_decode_tps']:.0f} / {r['expert_decode_tps']:.0f} | {fmt_ratio(r, 'expert/tensor_decode')} "
              f"| {fmt_ratio(r, 'expert/tensor_prefill')} "
              f"| {fmt_ratio(r, 'masked:expert/tensor_decode')} / {fmt_ratio(r, 'masked:expert/tensor_prefill')} "
              f"| {r['stock:tensor_decode_tps']:.0f} |")


def main() -> int:
    args = parse_args()
    from convert.patched import ensure_site

    site = ensure_site()
    if args.split_overhead:
        return run_split_overhead(args, site)
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
            row = quality_row(name, budget, bf16, files, texts, toks, ref, site, args)
            # speed: the pair in one process, paired rounds; then the masked sum; then the stock runtime
            row.update(fused_and_masked(site, {"tensor": files["tensor"], "expert": files["expert"]}, args))
            row.update({f"stock:{k}": v for k, v in paired_speed(None, {"tensor": files["tensor"]}, args).items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"n_ctx": args.n_ctx, "windows": args.windows, "rounds": args.rounds, "processes": args.processes, "n_gen": args.n_gen,
                                    "threads": args.threads, "rows": rows}, indent=1) + "\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
