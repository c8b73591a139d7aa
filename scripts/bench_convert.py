#!/usr/bin/env python3
"""Benchmark convert_alphaq.py against the stock llama.cpp pipeline, side by side, same run.

    python scripts/bench_convert.py [MODEL_DIR ...] [--repeats 2]

For each HF checkpoint (default: the cached benchmark zoo, .cache/zoo/*-bench) it times
  * stock:  llama.cpp's convert_hf_to_gguf.py (BF16) + llama_model_quantize to Q3_K_M
  * alphaq: convert_alphaq.py MODEL --budget 3 (no alpha cache, so the spectral stage is paid)
and reports wall time, the ratio alphaq/stock, and alphaq's peak RSS divided by the BF16 model
size (memory-mapped streaming; the target is <= 0.5 on models with >= 8 blocks). Each command
runs in a fresh process; peak RSS covers it and every process it waits for (RUSAGE_CHILDREN).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs one command and prints its wall time and the peak RSS of it and its descendants.
_MEASURE = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
if rc.returncode:
    sys.stderr.write(rc.stderr[-3000:]); sys.exit(rc.returncode)
print(json.dumps({"wall": wall, "peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

_STOCK = r"""
import ctypes, sys, subprocess
from pathlib import Path
from convert.vendor import ensure_vendor
model, work = Path(sys.argv[1]), Path(sys.argv[2])
subprocess.run([sys.executable, "-m", "convert.run_upstream", str(ensure_vendor()), str(model),
                "--outtype", "bf16", "--outfile", str(work / "stock-bf16.gguf")], check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
from alphaq.quantize import quantize_stock
quantize_stock(work / "stock-bf16.gguf", work / "stock-q3km.gguf", "Q3_K_M")
"""


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(model: Path, repeats: int) -> dict:
    bf16_bytes = sum(p.stat().st_size for p in model.glob("model*.safetensors"))
    cfg = json.loads((model / "config.json").read_text())
    rows = {"stock": [], "alphaq": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as work:
            rows["stock"].append(measure([sys.executable, "-c", _STOCK, str(model), work]))
            rows["alphaq"].append(measure([sys.executable, str(ROOT / "convert_alphaq.py"), str(model),
                                           "--budget", "3", "-o", f"{work}/alphaq.gguf", "--no-cache",
                                           "--no-progress"]))
    best = {k: min(v, key=lambda r: r["wall"]) for k, v in rows.items()}
    peak = max(r["peak_rss_kib"] for r in rows["alphaq"]) * 1024
    return {
        "model": model.name, "blocks": cfg["num_hidden_layers"], "bf16_bytes": bf16_bytes,
        "stock_s": best["stock"]["wall"], "alphaq_s": best["alphaq"]["wall"],
        "ratio": best["alphaq"]["wall"] / best["stock"]["wall"],
        "alphaq_peak_rss": peak, "rss_over_bf16": peak / bf16_bytes,
        "stock_peak_rss": max(r["peak_rss_kib"] for r in rows["stock"]) * 1024,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", type=Path)
    p.add_argument("--repeats", type=int, default=2, help="best-of-N wall time (default: %(default)s)")
    args = p.parse_args()
    models = args.models or sorted((ROOT / ".cache" / "zoo").glob("*-bench"))
    if not models:
        raise SystemExit("no models: pass HF checkpoint dirs or train the zoo "
                         "(python scripts/train_tiny_moe.py --zoo bench --out .cache/zoo)")
    print("| model | blocks | BF16 size | stock (convert + Q3_K_M) | convert_alphaq.py --budget 3 | ratio | alphaq peak RSS | RSS / BF16 size |")
    print("|---|---|---|---|---|---|---|---|")
    for m in models:
        r = bench(m, args.repeats)
        print(f"| {r['model']} | {r['blocks']} | {r['bf16_bytes'] / 2**20:.1f} MiB | {r['stock_s']:.1f} s | "
              f"{r['alphaq_s']:.1f} s | {r['ratio']:.2f}x | {r['alphaq_peak_rss'] / 2**20:.0f} MiB | "
              f"{r['rss_over_bf16']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
