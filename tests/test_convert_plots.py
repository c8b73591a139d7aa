"""`alphaq convert --plots DIR` / alphaq.convert(plots=...): the figures and the data they draw.

The maps' data is checked against the written GGUF (types and bytes as llama.cpp wrote them) and
against the plan's per-expert choices; the PNGs are read back by matplotlib.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

import alphaq
from alphaq.cli import main as cli_main
from alphaq.pipeline.convert import tensor_infos
from alphaq.gguf.io import FLOAT_TYPES, read_tensors
from alphaq.allocate.plan import MODES, PlanConfig, make_plan
from alphaq.plots import (
    BYTES_PNG,
    DAMAGE_EXPERTS_PNG,
    DAMAGE_PNG,
    MIXED,
    OUTSIDE_BLOCKS,
    TYPES_EXPERTS_PNG,
    TYPES_PNG,
    bytes_per_type,
    damage_map,
    expert_damage_maps,
    expert_type_maps,
    type_map,
    write_convert_plots,
)
from alphaq.gguf.qtypes import effective_type, resolve_type, true_bpw

MODEL = "qwen2moe"  # the smallest fixture
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cell(grid, name: str):
    """The map cell of GGUF tensor ``name`` (blk.N.KIND.weight, or KIND.weight outside the blocks)."""
    parts = name.removesuffix(".weight").split(".", 2)
    row, kind = (parts[1], parts[2]) if parts[0] == "blk" else (OUTSIDE_BLOCKS, name.removesuffix(".weight"))
    return grid.cells[grid.rows.index(row), grid.cols.index(kind)]


def _assert_pngs(paths) -> None:
    for p in paths:
        assert p.read_bytes()[:8] == PNG_SIGNATURE, p
        img = imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (p, img.shape)
        assert np.ptp(img[..., :3]) > 0, f"{p} is blank"


def test_fast_convert_plots_show_the_written_types_and_bytes(float_ggufs, tmp_path):
    out, plots = tmp_path / "o.gguf", tmp_path / "new" / "plots"
    r = alphaq.convert(float_ggufs[MODEL], out, mode="fast", budget=3, plots=str(plots), compare_stock=False)
    names = {p.name for p in plots.iterdir()}
    assert {TYPES_PNG, BYTES_PNG, "alpha_blocks_boxplot.png", "heatmap_ffn_down_exps.png"} <= names
    assert TYPES_EXPERTS_PNG not in names and DAMAGE_PNG not in names  # tensor granularity, fast mode
    assert sorted(r.plots) == sorted(plots / n for n in names)  # nothing else (no staging leftovers)
    _assert_pngs(r.plots)

    written = read_tensors(out)
    grid = type_map(r.plan)
    quantised = [t for t in written if t.type not in FLOAT_TYPES]
    for t in quantised:
        assert _cell(grid, t.name) == t.type.name, t.name
    assert sum(v is not None for v in grid.cells.ravel()) == len(quantised)  # float tensors left out
    on_disk = Counter()
    for t in written:
        on_disk[t.type.name] += t.n_bytes
    assert bytes_per_type(r.plan) == dict(on_disk)


def test_expert_granularity_plots_each_experts_type(float_ggufs, tmp_path):
    out, plots = tmp_path / "o.gguf", tmp_path / "plots"
    r = alphaq.convert(float_ggufs[MODEL], out, mode="fast", budget=2.5, granularity="expert", plots=plots,
                       compare_stock=False)
    assert (plots / TYPES_EXPERTS_PNG) in r.plots
    _assert_pngs(r.plots)
    chosen = r.plan.expert_types()
    maps = expert_type_maps(r.plan)
    n_cells = 0
    for (tensor, e), t in chosen.items():
        block, kind = tensor.split(".")[1], tensor.split(".")[2]
        g = maps[kind]
        assert g.cells[g.rows.index(block), int(e)] == t.name
        n_cells += 1
    assert n_cells == sum(g.cells.size for g in maps.values())
    grid = type_map(r.plan)
    per_tensor = {}
    for (tensor, _), t in chosen.items():
        per_tensor.setdefault(tensor, set()).add(t.name)
    assert any(len(s) > 1 for s in per_tensor.values()), "budget 2.5 should mix types within a tensor"
    for tensor, types in per_tensor.items():
        assert _cell(grid, tensor) == (MIXED if len(types) > 1 else next(iter(types)))


def test_damage_mode_plots_the_damage_the_plan_read(float_ggufs, tmp_path):
    """The damage map shows the table the plan was solved on (a made-up table here: the figures
    need no forward pass), per tensor and, under expert granularity, per expert."""
    tensors = tensor_infos(float_ggufs[MODEL])
    rng = np.random.default_rng(0)
    cfg = PlanConfig(**{**MODES["damage"], "granularity": "expert", "budget": 3.0})
    base = {t.name: 10 ** rng.uniform(-6, -3) for t in tensors}
    table, q4k = {}, {}  # (tensor, expert) -> written type -> damage; damage at Q4_K as written
    for t in tensors:
        keys = [(t.name, e) for e in range(t.shape[0])] if "_exps" in t.name else [(t.name, None)]
        written = {effective_type(c, t.cols) for c in cfg.candidates}
        for k in keys:
            scale = base[t.name] * (rng.uniform(0.5, 2) if k[1] is not None else 1)
            table[k] = {w.name: scale * 2 ** (-2 * true_bpw(w)) for w in written}
            q4k[k] = table[k][effective_type(resolve_type("Q4_K"), t.cols).name]
    plan = make_plan([], tensors, cfg, damage=table)
    paths = write_convert_plots(plan, [], tmp_path)
    assert {p.name for p in paths} == {TYPES_PNG, TYPES_EXPERTS_PNG, BYTES_PNG, DAMAGE_PNG, DAMAGE_EXPERTS_PNG}
    _assert_pngs(paths)

    grid, per_expert = damage_map(plan, "Q4_K"), expert_damage_maps(plan, "Q4_K")
    allocated = {it.tensor for it in plan.items}
    for name in allocated:
        experts = [v for (n, _), v in q4k.items() if n == name]
        assert _cell(grid, name) == pytest.approx(sum(experts), rel=1e-12), name
    assert np.isfinite(grid.cells).sum() == len(allocated)
    for (name, e), v in q4k.items():
        if e is not None and name in allocated:
            g = per_expert[name.split(".")[2]]
            assert g.cells[g.rows.index(name.split(".")[1]), e] == pytest.approx(v, rel=1e-12)


def test_existing_plots_need_force_and_a_failed_run_leaves_nothing(float_ggufs, tmp_path, capsys, monkeypatch):
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / TYPES_PNG).write_bytes(b"keep me")
    out = tmp_path / "o.gguf"

    def argv(plots_dir: Path) -> list[str]:
        return ["convert", str(float_ggufs[MODEL]), "--fast", "-o", str(out), "--plots", str(plots_dir),
                "--no-progress", "--no-stock-compare"]

    assert cli_main(argv(plots)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--force" in err[-1] and str(plots / TYPES_PNG) in err[-1]
    assert (plots / TYPES_PNG).read_bytes() == b"keep me" and sorted(tmp_path.iterdir()) == [plots]
    assert cli_main(argv(plots / TYPES_PNG / "sub")) == 2
    assert "is not a directory" in capsys.readouterr().err and sorted(tmp_path.iterdir()) == [plots]

    import alphaq.plots

    def broken(*args, **kwargs):
        raise RuntimeError("matplotlib broke")

    monkeypatch.setattr(alphaq.plots, "write_convert_plots", broken)
    fresh = tmp_path / "a" / "b"
    assert cli_main(argv(fresh)) == 1  # not the user's fault: an internal error, one line
    assert "RuntimeError: matplotlib broke" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == [plots], "no output, no plots directory, no staging left"
    monkeypatch.undo()

    assert cli_main(argv(plots) + ["--force"]) == 0
    assert (plots / TYPES_PNG).read_bytes()[:8] == PNG_SIGNATURE and out.exists()
