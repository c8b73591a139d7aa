"""alphaq.spectral.analyze / alphaq analyze: fixtures, CSV, cache, CLI, plots."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import resource
import statistics
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import alphaq.spectral.analyze as analyze_mod
from alphaq.spectral.analyze import analyze_model, read_csv, write_csv
from alphaq.cli import main as cli_main
from alphaq.errors import AlphaQError
from alphaq.plots import expert_alpha_grid, write_plots
from alphaq.records import MatrixStats
from alphaq.spectral.alpha import SpectralConfig

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_DIRS = sorted(p.parent for p in FIXTURES.glob("*/config.json"))


def median_expert_alpha(stats: list[MatrixStats]) -> float:
    alphas = [s.alpha for s in stats if s.is_expert and s.signal]
    assert len(alphas) >= 8, "too few expert slices with a spectral signal"
    return statistics.median(alphas)


@pytest.mark.parametrize(
    "model_dir",
    FIXTURE_DIRS or [pytest.param(None, id="no-fixtures")],
    ids=lambda p: p.name if isinstance(p, Path) else str(p),
)
def test_trained_fixture_alpha_below_init(model_dir, tmp_path):
    """HT-SR: training makes expert spectra heavier-tailed, i.e. lowers PL_Alpha_Hill. The same
    architecture freshly initialised by transformers is the control."""
    if model_dir is None:
        pytest.fail(f"no trained fixtures under {FIXTURES}/*/config.json (scripts/train_tiny_moe.py)")
    from transformers import AutoConfig, AutoModelForCausalLM

    trained = analyze_model(model_dir, use_cache=False, progress=False)
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    init_model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)  # fixtures are BF16
    init_dir = tmp_path / "init"
    init_model.save_pretrained(init_dir)
    init = analyze_model(init_dir, use_cache=False, progress=False)
    assert [(s.tensor, s.expert) for s in init] == [(s.tensor, s.expert) for s in trained]
    med_trained, med_init = median_expert_alpha(trained), median_expert_alpha(init)
    assert med_trained < med_init, (model_dir.name, med_trained, med_init)


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------


def sample_stats() -> list[MatrixStats]:
    return [
        MatrixStats("token_embd.weight", None, None, "token_embd", 1024, 256, 262144, 2.5, 4e-4, 80, 256),
        MatrixStats("blk.0.ffn_down_exps.weight", 0, 3, "ffn_down_exps", 256, 96, 24576, 1.0 / 3.0, 1e-5, 30, 96),
        MatrixStats("blk.0.attn_q.weight", 0, None, "attn_q", 1, 256, 256, math.nan, 0.0, 0, 0, False),
    ]


def same_stats(a: list[MatrixStats], b: list[MatrixStats]) -> bool:
    def key(s):
        d = dataclasses.asdict(s)
        d["alpha"] = "nan" if math.isnan(s.alpha) else s.alpha
        return d

    return [key(s) for s in a] == [key(s) for s in b]


def test_csv_roundtrip_exact_and_refuses_overwrite(tmp_path):
    p = tmp_path / "alphas.csv"
    stats = sample_stats()
    write_csv(stats, p)
    header = p.read_text().splitlines()[0].split(",")
    assert header[:11] == ["tensor", "block", "expert", "kind", "rows", "cols", "params", "alpha",
                           "variance", "k", "n_eigs"]
    assert same_stats(read_csv(p), stats)
    row = p.read_text().splitlines()[1].split(",")
    assert row[1] == "" and row[2] == ""  # block/expert empty for non-block, non-expert
    with pytest.raises(AlphaQError, match="exists"):
        write_csv(stats[:1], p)
    assert same_stats(read_csv(p), stats)  # untouched
    write_csv(stats[:1], p, force=True)
    assert same_stats(read_csv(p), stats[:1])
    assert [q.name for q in tmp_path.iterdir()] == ["alphas.csv"]  # no temp files left


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "alphas.csv"
    write_csv(sample_stats(), p)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(analyze_mod.os, "replace", boom)
    with pytest.raises(OSError):
        write_csv(sample_stats()[:1], p, force=True)
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["alphas.csv"]


def test_read_csv_errors(tmp_path):
    with pytest.raises(AlphaQError, match="does not exist"):
        read_csv(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("tensor,alpha\nx,1.0\n")
    with pytest.raises(AlphaQError, match="lacks column"):
        read_csv(bad)


# --------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------


def test_cache_reuses_results_and_never_serves_stale_alpha(tmp_path, monkeypatch):
    src = FIXTURE_DIRS[0] if FIXTURE_DIRS else pytest.fail("no fixtures")
    model = tmp_path / "model"
    model.mkdir()
    for f in ("config.json",):
        (model / f).write_bytes((src / f).read_bytes())
    with safe_open(src / "model.safetensors", framework="pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    save_file(raw, model / "model.safetensors")
    cache = tmp_path / "cache"
    first = analyze_model(model, cache_dir=cache, progress=False)
    assert any(cache.rglob("*.json"))

    calls = []
    real = analyze_mod.analyze_matrix

    def counting(w, *, name, cfg):
        calls.append(name)
        return real(w, name=name, cfg=cfg)

    monkeypatch.setattr(analyze_mod, "analyze_matrix", counting)
    again = analyze_model(model, cache_dir=cache, progress=False)
    assert calls == [] and same_stats(again, first)

    # change one expert's weights: exactly that slice is recomputed
    key = next(k for k in raw if ".experts.1." in k and "layers.1." in k)
    raw[key] = raw[key] * 1.5 + 0.01
    save_file(raw, model / "model.safetensors")
    changed = analyze_model(model, cache_dir=cache, progress=False)
    assert len(calls) == 1 and "[expert 1]" in calls[0] and "blk.1." in calls[0]
    diff = [(a.tensor, a.expert) for a, b in zip(first, changed) if a.variance != b.variance]
    assert len(diff) == 1

    # other estimator settings: nothing reused
    calls.clear()
    analyze_model(model, SpectralConfig(xmin_window="corrected"), cache_dir=cache, progress=False)
    assert len(calls) == len(first)
    calls.clear()
    analyze_model(model, cache_dir=cache, use_cache=False, progress=False)
    assert len(calls) == len(first)


# --------------------------------------------------------------------------------------
# parallel analysis: order, bits, select / known / throttle
# --------------------------------------------------------------------------------------


def test_parallel_analysis_equals_serial(torch_threads):
    """One matrix per core gives the serial run's results, bit for bit and in model order."""
    model = FIXTURE_DIRS[0] if FIXTURE_DIRS else pytest.fail("no fixtures")
    torch_threads(1)
    serial = analyze_model(model, use_cache=False, progress=False)
    torch_threads(2)
    parallel = analyze_model(model, use_cache=False, progress=False)
    assert same_stats(parallel, serial)
    assert torch.get_num_threads() == 2


