"""Figures (PNG, matplotlib Agg, no pyplot state).

The spectral stage, as in the AlphaQ paper (`alphaq analyze --plots`):
- `plot_block_boxplots`: per-block box plots of PL_Alpha_Hill over all expert projections
  (paper Fig. 3: whiskers at min/max, box at the quartiles, line at the median).
- `plot_expert_heatmaps`: one block x expert heatmap of alpha per expert projection kind
  (paper Fig. 4 / Fig. 8: layer- and expert-wise heterogeneity).

Where the bits went (`alphaq convert --plots`, `write_convert_plots`): the written type of every
tensor (block x tensor kind; per expert under expert granularity), the bytes per type, and what
the allocation read (the measured damage in the damage mode, alpha in the fast/paper modes).
`type_map`, `expert_type_maps`, `damage_map` and `bytes_per_type` return the data each map draws.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, LogNorm, to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from alphaq.errors import AlphaQError
from alphaq.allocate.plan import format_size
from alphaq.gguf.qtypes import true_bpw
from alphaq.records import MatrixStats

logger = logging.getLogger(__name__)


def _expert_stats(stats: list[MatrixStats]) -> list[MatrixStats]:
    return [s for s in stats if s.is_expert and s.signal and math.isfinite(s.alpha)]


def _block_stats(stats: list[MatrixStats]) -> list[MatrixStats]:
    return [s for s in stats if s.block is not None and s.signal and math.isfinite(s.alpha)]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    logger.debug("wrote %s", path)
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


# ----------------------------------------------------------------------------------------------
# convert --plots: where the bits went
# ----------------------------------------------------------------------------------------------

TYPES_PNG = "types.png"  # block x tensor-kind map of the written type
TYPES_EXPERTS_PNG = "types_experts.png"  # expert granularity: block x expert, a panel per kind
BYTES_PNG = "bytes_per_type.png"  # tensor bytes per written type
DAMAGE_PNG = "damage.png"  # damage mode: block x tensor-kind map of the measured damage
DAMAGE_EXPERTS_PNG = "damage_experts.png"  # ... and per expert under expert granularity
# every name `analyze --plots` (write_plots) and `convert --plots` may write; "*" is a glob
ANALYZE_PLOT_NAMES = ("alpha_blocks_boxplot.png", "heatmap_*.png")
CONVERT_PLOT_NAMES = (TYPES_PNG, TYPES_EXPERTS_PNG, BYTES_PNG, DAMAGE_PNG, DAMAGE_EXPERTS_PNG, *ANALYZE_PLOT_NAMES)
OUTSIDE_BLOCKS = "other"  # the row of the tensors outside the blocks (token_embd, output)
MIXED = "mixed"  # a merged expert tensor whose experts got several types
_MIXED_COLOR = "#c8c8c8"
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")


@dataclass(frozen=True)
class Grid:
    """What one map draws: ``cells[i, j]`` for row ``rows[i]`` and column ``cols[j]``."""

    rows: list[str]  # block numbers (then OUTSIDE_BLOCKS), as labels
    cols: list[str]  # tensor kinds, or expert numbers
    cells: np.ndarray  # type names (object, None where no tensor) or floats (NaN where none)


def _block_kind(name: str) -> tuple[int | None, str]:
    m = _BLOCK_NAME.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name.removesuffix(".weight"))


def _grid(entries: list[tuple[int | None, str, object]], fill, dtype) -> Grid:
    """Rows: the blocks in order, then OUTSIDE_BLOCKS; columns: kinds in model order, the
    in-block kinds first."""
    blocks = sorted({b for b, _, _ in entries if b is not None})
    rows = [str(b) for b in blocks] + ([OUTSIDE_BLOCKS] if any(b is None for b, _, _ in entries) else [])
    inside = list(dict.fromkeys(k for b, k, _ in entries if b is not None))
    cols = inside + [k for k in dict.fromkeys(k for b, k, _ in entries if b is None) if k not in inside]
    cells = np.full((len(rows), len(cols)), fill, dtype=dtype)
    for b, k, v in entries:
        cells[rows.index(OUTSIDE_BLOCKS if b is None else str(b)), cols.index(k)] = v
    return Grid(rows, cols, cells)


def _tensor_order(plan) -> list[str]:
    if plan.tensor_order:
        return list(plan.tensor_order)
    return list(dict.fromkeys([it.tensor for it in plan.items] + [f.tensor for f in plan.fixed]))


def tensor_written_types(plan) -> dict[str, set[str]]:
    """Written type names of every tensor llama.cpp quantises, in model order (several for a
    merged expert tensor whose experts got different types)."""
    per: dict[str, set[str]] = defaultdict(set)
    for it in plan.items:
        per[it.tensor].add(it.type.name)
    for f in plan.fixed:
        if f.quantised:
            per[f.tensor].add(f.type.name)
    return {n: per[n] for n in _tensor_order(plan) if n in per}


def type_map(plan) -> Grid:
    """The type of every quantised tensor, block x tensor kind (MIXED where its experts differ).
    Tensors llama.cpp keeps in float (norms, router) are left out."""
    entries = []
    for name, types in tensor_written_types(plan).items():
        block, kind = _block_kind(name)
        entries.append((block, kind, next(iter(types)) if len(types) == 1 else MIXED))
    return _grid(entries, None, object)


def expert_type_maps(plan) -> dict[str, Grid]:
    """Per merged expert tensor kind: the type of every expert, block x expert."""
    return _expert_grids(plan, lambda it: it.type.name, None, object)


def _expert_grids(plan, value, fill, dtype) -> dict[str, Grid]:
    by_kind: dict[str, dict[int, dict[int, object]]] = defaultdict(lambda: defaultdict(dict))
    for it in plan.items:
        experts = [it.expert] if it.expert is not None else [s.expert for s in it.slices if s.expert is not None]
        block, kind = _block_kind(it.tensor)
        for e in experts:
            by_kind[kind][block][e] = value(it)
    out = {}
    for kind, per_block in by_kind.items():
        blocks = sorted(per_block)
        n_exp = max(max(row) for row in per_block.values()) + 1
        cells = np.full((len(blocks), n_exp), fill, dtype=dtype)
        for i, b in enumerate(blocks):
            for e, v in per_block[b].items():
                cells[i, e] = v
        out[kind] = Grid([str(b) for b in blocks], [str(e) for e in range(n_exp)], cells)
    return out


def bytes_per_type(plan) -> dict[str, int]:
    """Tensor bytes (no padding) per written type over the whole file, float tensors included."""
    out: Counter[str] = Counter()
    for it in plan.items:
        out[it.type.name] += it.bytes
    for f in plan.fixed:
        out[f.type.name] += f.bytes
    return dict(out)


def damage_reference(plan) -> str:
    """The candidate whose damage the damage map shows: the damage stage's reference type (Q4_K,
    measured directly) when it is a candidate, else the candidate nearest 4.5 bits per weight."""
    types = plan.settings["types"]
    if "Q4_K" in types:
        return "Q4_K"
    return min(types, key=lambda t: abs(true_bpw(GGMLQuantizationType[t]) - 4.5))


def damage_map(plan, reference: str) -> Grid:
    """Damage of every allocated tensor at ``reference`` (its experts' summed under expert
    granularity), block x tensor kind; NaN where nothing was allocated."""
    per: dict[str, float] = defaultdict(float)
    for it in plan.items:
        per[it.tensor] += it.costs[reference]
    entries = [(*_block_kind(n), per[n]) for n in _tensor_order(plan) if n in per]
    return _grid(entries, np.nan, float)


def expert_damage_maps(plan, reference: str) -> dict[str, Grid]:
    """Expert granularity: per merged expert tensor kind, every expert's damage at ``reference``."""
    return _expert_grids(plan, lambda it: it.costs[reference] if it.expert is not None else np.nan, np.nan, float)


