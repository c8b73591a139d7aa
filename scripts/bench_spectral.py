#!/usr/bin/env python3
"""Benchmark the spectral engine against the plain oracle, same matrices, same run.

Random BF16 expert matrices in the shapes of Mixtral-8x7B, Qwen1.5-MoE, OLMoE and Qwen3-MoE.
For each shape: ms/matrix of the production path (`alphaq.spectral.analyze_matrix`: batched
float64 Gram eigvalsh + pruned KS search) and of the oracle from tests/test_spectral.py
(one numpy float64 SVD per 256x256 block, a Python loop over xmin candidates), the speed-up,
and whether both give the same alpha and tail size k. A second table checks the float32
eigvalsh shortcut against the oracle (why the production path stays in float64).

    python scripts/bench_spectral.py                       # all shapes (Mixtral oracle: minutes)
    python scripts/bench_spectral.py --shapes 1408x2048 2048x1408 --repeats 5

The oracle runs once on shapes above --oracle-once-above parameters (it is O(N^2) there).
numpy's OpenBLAS is pinned to one thread (see below); torch keeps its default thread count.
"""

from __future__ import annotations

import os

# numpy's OpenBLAS spin-waits in its worker threads; on this shared 2-core box that made the
# oracle's SVD timings swing 20x from run to run. One thread is the oracle's stable speed.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics
import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from alphaq.spectral import SpectralConfig, analyze_matrix, farms_grid, hill_alpha  # noqa: E402
from test_spectral import oracle_alpha, oracle_eigs  # noqa: E402  (the one oracle, shared with tests)

SHAPES = {
    "Mixtral-8x7B": [(14336, 4096), (4096, 14336)],
    "Qwen1.5-MoE": [(1408, 2048), (2048, 1408)],
    "OLMoE": [(1024, 2048), (2048, 1024)],
    "Qwen3-MoE": [(768, 2048), (2048, 768)],
}


def bf16_matrix(shape, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    return w.to(torch.bfloat16).to(torch.float32).numpy()  # values exactly representable in BF16


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, min(times), statistics.median(times)


def fp32_eigvalsh_alpha(w: np.ndarray, cfg: SpectralConfig):
    """The tempting shortcut: float32 Gram matrices, float32 eigvalsh, same Hill fit."""
    b = cfg.block_size
    grid = farms_grid(*w.shape, b)
    x = torch.from_numpy(w)
    if grid is None:
        g = (x @ x.T) if w.shape[0] <= w.shape[1] else (x.T @ x)
        eig = torch.linalg.eigvalsh(g)
    else:
        nr, nc = grid
        blocks = x[: nr * b, : nc * b].reshape(nr, b, nc, b).permute(0, 2, 1, 3).reshape(-1, b, b)
        eig = torch.cat([torch.linalg.eigvalsh(c.mT @ c).reshape(-1) for c in blocks.split(64)])
    eig = np.sort(eig.clamp_min(0).double().numpy())
    return hill_alpha(eig, cfg)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", help="ROWSxCOLS to run (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the fast path")
    p.add_argument("--oracle-repeats", type=int, default=2)
    p.add_argument("--oracle-once-above", type=float, default=20e6, help="params; oracle runs once above")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--no-oracle", action="store_true", help="time the production path only")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    wanted = {tuple(int(v) for v in s.split("x")) for s in args.shapes} if args.shapes else None
    cfg = SpectralConfig(device=args.device)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    rows_fast, rows_fp32 = [], []
    for model, shapes in SHAPES.items():
        for shape in shapes:
            if wanted and shape not in wanted:
                continue
            w = bf16_matrix(shape, seed=shape[0] + 7 * shape[1])
            analyze_matrix(w, cfg=cfg)  # warm-up
            res, fast_min, fast_med = timed(lambda: analyze_matrix(w, cfg=cfg), args.repeats)
            if args.no_oracle:
                print(f"| {model} | {shape[0]}x{shape[1]} | {res.n_eigs} | {fast_min * 1e3:.1f} | "
                      f"{fast_med * 1e3:.1f} | {res.alpha:.6f} | {res.k} |", flush=True)
                continue
            n_or = 1 if w.size > args.oracle_once_above else args.oracle_repeats

            def oracle():
                return oracle_alpha(oracle_eigs(w))

            (o_alpha, o_k, _), or_min, _ = timed(oracle, n_or)
            same = res.k == o_k and abs(res.alpha - o_alpha) <= 1e-5 * abs(o_alpha)
            rel = abs(res.alpha - o_alpha) / abs(o_alpha)
            rows_fast.append((model, f"{shape[0]}x{shape[1]}", res.n_eigs, fast_min * 1e3, fast_med * 1e3,
                              or_min * 1e3, n_or, or_min / fast_min, res.alpha, rel, "yes" if same else "NO"))
            print("| {} | {} | {} | {:.1f} | {:.1f} | {:.0f} ({}x) | {:.1f}x | {:.4f} | {:.1e} | {} |".format(*rows_fast[-1]), flush=True)
            a32, k32, _ = fp32_eigvalsh_alpha(w, cfg)
            rows_fp32.append((f"{shape[0]}x{shape[1]}", o_alpha, a32, abs(a32 - o_alpha) / o_alpha, k32 == o_k))

    if args.no_oracle:
        return 0
    print("\n## production path vs oracle (random BF16 data)\n")
    print("| model | shape | eigenvalues | fast ms (min) | fast ms (median) | oracle ms (runs) | speed-up | alpha | rel. diff | same alpha & k |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows_fast:
        print("| {} | {} | {} | {:.1f} | {:.1f} | {:.0f} ({}x) | {:.1f}x | {:.4f} | {:.1e} | {} |".format(*r))
    print("\n## float32 Gram eigvalsh shortcut vs float64 oracle\n")
    print("| shape | oracle alpha | float32 alpha | rel. diff | same k |")
    print("|---|---|---|---|---|")
    for r in rows_fp32:
        print("| {} | {:.6f} | {:.6f} | {:.1e} | {} |".format(*r))
    return 0 if all(r[-1] == "yes" for r in rows_fast) else 1


if __name__ == "__main__":
    sys.exit(main())
