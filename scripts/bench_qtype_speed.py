#!/usr/bin/env python3
"""How long ggml's quantiser takes per weight for each type, with and without an importance vector.

    python scripts/bench_qtype_speed.py [--rows 512] [--cols 2048] [--repeats 3] [--json alphaq/gguf/quantise_speed.json]

The final quantise stage's time is set by the types a plan picks, not by the allocation: llama.cpp
quantises Q3_K in a few ns per weight and the IQ grid types in hundreds. This measures it with the
same ggml build llama_model_quantize uses (alphaq.gguf.ggml), one thread, on a seeded Gaussian matrix,
and reports each type's median time per weight against Q3_K's (the bulk of the stock Q3_K_M mix)
in the same run. Random weights: the times are the quantiser's, not a quality measure. Every type a
plan can write is measured (the candidates, llama.cpp's shape fallbacks, F16/BF16/F32): the table is
package data (alphaq.gguf.speed) that `--max-quantise-ns` and the benchmarks read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alphaq.gguf.ggml import needs_imatrix, quantize  # noqa: E402
from alphaq.gguf.qtypes import allowed_type_names  # noqa: E402
from alphaq.gguf.speed import TABLE  # noqa: E402

TYPES = tuple(allowed_type_names())  # every type a plan can write


def seconds_per_weight(w: np.ndarray, t: GGMLQuantizationType, imatrix, repeats: int) -> float:
    quantize(w[:4], t, imatrix)  # first call builds the IQ grids
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        quantize(w, t, imatrix)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / w.size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=TABLE)
    p.add_argument("--only", nargs="+", metavar="TYPE",
                   help="measure only these types (with Q3_K, the printed ratios' base) and merge them into "
                        "the existing table, the other entries kept as measured")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    imatrix = (rng.random(args.cols) + 0.1).astype(np.float32)
    rows = {}
    for name in TYPES if not args.only else dict.fromkeys(["Q3_K", *args.only]):
        t = GGMLQuantizationType[name]
        rows[name] = {"with_imatrix_ns": seconds_per_weight(w, t, imatrix, args.repeats) * 1e9,
                      "without_imatrix_ns": None if needs_imatrix(t) else
                      seconds_per_weight(w, t, None, args.repeats) * 1e9}
    base = rows["Q3_K"]["without_imatrix_ns"]
    print("| type | ns/weight, no imatrix | ns/weight, imatrix | x Q3_K without imatrix |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        plain = "needs one" if r["without_imatrix_ns"] is None else f"{r['without_imatrix_ns']:.1f}"
        print(f"| {name} | {plain} | {r['with_imatrix_ns']:.1f} | {r['with_imatrix_ns'] / base:.1f} |")
    table = {"shape": [args.rows, args.cols], "threads": 1, "repeats": args.repeats, "types": rows}
    if args.only:  # (a type the gguf-py in use newly knows: the rest of the table is not re-measured)
        table = json.loads(args.json.read_text())
        table["types"] |= {name: rows[name] for name in args.only}
        table.setdefault("added_later", {}).update({name: time.strftime("%Y-%m-%d") for name in args.only})
    args.json.write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
