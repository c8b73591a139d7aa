"""Figures of the spectral stage, as in the AlphaQ paper (PNG, matplotlib Agg, no pyplot state).

- `plot_block_boxplots`: per-block box plots of PL_Alpha_Hill over all expert projections
  (paper Fig. 3: whiskers at min/max, box at the quartiles, line at the median).
- `plot_expert_heatmaps`: one block x expert heatmap of alpha per expert projection kind
  (paper Fig. 4 / Fig. 8: layer- and expert-wise heterogeneity).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from alphaq.errors import AlphaQError
from alphaq.records import MatrixStats

logger = logging.getLogger(__name__)


def _expert_stats(stats: list[MatrixStats]) -> list[MatrixStats]:
    return [s for s in stats if s.is_expert and s.signal and math.isfinite(s.alpha)]


def _block_stats(stats: list[MatrixStats]) -> list[MatrixStats]:
    return [s for s in stats if s.block is not None and s.signal and math.isfinite(s.alpha)]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    logger.info("wrote %s", path)
    return path


def plot_block_boxplots(stats: list[MatrixStats], path: str | Path, title: str = "") -> Path:
    """Fig. 3: distribution of alpha over all expert projections, one box per block.

    A dense model (no experts) gets the same view over all of a block's matrices (Fig. 9).
    """
    sel = _expert_stats(stats)
    what = "expert projections"
    if not sel:
        sel, what = _block_stats(stats), "matrices"
    per_block: dict[int, list[float]] = defaultdict(list)
    for s in sel:
        per_block[s.block].append(s.alpha)
    if not per_block:
        raise AlphaQError("no block matrices with a spectral signal to plot")
    blocks = sorted(per_block)
    fig = Figure(figsize=(max(6.0, 0.35 * len(blocks) + 2), 4.0))
    ax = fig.add_subplot()
    ax.boxplot([per_block[b] for b in blocks], whis=(0, 100), showfliers=False)
    ax.set_xticks(range(1, len(blocks) + 1), [str(b) for b in blocks])
    ax.set_xlabel("block")
    ax.set_ylabel("PL_Alpha_Hill")
    ax.set_title(title or f"PL_Alpha_Hill of {what} per block (min/Q1/median/Q3/max)", fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path))


def expert_alpha_grid(stats: list[MatrixStats], kind: str) -> tuple[list[int], np.ndarray]:
    """(blocks, alpha[block, expert]) for one expert projection kind; NaN where missing."""
    sel = [s for s in stats if s.kind == kind and s.is_expert]
    blocks = sorted({s.block for s in sel})
    n_exp = max(s.expert for s in sel) + 1
    grid = np.full((len(blocks), n_exp), np.nan)
    row = {b: i for i, b in enumerate(blocks)}
    for s in sel:
        grid[row[s.block], s.expert] = s.alpha
    return blocks, grid


def plot_expert_heatmaps(stats: list[MatrixStats], out_dir: str | Path, prefix: str = "") -> list[Path]:
    """Fig. 4/8: a block x expert heatmap of alpha for each expert projection kind."""
    out_dir = Path(out_dir)
    kinds = sorted({s.kind for s in stats if s.is_expert})
    finite = [s.alpha for s in _expert_stats(stats)]
    if not finite:
        raise AlphaQError("no expert matrices with a spectral signal to plot")
    vmin, vmax = float(np.min(finite)), float(np.max(finite))
    paths = []
    for kind in kinds:
        blocks, grid = expert_alpha_grid(stats, kind)
        fig = Figure(figsize=(max(5.0, 0.3 * grid.shape[1] + 2.5), max(3.0, 0.3 * len(blocks) + 1.5)))
        ax = fig.add_subplot()
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
        xstep = max(1, grid.shape[1] // 32)
        ax.set_xticks(range(0, grid.shape[1], xstep))
        ax.set_xlabel("expert")
        ax.set_ylabel("block")
        ax.set_title(f"PL_Alpha_Hill, {kind}")
        fig.colorbar(im, ax=ax, label="alpha (same scale in every panel)")
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"{prefix}heatmap_{kind}.png"))
    return paths


def write_plots(stats: list[MatrixStats], out_dir: str | Path, title: str = "") -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_block_boxplots(stats, out_dir / "alpha_blocks_boxplot.png", title)]
    if _expert_stats(stats):
        paths += plot_expert_heatmaps(stats, out_dir)
    return paths
