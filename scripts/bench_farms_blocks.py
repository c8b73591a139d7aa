#!/usr/bin/env python3
"""What pooling at most 256 FARMS blocks (--farms-max-blocks, 256 in --fast) moves, and saves, on
matrices of Mixtral-8x7B's expert shapes.

    python scripts/bench_farms_blocks.py --seeds 3 --draws 8 --json bench/farms-blocks.json

No trained matrix this large exists on this machine (the zoo's have at most 4 blocks of 256 x 256),
so the matrices are synthetic, in three families: i.i.d. Gaussian (a Marchenko-Pastur spectrum),
i.i.d. Student-t with 3 degrees of freedom (heavy-tailed entries) and a heavy-tailed spectrum
(Gaussian columns scaled by a power law, then mixed by a random orthogonal matrix, so that every
block sees the same spectrum). Per matrix:

  * alpha from every block (the paper mode's) and from the 256 evenly spaced blocks that --fast
    pools, and their relative difference. At gamma = 1 the fast mode's cost of a matrix is
    proportional to its alpha, so this is the cost's error too (less a global scale);
  * the reference code's own rule for comparison: 256 blocks drawn at random, ``--draws`` times
    (seeded here); the spread of its alpha is what the reference accepts;
  * the time of both analyses in the same run (alphaq.spectral.alpha.analyze_matrix, all cores),
    alternating, and their ratio.

Trained matrices, at a smaller scale (``--fixtures DIR ...``): the zoo's matrices are too small for
256 x 256 blocks, so with 32 x 32 blocks every matrix of at least 8 blocks is analysed from all of
them and from the same share that --fast keeps of a Mixtral-8x7B expert (256 of 896, rounded),
evenly spaced. With 32 eigenvalues a block instead of 256 the pooled spectrum is far smaller than at
real shapes, so this overstates the sampling noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alphaq.spectral import alpha as spectral  # noqa: E402
from alphaq.spectral.alpha import SpectralConfig, analyze_matrix  # noqa: E402

SHAPES = {"w1/w3 (14336 x 4096)": (14336, 4096), "w2 (4096 x 14336)": (4096, 14336)}
CAP = 256


def matrix(family: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = shape
    if family == "gaussian":
        return rng.standard_normal(shape, dtype=np.float32)
    if family == "student-t3":
        return rng.standard_t(3, size=shape).astype(np.float32)
    # heavy-tailed spectrum: columns scaled by i^-0.6, then a random rotation of the smaller side
    n = min(rows, cols)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    g = rng.standard_normal((max(rows, cols), n)) * (np.arange(1, n + 1) ** -0.6)
    w = (g @ q).astype(np.float32)
    return w if rows >= cols else np.ascontiguousarray(w.T)


def random_draw_alpha(w: np.ndarray, cfg: SpectralConfig, seed: int) -> float:
    """alpha from 256 blocks drawn at random, the reference code's rule (seeded here)."""
    grid = spectral.farms_grid(*w.shape, cfg.block_size)
    picks = np.sort(np.random.default_rng(seed).choice(grid[0] * grid[1], CAP, replace=False))
    original = spectral.farms_blocks
    spectral.farms_blocks = lambda grid, max_blocks: picks  # the same code path, other blocks
    try:
        return analyze_matrix(w, cfg=cfg).alpha
    finally:
        spectral.farms_blocks = original


def timed(w: np.ndarray, cfg: SpectralConfig):
    t0 = time.perf_counter()
    result = analyze_matrix(w, cfg=cfg)
    return result, time.perf_counter() - t0


