#!/usr/bin/env python3
"""Benchmark the spectral engine against the plain oracle, same matrices, same run.

Random BF16 expert matrices in the shapes of Mixtral-8x7B, Qwen1.5-MoE, OLMoE and Qwen3-MoE.
For each shape: ms/matrix of the production path (`alphaq.spectral.alpha.analyze_matrix`: batched
float64 Gram eigenvalues from alphaq/spectral/native.c + pruned KS search) and of the oracle from tests/test_spectral.py
(one numpy float64 SVD per 256x256 block, a Python loop over xmin candidates), the speed-up,
and whether both give the same alpha and tail size k. A second table checks the float32
eigvalsh shortcut against the oracle (why the production path stays in float64).

    python scripts/bench_spectral.py                       # all shapes (Mixtral oracle: minutes)
    python scripts/bench_spectral.py --shapes 1408x2048 2048x1408 --repeats 5
    python scripts/bench_spectral.py --baseline-root /tmp/base   # also time another checkout's engine

Production path and oracle (and the baseline engine, with --baseline-root: the
alphaq/spectral/alpha.py of another checkout, e.g. ``git archive HEAD | tar -x -C /tmp/base``) are
timed in alternating rounds, so load drift on the shared machine hits all alike; speed-ups are
ratios of medians. The oracle runs once on shapes above --oracle-once-above parameters (it is
O(N^2) there). numpy's OpenBLAS is pinned to one thread (see below); torch keeps its default
thread count.
"""

from __future__ import annotations

import os

# numpy's OpenBLAS spin-waits in its worker threads; on this shared 2-core box that made the
# oracle's SVD timings swing 20x from run to run. One thread is the oracle's stable speed.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
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

from alphaq.spectral import native  # noqa: E402
from alphaq.spectral.alpha import SpectralConfig, analyze_matrix, farms_grid, hill_alpha  # noqa: E402
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


def alternating(fns: dict, repeats: dict) -> tuple[dict, dict]:
    """Run every fn repeats[name] times, in rounds (a, b, c, a, b, c, ...); results and times."""
    out, times = {}, {k: [] for k in fns}
    for i in range(max(repeats.values())):
        for k, fn in fns.items():
            if i < repeats[k]:
                t0 = time.perf_counter()
                out[k] = fn()
                times[k].append(time.perf_counter() - t0)
    return out, times