def type_palette(type_names) -> dict[str, str]:
    """One color per type, ordered by bits per weight (dark = few bits, bright = many); MIXED gray.
    Types of equal bpw (Q4_0, Q4_K, IQ4_NL) still get distinct colors."""
    names = sorted((t for t in set(type_names) if t != MIXED), key=lambda t: (true_bpw(GGMLQuantizationType[t]), t))
    positions = np.linspace(0.0, 1.0, len(names)) if len(names) > 1 else [0.5]
    palette = {t: to_hex(colormaps["viridis"](x)) for t, x in zip(names, positions)}
    if MIXED in type_names:
        palette[MIXED] = _MIXED_COLOR
    return palette


def _type_label(t: str) -> str:
    if t == MIXED:
        return f"{t} (experts differ, {TYPES_EXPERTS_PNG})"
    return f"{t}  {true_bpw(GGMLQuantizationType[t]):.4g} bpw"


def _draw_types(ax, grid: Grid, palette: dict[str, str], names: bool) -> None:
    """A categorical map: each cell in its type's color, and with ``names`` (where there is room)
    its type's name in it."""
    present = [t for t in palette if t in set(grid.cells.ravel()) - {None}]
    index = {t: i for i, t in enumerate(present)}
    data = np.array([[np.nan if v is None else index[v] for v in row] for row in grid.cells], dtype=float)
    cmap = ListedColormap([palette[t] for t in present] or ["white"])
    ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=-0.5, vmax=max(len(present), 1) - 0.5,
              aspect="auto", interpolation="nearest")
    _ticks(ax, grid)
    if names and grid.cells.size <= 400:
        for (i, j), v in np.ndenumerate(grid.cells):
            if v is not None:
                dark = v != MIXED and index[v] < len(present) / 2
                ax.text(j, i, v, ha="center", va="center", fontsize=6, color="white" if dark else "black")