def one(family: str, label: str, shape: tuple[int, int], seed: int, draws: int) -> dict:
    w = matrix(family, shape, seed)
    every_cfg = SpectralConfig(device="cpu")
    capped_cfg = dataclasses.replace(every_cfg, max_blocks=CAP)
    every, t_every = timed(w, every_cfg)
    capped, t_capped = timed(w, capped_cfg)
    every_again, t_every2 = timed(w, every_cfg)  # alternating: every, capped, every, capped
    _, t_capped2 = timed(w, capped_cfg)
    assert every_again == every
    drawn = [random_draw_alpha(w, capped_cfg, 1000 * seed + d) for d in range(draws)]
    row = {
        "family": family, "shape": label, "seed": seed,
        "blocks": int(np.prod(spectral.farms_grid(*shape, 256))),
        "alpha_every": every.alpha, "alpha_capped": capped.alpha,
        "rel_diff": capped.alpha / every.alpha - 1,
        "reference_draws": drawn,
        "reference_rel_sd": statistics.stdev(drawn) / every.alpha if draws > 1 else None,
        "reference_rel_max": max(abs(a / every.alpha - 1) for a in drawn) if drawn else None,
        "seconds_every": [t_every, t_every2], "seconds_capped": [t_capped, t_capped2],
        "time_ratio": (t_capped + t_capped2) / (t_every + t_every2),
    }
    print(f"{family:11s} {label:21s} seed {seed}: alpha {every.alpha:.4f} every, {capped.alpha:.4f} capped "
          f"({row['rel_diff']:+.2%}); reference draws SD {row['reference_rel_sd'] or 0:.2%}, "
          f"max {row['reference_rel_max'] or 0:.2%}; time {row['time_ratio']:.3f}x "
          f"({t_capped + t_capped2:.1f} s against {t_every + t_every2:.1f} s)", flush=True)
    return row


def fixture_rows(path: Path, block: int = 32, share: float = CAP / 896) -> list[dict]:
    from alphaq.model.weights import open_model

    cfg = SpectralConfig(block_size=block, device="cpu")
    rows = []
    with open_model(path) as model:
        for m in model.matrices():
            grid = spectral.farms_grid(m.rows, m.cols, block)
            if grid is None or grid[0] * grid[1] < 8:
                continue
            w = m.load()
            keep = max(2, round(grid[0] * grid[1] * share))
            every = analyze_matrix(w, cfg=cfg)
            capped = analyze_matrix(w, cfg=dataclasses.replace(cfg, max_blocks=keep))
            if not (every.signal and capped.signal):
                continue
            rows.append({"model": path.name, "matrix": m.label, "blocks": grid[0] * grid[1], "kept": keep, "eigenvalues_kept": keep * block,
                         "alpha_every": every.alpha, "alpha_capped": capped.alpha,
                         "rel_diff": capped.alpha / every.alpha - 1})
    diffs = sorted(abs(r["rel_diff"]) for r in rows)
    print(f"{path.name}: {len(rows)} matrices, |alpha capped / every - 1| median {statistics.median(diffs):.2%}, "
          f"90th percentile {diffs[int(0.9 * (len(diffs) - 1))]:.2%}, max {diffs[-1]:.2%}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--draws", type=int, default=8, help="random 256-block draws per matrix (the reference's rule)")
    ap.add_argument("--families", nargs="+", default=["gaussian", "student-t3", "power-law"])
    ap.add_argument("--fixtures", type=Path, nargs="*", default=[], help="trained HF checkpoints (32 x 32 blocks)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    trained = [r for path in args.fixtures for r in fixture_rows(path)]
    rows = [one(f, label, shape, seed, args.draws)
            for f in args.families for label, shape in SHAPES.items() for seed in range(args.seeds)]
    diffs = [abs(r["rel_diff"]) for r in rows] or [float("nan")]
    by_kind: dict = {}
    for r in rows:
        by_kind.setdefault((r["family"], r["shape"]), []).append(r["alpha_every"])
    summary = {
        # how much alpha differs between matrices drawn from the same distribution (all blocks)
        "alpha_every_rel_sd_across_seeds": {f"{f}, {s}": statistics.stdev(a) / statistics.mean(a)
                                            for (f, s), a in by_kind.items() if len(a) > 1},
        "abs_rel_diff_median": statistics.median(diffs), "abs_rel_diff_max": max(diffs),
        "reference_rel_sd_median": statistics.median([r["reference_rel_sd"] for r in rows if r["reference_rel_sd"]]
                                                     or [float("nan")]),
        "time_ratio_median": statistics.median([r["time_ratio"] for r in rows] or [float("nan")]),
    }
    print(json.dumps(summary, indent=1))
    if trained:
        diffs = [abs(r["rel_diff"]) for r in trained]
        summary["trained_32x32"] = {"matrices": len(diffs), "abs_rel_diff_median": statistics.median(diffs),
                                    "abs_rel_diff_max": max(diffs)}
    args.json.write_text(json.dumps({"cap": CAP, "rows": rows, "trained_32x32": trained, "summary": summary},
                                    indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