def test_first_failing_matrix_in_model_order_is_raised(monkeypatch, torch_threads):
    torch_threads(2)
    model = FIXTURE_DIRS[0] if FIXTURE_DIRS else pytest.fail("no fixtures")
    real = analyze_mod.analyze_matrix
    names = [s.tensor + (f"[expert {s.expert}]" if s.expert is not None else "")
             for s in analyze_model(model, use_cache=False, progress=False)]
    bad = {names[3], names[7]}

    def failing(w, *, name, cfg):
        if name in bad:
            raise AlphaQError(f"boom {name}")
        return real(w, name=name, cfg=cfg)

    monkeypatch.setattr(analyze_mod, "analyze_matrix", failing)
    with pytest.raises(AlphaQError, match=re.escape(f"boom {names[3]}") + "$"):
        analyze_model(model, use_cache=False, progress=False)


class _SpyCondition:
    """A throttle's condition variable that records when a thread has to wait for a slot."""

    def __init__(self, inner: threading.Condition, blocked: threading.Event):
        self.inner, self.blocked, self.waited = inner, blocked, False

    def __enter__(self):
        return self.inner.__enter__()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def notify_all(self):
        self.inner.notify_all()

    def wait_for(self, predicate):
        if not predicate():
            self.waited = True
            self.blocked.set()
        return self.inner.wait_for(predicate)