def _ticks(ax, grid: Grid) -> None:
    ax.set_yticks(range(len(grid.rows)), grid.rows)
    step = max(1, len(grid.cols) // 32)
    ax.set_xticks(range(0, len(grid.cols), step), grid.cols[::step],
                  rotation=90 if len(grid.cols[0]) > 2 else 0, fontsize=7)


def _legend(fig: Figure, palette: dict[str, str], used: set[str]) -> None:
    handles = [Patch(facecolor=c, edgecolor="black", linewidth=0.3, label=_type_label(t))
               for t, c in palette.items() if t in used]
    fig.legend(handles=handles, loc="outside right center", fontsize=7, title="written type", title_fontsize=7)


def plot_type_map(plan, path: str | Path, palette: dict[str, str]) -> Path:
    """Block x tensor kind, colored by the written type (bits per weight)."""
    grid = type_map(plan)
    fig = Figure(figsize=(max(4.0, 0.45 * len(grid.cols) + 2.0) + 2.0, max(3.0, 0.3 * len(grid.rows) + 2.5)),
                 layout="constrained")
    ax = fig.add_subplot()
    _draw_types(ax, grid, palette, names=True)
    ax.set_xlabel("tensor kind")
    ax.set_ylabel("block")
    ax.set_title(f"written type per tensor ({plan.totals.true_bpw:.3f} bpw over the allocated weights)", fontsize=8)
    _legend(fig, palette, set(grid.cells.ravel()) - {None})
    return _save(fig, Path(path))


def plot_expert_type_maps(plan, path: str | Path, palette: dict[str, str]) -> Path:
    """Expert granularity: a block x expert panel per merged expert tensor kind."""
    grids = expert_type_maps(plan)
    widths = [max(2.5, 0.12 * len(g.cols) + 1.0) for g in grids.values()]
    n_rows = max(len(g.rows) for g in grids.values())
    fig = Figure(figsize=(sum(widths) + 2.0, max(2.5, 0.3 * n_rows + 2.0)), layout="constrained")
    used: set[str] = set()
    for i, (kind, grid) in enumerate(grids.items()):
        ax = fig.add_subplot(1, len(grids), i + 1)
        _draw_types(ax, grid, palette, names=False)
        ax.set_title(kind, fontsize=8)
        ax.set_xlabel("expert")
        if i == 0:
            ax.set_ylabel("block")
        used |= set(grid.cells.ravel()) - {None}
    fig.suptitle("written type per expert", fontsize=9)
    _legend(fig, palette, used)
    return _save(fig, Path(path))


def plot_bytes_per_type(plan, path: str | Path, palette: dict[str, str]) -> Path:
    """Tensor bytes per written type, each bar labelled with its size and share."""
    per = bytes_per_type(plan)
    names = [t for t in palette if t in per]
    total = sum(per.values())
    fig = Figure(figsize=(max(4.0, 0.7 * len(names) + 1.5), 3.5))
    ax = fig.add_subplot()
    unit, scale = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1)) if total >= s)
    bars = ax.bar(range(len(names)), [per[t] / scale for t in names], color=[palette[t] for t in names],
                  edgecolor="black", linewidth=0.3)
    ax.bar_label(bars, [f"{per[t] / total:.0%}" for t in names], fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(unit)
    ax.set_title(f"tensor bytes per type (total {format_size(total)})", fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def _log_norm(grids) -> LogNorm | None:
    """One log scale over every positive damage of ``grids`` (zero: a tensor whose quantisation
    changed nothing measurable, drawn blank like a missing one)."""
    vals = np.concatenate([g.cells[np.isfinite(g.cells) & (g.cells > 0)] for g in grids])
    return LogNorm(vmin=float(vals.min()), vmax=float(vals.max())) if vals.size else None


def _draw_damage(ax, grid: Grid, norm):
    shown = np.isfinite(grid.cells) & (grid.cells > 0)
    im = ax.imshow(np.ma.masked_where(~shown, grid.cells), cmap="magma", norm=norm, aspect="auto",
                   interpolation="nearest")
    _ticks(ax, grid)
    return im


def plot_damage(plan, out_dir: Path) -> list[Path]:
    """Damage mode: what the allocation read, the damage of every tensor (and expert) at the
    reference type, on a log scale (the same scale in every panel)."""
    ref = damage_reference(plan)
    what = "damage, KL nats/token" if plan.settings["gamma"] == 0 else "cost, damage x importance"
    grid = damage_map(plan, ref)
    fig = Figure(figsize=(max(4.0, 0.45 * len(grid.cols) + 3.0), max(3.0, 0.3 * len(grid.rows) + 2.5)),
                 layout="constrained")
    ax = fig.add_subplot()
    fig.colorbar(_draw_damage(ax, grid, _log_norm([grid])), ax=ax, label=f"{what} ({ref})")
    ax.set_xlabel("tensor kind")
    ax.set_ylabel("block")
    ax.set_title(f"measured {what.split(',')[0]} of quantising one tensor to {ref}", fontsize=8)
    paths = [_save(fig, out_dir / DAMAGE_PNG)]
    if plan.settings["granularity"] == "expert" and any(it.expert is not None for it in plan.items):
        grids = expert_damage_maps(plan, ref)
        norm = _log_norm(grids.values())
        fig = Figure(figsize=(sum(max(2.5, 0.12 * len(g.cols) + 1.0) for g in grids.values()) + 1.5,
                              max(2.5, 0.3 * max(len(g.rows) for g in grids.values()) + 2.0)), layout="constrained")
        axes = [fig.add_subplot(1, len(grids), i + 1) for i in range(len(grids))]
        for i, (ax, (kind, g)) in enumerate(zip(axes, grids.items())):
            im = _draw_damage(ax, g, norm)
            ax.set_title(kind, fontsize=8)
            ax.set_xlabel("expert")
            if i == 0:
                ax.set_ylabel("block")
        fig.colorbar(im, ax=axes, label=f"{what} ({ref})")
        fig.suptitle(f"measured {what.split(',')[0]} per expert at {ref}", fontsize=9)
        paths.append(_save(fig, out_dir / DAMAGE_EXPERTS_PNG))
    return paths


def write_convert_plots(plan, stats: list[MatrixStats], out_dir: str | Path) -> list[Path]:
    """`convert --plots`: the type map (and per-expert panels under expert granularity), bytes
    per type, and what the allocation read: the damage map in the damage mode; the alpha box
    plots and heatmaps of `alphaq analyze` wherever alpha was computed (fast and paper modes)."""
    out_dir = Path(out_dir)
    palette = type_palette(list(bytes_per_type(plan)) + [v for v in type_map(plan).cells.ravel() if v is not None])
    paths = [plot_type_map(plan, out_dir / TYPES_PNG, palette)]
    if plan.settings["granularity"] == "expert" and expert_type_maps(plan):
        paths.append(plot_expert_type_maps(plan, out_dir / TYPES_EXPERTS_PNG, palette))
    paths.append(plot_bytes_per_type(plan, out_dir / BYTES_PNG, palette))
    if plan.settings["noise"] == "damage":
        paths += plot_damage(plan, out_dir)
    if _block_stats(stats) or _expert_stats(stats):
        paths += write_plots(stats, out_dir)
    return paths
