#!/usr/bin/env python3
"""The quantise stage at real shapes, with and without --max-quantise-ns, against llama.cpp's mix.

    python scripts/bench_quantise_cap.py [--arch qwen3moe] [--blocks 2] [--like Q3_K_M] [--caps 150 100]

A random-weight checkpoint with a real model's block shapes (scripts/make_large_random_moe.py;
time only, never quality) is converted to BF16 with llama.cpp's converter once. Then, in one run:
llama.cpp's own mix (llama-quantize's time, with and without the model's own importance matrix), the
default at the mix's size, and the default under each cap. The default's first run measures its
stages (self text, importance, damage); the capped runs reuse them from the cache, so that what
differs between the alphaq runs is the plan and the quantise stage. Reported per run: the quantise
stage's wall time, the plan's estimated quantiser ns per weight (alphaq.gguf.speed) and the file
size; whether the measured times follow the estimate is the question. Results: bench/quantise-cap.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXTRA_LAYERS = {"deepseek2-lite": 1}  # its block 0 is dense


def make_bf16(arch: str, blocks: int, work: Path) -> Path:
    from convert.hf_to_gguf import convert_hf

    hf = work / "hf"
    if not hf.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_large_random_moe.py"), str(hf), "--arch", arch,
                        "--layers", str(blocks + EXTRA_LAYERS.get(arch, 0))], check=True, cwd=ROOT)
    bf16 = work / "bf16.gguf"
    if not bf16.exists():
        convert_hf(hf, bf16)
    shutil.rmtree(hf)
    return bf16


def stock_run(bf16: Path, out: Path, mix: str, imatrix) -> dict:
    from alphaq.gguf.quantize import quantize_stock

    t0 = time.perf_counter()
    quantize_stock(bf16, out, mix, imatrix=imatrix)
    row = {"quantise_s": round(time.perf_counter() - t0, 1), "bytes": out.stat().st_size}
    out.unlink()
    return row


def alphaq_run(bf16: Path, out: Path, mix: str, cap: float | None) -> tuple[dict, dict]:
    """One conversion: its row, and the importance matrix it wrote (llama-quantize's means)."""
    import alphaq
    from alphaq.importance.imatrix_file import read_imatrix

    t0 = time.perf_counter()
    r = alphaq.convert(bf16, out, like=mix, max_quantise_ns=cap, force=True)
    row = {"wall_s": round(time.perf_counter() - t0, 1), "stages": {k: round(v, 1) for k, v in r.seconds.items()},
           "quantise_s": round(r.seconds["quantise"], 1), "bytes": r.file_bytes, "reused": list(r.reused),
           "estimated_ns_per_weight": round(r.plan.totals.quantise_ns_per_weight, 1),
           "types": dict(r.tensor_counts)}
    imatrix = read_imatrix(r.imatrix_file).means()
    for p in out.parent.glob(out.stem + "*"):
        p.unlink()
    return row, imatrix


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="qwen3moe")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--like", default="Q3_K_M")
    p.add_argument("--caps", nargs="+", type=float, default=[150.0, 100.0])
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "quantise-cap")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "quantise-cap.json")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    bf16 = make_bf16(args.arch, args.blocks, args.work)
    out = args.work / "out.gguf"
    runs = {}
    runs["default"], imatrix = alphaq_run(bf16, out, args.like, None)
    print("default", runs["default"], flush=True)
    for cap in args.caps:
        runs[f"cap{cap:g}"], _ = alphaq_run(bf16, out, args.like, cap)
        print(f"cap{cap:g}", runs[f"cap{cap:g}"], flush=True)
    runs["stock"] = stock_run(bf16, out, args.like, None)
    runs["stock+self"] = stock_run(bf16, out, args.like, imatrix)
    print("stock", runs["stock"], "stock+self", runs["stock+self"], flush=True)
    args.json.write_text(json.dumps({"arch": args.arch, "blocks": args.blocks, "like": args.like,
                                     "bf16_bytes": bf16.stat().st_size, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                              time.gmtime()),
                                     "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