def load_baseline(root: Path):
    """alphaq/spectral/alpha.py of another checkout (alphaq/spectral.py in checkouts before the
    stage folders), as a separate module; what it imports comes from this checkout's package."""
    import importlib.util

    path = root / "alphaq" / "spectral" / "alpha.py"
    if not path.exists():
        path = root / "alphaq" / "spectral.py"
    spec = importlib.util.spec_from_file_location("baseline_spectral", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["baseline_spectral"] = mod
    spec.loader.exec_module(mod)
    return mod


def farms_blocks(w: np.ndarray, grid: tuple[int, int], b: int) -> np.ndarray:
    """w's FARMS blocks, row-major over the block grid: (n_blocks, b, b)."""
    nr, nc = grid
    return w[: nr * b, : nc * b].reshape(nr, b, nc, b).transpose(0, 2, 1, 3).reshape(-1, b, b)


def gram_stack(w: np.ndarray, b: int = 256) -> np.ndarray | None:
    """The float64 Gram matrices of w's FARMS blocks (None for a single-block matrix)."""
    grid = farms_grid(*w.shape, b)
    if grid is None or grid == (1, 1):
        return None
    x = farms_blocks(w.astype(np.float64), grid, b)
    return np.matmul(x.transpose(0, 2, 1), x)


def fp32_eigvalsh_alpha(w: np.ndarray, cfg: SpectralConfig):
    """The tempting shortcut: float32 Gram matrices, float32 eigvalsh, same Hill fit."""
    b = cfg.block_size
    grid = farms_grid(*w.shape, b)
    x = torch.from_numpy(w)
    if grid is None:
        g = (x @ x.T) if w.shape[0] <= w.shape[1] else (x.T @ x)
        eig = torch.linalg.eigvalsh(g)
    else:
        blocks = torch.from_numpy(np.ascontiguousarray(farms_blocks(w, grid, b)))
        eig = torch.cat([torch.linalg.eigvalsh(c.mT @ c).reshape(-1) for c in blocks.split(64)])
    eig = np.sort(eig.clamp_min(0).double().numpy())
    return hill_alpha(eig, cfg)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", help="ROWSxCOLS to run (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the fast path")
    p.add_argument("--oracle-repeats", type=int, default=2)
    p.add_argument("--oracle-once-above", type=float, default=20e6, help="params; oracle runs once above")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--no-oracle", action="store_true", help="time the production path only")
    p.add_argument("--baseline-root", type=Path, help="also time this checkout's alphaq/spectral/alpha.py")
    return p.parse_args()


def timed_functions(w: np.ndarray, args, cfg: SpectralConfig, base, pool: ThreadPoolExecutor, cores: int):
    """(what to time on ``w`` by name, repeats by name, w's Gram matrices or None)."""
    fns = {"fast": lambda: analyze_matrix(w, cfg=cfg)}
    reps = {"fast": args.repeats}
    if base is not None:
        bcfg = base.SpectralConfig(device=args.device)
        fns["base"] = lambda: base.analyze_matrix(w, cfg=bcfg)
        reps["base"] = args.repeats
    if not args.no_oracle:
        fns["oracle"] = lambda: oracle_alpha(oracle_eigs(w))
        reps["oracle"] = 1 if w.size > args.oracle_once_above else args.oracle_repeats
    grams = gram_stack(w)
    if grams is not None and not args.no_oracle:
        # the floor: LAPACK's float64 eigensolver alone on the exact Gram matrices
        # (numpy's OpenBLAS, faster here than torch's MKL), on one core and split over
        # a thread pool of one thread per core
        fns["floor1"] = lambda: np.linalg.eigvalsh(grams)
        fns["floor"] = lambda: list(pool.map(np.linalg.eigvalsh, np.array_split(grams, cores)))
        reps["floor1"] = reps["floor"] = args.repeats
        if native.available():  # what the production path uses instead (alphaq/spectral/native.c)
            fns["native1"] = lambda: native.symmetric_eigenvalues(grams)
            reps["native1"] = args.repeats
    return fns, reps, grams


def baseline_column(out: dict, times: dict) -> str:
    """The baseline checkout's median and the ratio, checked to give the same alpha and k."""
    res, b = out["fast"], out["base"]
    base_med = statistics.median(times["base"])
    assert (b.k == res.k and abs(b.alpha - res.alpha) <= 1e-9 * abs(res.alpha)) or (
        math.isnan(b.alpha) and math.isnan(res.alpha)), (b, res)  # another LAPACK: ULPs
    return f" | {base_med * 1e3:.1f} | {base_med / statistics.median(times['fast']):.2f}x"


def measure_shape(model: str, shape, args, cfg, base, pool, cores: int, rows: dict) -> None:
    """Time one shape, print its row and add it to ``rows`` (fast, floor, fp32)."""
    w = bf16_matrix(shape, seed=shape[0] + 7 * shape[1])
    fns, reps, grams = timed_functions(w, args, cfg, base, pool, cores)
    for fn in fns.values():
        if fn is not fns.get("oracle"):
            fn()  # warm-up
    out, times = alternating(fns, reps)
    res = out["fast"]
    fast_min, fast_med = min(times["fast"]), statistics.median(times["fast"])
    base_txt = baseline_column(out, times) if base is not None else ""
    if args.no_oracle:
        print(f"| {model} | {shape[0]}x{shape[1]} | {res.n_eigs} | {fast_min * 1e3:.1f} | "
              f"{fast_med * 1e3:.1f}{base_txt} | {res.alpha:.6f} | {res.k} |", flush=True)
        return
    o_alpha, o_k, _ = out["oracle"]
    or_med = statistics.median(times["oracle"])
    same = res.k == o_k and abs(res.alpha - o_alpha) <= 1e-5 * abs(o_alpha)
    rel = abs(res.alpha - o_alpha) / abs(o_alpha)
    rows["fast"].append((model, f"{shape[0]}x{shape[1]}", res.n_eigs, fast_min * 1e3, fast_med * 1e3,
                         or_med * 1e3, reps["oracle"], or_med / fast_med, res.alpha, rel, "yes" if same else "NO",
                         base_txt))
    print(FAST_ROW.format(*rows["fast"][-1]), flush=True)
    if "floor" in times:
        floor1, floor = statistics.median(times["floor1"]), statistics.median(times["floor"])
        nat1 = statistics.median(times["native1"]) if "native1" in times else math.nan
        rows["floor"].append((f"{shape[0]}x{shape[1]}", len(grams), floor1 * 1e3, nat1 * 1e3, floor1 / nat1,
                              cores, floor * 1e3, or_med / floor, or_med / fast_med))
    a32, k32, _ = fp32_eigvalsh_alpha(w, cfg)
    rows["fp32"].append((f"{shape[0]}x{shape[1]}", o_alpha, a32, abs(a32 - o_alpha) / o_alpha, k32 == o_k))


FAST_ROW = "| {} | {} | {} | {:.1f} | {:.1f} | {:.0f} ({}x) | {:.1f}x | {:.4f} | {:.1e} | {}{} |"


def print_report(rows: dict, with_baseline: bool) -> None:
    print("\n## production path vs oracle (random BF16 data)\n")
    head = "| model | shape | eigenvalues | fast ms (min) | fast ms (median) | oracle ms (median, runs) | speed-up (medians) | alpha | rel. diff | same alpha & k |"
    sep = "|---|---|---|---|---|---|---|---|---|---|"
    if with_baseline:
        head += " baseline ms (median) | fast vs baseline |"
        sep += "---|---|"
    print(head)
    print(sep)
    for r in rows["fast"]:
        print(FAST_ROW.format(*r))
    print("\n## the eigensolver: LAPACK's floor and the native kernel\n")
    print("Every block needs one float64 256x256 symmetric eigensolve. LAPACK's (numpy eigvalsh) alone,")
    print("on one thread per core, bounded the speed-up of an eigvalsh-based path from above; the")
    print("production path uses alphaq/spectral/native.c instead (same Gram matrices, same run, 1 thread).\n")
    print("| shape | blocks | eigvalsh ms (1 thread) | native ms (1 thread) | native speed-up | threads | "
          "eigvalsh ms (threads) | eigvalsh ceiling | measured speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows["floor"]:
        print("| {} | {} | {:.1f} | {:.1f} | {:.2f}x | {} | {:.1f} | {:.1f}x | {:.1f}x |".format(*r))
    print("\n## float32 Gram eigvalsh shortcut vs float64 oracle\n")
    print("| shape | oracle alpha | float32 alpha | rel. diff | same k |")
    print("|---|---|---|---|---|")
    for r in rows["fp32"]:
        print("| {} | {:.6f} | {:.6f} | {:.1e} | {} |".format(*r))


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    wanted = {tuple(int(v) for v in s.split("x")) for s in args.shapes} if args.shapes else None
    cfg = SpectralConfig(device=args.device)
    base = load_baseline(args.baseline_root.resolve()) if args.baseline_root else None
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = {"fast": [], "floor": [], "fp32": []}
    cores = torch.get_num_threads()
    pool = ThreadPoolExecutor(cores)
    for model, shapes in SHAPES.items():
        for shape in shapes:
            if not wanted or shape in wanted:
                measure_shape(model, shape, args, cfg, base, pool, cores, rows)
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.no_oracle:
        return 0
    print_report(rows, base is not None)
    return 0 if all(r[10] == "yes" for r in rows["fast"]) else 1


if __name__ == "__main__":
    sys.exit(main())