def test_select_known_and_throttle(monkeypatch, torch_threads):
    """select / known / throttle, synchronised by events and a barrier (never by sleeping), so
    the concurrency checks hold under any load: without a limit two matrices are analysed at
    once (both workers meet at a barrier inside the analysis); with limit 1 the first matrix is
    held until the other worker is seen waiting for its slot, and never two run at once."""
    torch_threads(2)
    model = FIXTURE_DIRS[0] if FIXTURE_DIRS else pytest.fail("no fixtures")
    full = analyze_model(model, use_cache=False, progress=False)

    # select: only the expert slices, in order
    experts = analyze_model(model, use_cache=False, progress=False, select=lambda m: m.expert is not None)
    assert same_stats(experts, [s for s in full if s.expert is not None])

    # known: given results are used as they are (a marker alpha), the rest is analysed
    by_key = {(s.tensor, s.expert): dataclasses.replace(s, alpha=123.0) for s in experts}
    calls = []
    real = analyze_mod.analyze_matrix
    active, peak = [0], [0]
    lock = threading.Lock()
    hold = {"first": lambda: None}  # run inside the first call of each pass, while it is active
    overlap = threading.Event()

    def counting(w, *, name, cfg):
        with lock:
            calls.append(name)
            first = len(calls) <= 2
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if active[0] > 1:
                overlap.set()  # (ends the throttle pass's wait at once if the limit is not kept)
        try:
            if first:
                hold["first"]()
            return real(w, name=name, cfg=cfg)
        finally:
            with lock:
                active[0] -= 1

    both_in = threading.Barrier(2, timeout=600)  # a timeout only ever ends a failing run
    hold["first"] = both_in.wait
    monkeypatch.setattr(analyze_mod, "analyze_matrix", counting)
    mixed = analyze_model(model, use_cache=False, progress=False,
                          known=lambda m: by_key.get((m.tensor, m.expert)))
    assert len(calls) == len(full) - len(experts) and not any("[expert" in c for c in calls)
    assert [s.alpha == 123.0 for s in mixed] == [s.expert is not None for s in full]
    assert same_stats([s for s in mixed if s.expert is None], [s for s in full if s.expert is None])
    assert peak[0] == 2  # one matrix per core

    # throttle: never more than the limit at once; cancel stops the analysis
    calls.clear()
    peak[0] = 0
    throttle = analyze_mod.Throttle(limit=1)
    overlap.clear()
    spy = throttle._cv = _SpyCondition(throttle._cv, overlap)
    hold["first"] = lambda: overlap.wait(timeout=600)  # the other worker waits for a slot (or, wrongly, runs)
    analyze_model(model, use_cache=False, progress=False, throttle=throttle)
    assert peak[0] == 1 and spy.waited and len(calls) == len(full)
    throttle.cancel()
    with pytest.raises(analyze_mod.Cancelled):
        analyze_model(model, use_cache=False, progress=False, throttle=throttle)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are Linux's")
def test_background_throttle_lowers_the_analysing_thread_while_limited():
    """Under a limit (the converter running) a worker analyses at nice 19, its own thread only;
    once the limit is lifted it gets its priority back where the OS lets it (root, or a nice
    rlimit), else it stays low."""
    from concurrent.futures import ThreadPoolExecutor

    def prio() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    throttle = analyze_mod.Throttle(limit=1, background=True)
    main_before = prio()

    def in_slot() -> int:
        with throttle.slot():
            return prio()

    with ThreadPoolExecutor(1) as pool:  # one worker thread, reused: like analyze_model's
        before = pool.submit(prio).result()
        assert pool.submit(in_slot).result() == 19
        throttle.set_limit(None)
        after = pool.submit(in_slot).result()
    rlim = resource.getrlimit(resource.RLIMIT_NICE)[0]
    may_raise = os.geteuid() == 0 or rlim == resource.RLIM_INFINITY or rlim >= 20 - before
    assert after == (before if may_raise else 19)
    assert prio() == main_before  # the calling thread was never touched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_hf_reader_gives_torch_float32_values(dtype, tmp_path):
    """HF weights are read with plain preads (no memory map, no torch): every matrix, expert slice
    and fused gate/up half equals safetensors + torch's own float32 conversion."""
    from alphaq.model.weights import open_model

    src = next((d for d in FIXTURE_DIRS if d.name == "qwen3moe"), None) or pytest.fail("no qwen3moe fixture")
    with safe_open(src / "model.safetensors", framework="pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    g = torch.Generator().manual_seed(0)
    tensors = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in raw.items()}
    p = "model.layers.1.mlp.experts"  # layer 1 as transformers-5 fused 3-D tensors
    n_exp = len([k for k in raw if k.startswith(f"{p}.") and k.endswith(".gate_proj.weight")])
    for proj in ("gate_proj", "up_proj", "down_proj"):
        stacked = torch.stack([tensors.pop(f"{p}.{e}.{proj}.weight") for e in range(n_exp)])
        tensors[f"{p}.{proj}"] = stacked
    tensors[f"{p}.gate_up_proj"] = torch.cat([tensors.pop(f"{p}.gate_proj"), tensors.pop(f"{p}.up_proj")], 1).contiguous()
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_bytes((src / "config.json").read_bytes())
    save_file(tensors, model / "model.safetensors")

    with open_model(model) as m:
        mats = m.matrices()
        names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}
        assert {x.dtype for x in mats} == {names[dtype]}
        n_ff = tensors[f"{p}.down_proj"].shape[2]
        checked = 0
        for x in mats:
            if x.tensor == "blk.1.ffn_gate_exps.weight":
                want = tensors[f"{p}.gate_up_proj"][x.expert, :n_ff]
            elif x.tensor == "blk.1.ffn_up_exps.weight":
                want = tensors[f"{p}.gate_up_proj"][x.expert, n_ff:]
            elif x.tensor == "blk.1.ffn_down_exps.weight":
                want = tensors[f"{p}.down_proj"][x.expert]
            elif x.tensor == "blk.0.ffn_down_exps.weight":
                want = tensors[f"model.layers.0.mlp.experts.{x.expert}.down_proj.weight"]
            elif x.tensor == "blk.0.attn_q.weight":
                want = tensors["model.layers.0.self_attn.q_proj.weight"]
            else:
                continue
            got = x.load()
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want.to(torch.float32).numpy(), err_msg=x.label)
            checked += 1
        assert checked == 4 * n_exp + 1


# --------------------------------------------------------------------------------------
# CLI and plots
# --------------------------------------------------------------------------------------


def test_cli_analyze_writes_csv_and_plots(tmp_path, capsys):
    model = FIXTURE_DIRS[-1] if FIXTURE_DIRS else pytest.fail("no fixtures")
    out = tmp_path / "alphas.csv"
    plots = tmp_path / "plots"
    argv = ["analyze", str(model), "--csv", str(out), "--plots", str(plots),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert cli_main(argv) == 0
    stats = read_csv(out)
    assert same_stats(stats, analyze_model(model, cache_dir=tmp_path / "cache", progress=False))
    pngs = sorted(p.name for p in plots.glob("*.png"))
    assert "alpha_blocks_boxplot.png" in pngs and "heatmap_ffn_down_exps.png" in pngs
    assert all((plots / p).stat().st_size > 5000 for p in pngs)
    capsys.readouterr()
    assert cli_main(argv) == 2  # refuses to overwrite
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--force" in err
    # the figures alone are not overwritten either (convert --plots' rule), before any analysis
    fresh = tmp_path / "again.csv"
    written = {p: (plots / p).read_bytes() for p in pngs}
    assert cli_main([*argv[:3], str(fresh), *argv[4:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--force" in err and str(plots / "alpha_blocks_boxplot.png") in err
    assert not fresh.exists() and {p: (plots / p).read_bytes() for p in pngs} == written
    assert cli_main(argv + ["--force"]) == 0


@pytest.mark.parametrize("make, msg", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: d, "without config.json"),
    (lambda d: (d / "config.json").write_text('{"architectures": ["BertModel"]}') and d, "unsupported architecture BertModel"),
])
def test_cli_bad_model_is_one_line_exit_2(make, msg, tmp_path, capsys):
    model = make(tmp_path)
    assert cli_main(["analyze", str(model), "--csv", str(tmp_path / "a.csv"), "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and err.count("\n") == 0
    assert not (tmp_path / "a.csv").exists()


def test_expert_grid_and_plots(tmp_path):
    stats = []
    for b in range(3):
        for e in range(4):
            for kind in ("ffn_up_exps", "ffn_down_exps"):
                stats.append(MatrixStats(f"blk.{b}.{kind}.weight", b, e, kind, 8, 8, 64,
                                         2.0 + b + 0.1 * e, 1.0, 5, 8))
    stats.append(MatrixStats("blk.0.attn_q.weight", 0, None, "attn_q", 8, 8, 64, 9.0, 1.0, 5, 8))
    blocks, grid = expert_alpha_grid(stats, "ffn_up_exps")
    assert blocks == [0, 1, 2]
    np.testing.assert_allclose(grid, 2.0 + np.arange(3)[:, None] + 0.1 * np.arange(4)[None, :])
    paths = write_plots(stats, tmp_path / "p")
    assert sorted(p.name for p in paths) == ["alpha_blocks_boxplot.png", "heatmap_ffn_down_exps.png",
                                             "heatmap_ffn_up_exps.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    dense = [s for s in stats if not s.is_expert]  # a dense model: box plot only (paper Fig. 9)
    assert [p.name for p in write_plots(dense, tmp_path / "d")] == ["alpha_blocks_boxplot.png"]
