"""The default mode's cap on llama.cpp's quantiser time (alphaq.allocate.quantise_cap,
--max-quantise-ns auto): the reference mix, the cap against llama.cpp's own mix, the plan under it,
and the command line."""

from __future__ import annotations

import json
import math

import pytest
from gguf import GGUFReader

from alphaq import cli
from alphaq.allocate.plan import MODES, PlanConfig, make_plan
from alphaq.allocate.quantise_cap import FLOOR_NS, auto_capped_plan, reference_mix
from alphaq.gguf.quantize import ALL_MIXES
from alphaq.gguf.stock import StockMix, stock_mixes
from alphaq.pipeline.convert import tensor_infos
from test_time_cap import _damage


def test_reference_mix_is_the_largest_that_fits_else_the_smallest():
    mixes = {m.name: m for m in (StockMix("A", 100, 300.0), StockMix("B", 200, 50.0), StockMix("C", 300, 40.0))}
    assert reference_mix(mixes, 250).name == "B"
    assert reference_mix(mixes, 300).name == "C"  # exactly the mix's size (--like)
    assert reference_mix(mixes, 99).name == "A"
    # two mixes of one size (IQ3_S and Q3_K_S are both 3.44 bpw): the slower one, whatever the order
    same = {"Q3_K_S": StockMix("Q3_K_S", 200, 45.0), "IQ3_S": StockMix("IQ3_S", 200, 350.0)}
    assert reference_mix(same, 200).name == reference_mix(dict(reversed(same.items())), 250).name == "IQ3_S"


def _solver(model, damage):
    tensors = tensor_infos(model)
    return lambda cfg: make_plan([], tensors, cfg, fixed_bytes=0, damage=damage)


@pytest.mark.parametrize("mix", ["Q3_K_M", "Q4_K_M", "IQ2_XXS"])
def test_auto_cap_is_llama_cpps_own_mix_or_the_floor_and_the_plan_meets_it(mix, float_ggufs):
    model = float_ggufs["qwen3moe"]
    solve = _solver(model, _damage(tensor_infos(model)))
    mixes = stock_mixes(model, 32, ALL_MIXES)
    cfg = PlanConfig(**MODES["damage"], budget_mode="size", budget=float(mixes[mix].file_bytes))
    free = solve(cfg)
    plan, cap = auto_capped_plan(solve, cfg, model, like=mix)
    assert cap.mix == mix and cap.mix_ns == mixes[mix].quantise_ns
    assert cap.cap_ns == max(FLOOR_NS, mixes[mix].quantise_ns)
    assert cap.uncapped_ns == free.totals.quantise_ns_per_weight and cap.uncapped_damage == free.totals.objective
    assert cap.bound == (free.totals.quantise_ns_per_weight > cap.cap_ns)
    assert plan.totals.quantise_ns_per_weight <= max(cap.cap_ns, free.totals.quantise_ns_per_weight)
    if cap.bound:
        assert plan.totals.quantise_ns_per_weight <= cap.cap_ns < free.totals.quantise_ns_per_weight
        assert plan.totals.objective >= free.totals.objective  # the cap costs quality, never gains it
        assert plan.settings["max_quantise_ns"] == cap.cap_ns
    else:
        assert plan.totals.objective == free.totals.objective
    assert plan.totals.predicted_file_bytes <= cfg.budget


def test_the_cap_binds_where_the_free_plan_picks_slow_types(float_ggufs):
    """With IQ types cheaper in damage, the uncapped Q3_K_M-size plan is slower than the cap."""
    model = float_ggufs["qwen3moe"]
    solve = _solver(model, _damage(tensor_infos(model)))
    size = stock_mixes(model, 32, ("Q3_K_M",))["Q3_K_M"].file_bytes
    plan, cap = auto_capped_plan(solve, PlanConfig(**MODES["damage"], budget_mode="size", budget=float(size)), model)
    assert cap.bound and plan.totals.quantise_ns_per_weight <= cap.cap_ns
    assert "more predicted damage" in cap.describe(plan.totals.objective)


def test_stock_mix_rate_is_the_mean_over_the_file_llama_cpp_writes(float_ggufs, tmp_path):
    """StockMix.quantise_ns against the per-type table averaged over the tensors of llama.cpp's own file."""
    from alphaq.gguf.qtypes import llama_quantizes
    from alphaq.gguf.quantize import quantize_stock
    from alphaq.gguf.speed import quantise_ns

    model = float_ggufs["mixtral"]
    out = tmp_path / "q4.gguf"
    quantize_stock(model, out, "Q4_K_M")
    total = weights = 0
    for t in GGUFReader(out).tensors:
        if llama_quantizes(t.name, tuple(int(d) for d in reversed(t.shape))):
            total += quantise_ns(t.tensor_type) * int(t.n_elements)
            weights += int(t.n_elements)
    assert stock_mixes(model, 32, ("Q4_K_M",))["Q4_K_M"].quantise_ns == pytest.approx(total / weights, rel=1e-12)


def _convert(model, out, *args):
    return cli.main(["convert", str(model), "-o", str(out), "--no-progress", "--self-samples", "4", "--self-ctx", "64",
                     "--like", "Q3_K_M", *args])


def test_convert_caps_by_default_and_none_lifts_it(float_ggufs, tmp_path, capsys):
    model = float_ggufs["qwen3moe"]
    assert _convert(model, tmp_path / "auto.gguf") == 0
    auto_text = capsys.readouterr().out
    assert _convert(model, tmp_path / "none.gguf", "--max-quantise-ns", "none") == 0
    none_text = capsys.readouterr().out
    auto = json.loads((tmp_path / "auto.plan.json").read_text())
    free = json.loads((tmp_path / "none.plan.json").read_text())
    note = auto["settings"]["auto_quantise_cap"]
    assert "auto_quantise_cap" not in free["settings"] and free["settings"]["max_quantise_ns"] is None
    assert note["uncapped_ns"] == pytest.approx(free["totals"]["quantise_ns_per_weight"])
    assert auto["totals"]["quantise_ns_per_weight"] <= max(note["cap_ns"], note["uncapped_ns"])
    assert "auto cap" in auto_text and "auto cap" not in none_text
    if note["bound"]:
        assert auto["settings"]["max_quantise_ns"] == note["cap_ns"]
        assert auto["totals"]["quantise_ns_per_weight"] < free["totals"]["quantise_ns_per_weight"]
    # a number is the user's own cap: no auto cap then
    assert _convert(model, tmp_path / "n.gguf", "--max-quantise-ns", "5000") == 0
    assert "auto_quantise_cap" not in json.loads((tmp_path / "n.plan.json").read_text())["settings"]
    assert not math.isnan(auto["totals"]["quantise_ns_per_weight"])


def test_a_cap_that_is_not_a_number_auto_or_none_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's own exit: the usage, then one error line
        cli.main(["convert", str(tmp_path / "m.gguf"), "--max-quantise-ns", "fast"])
    assert exc.value.code == 2
    assert "not a number of ns per weight, auto or none" in capsys.readouterr().err.strip().splitlines()[-1]


def test_plan_refuses_auto_in_one_line(tmp_path, capsys):
    rc = cli.main(["plan", str(tmp_path / "m.gguf"), "--budget", "3", "--json", str(tmp_path / "p.json"),
                   "--max-quantise-ns", "auto"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "alphaq plan" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("given, auto, plan_cap", [
    ({}, True, None), ({"max_quantise_ns": "auto"}, True, None), ({"max_quantise_ns": None}, False, None),
    ({"max_quantise_ns": "none"}, False, None), ({"max_quantise_ns": 200.0}, False, 200.0),
])
def test_python_front_door_reads_the_cap_as_the_flag_does(given, auto, plan_cap, monkeypatch, tmp_path):
    """alphaq.convert(max_quantise_ns=...) takes what --max-quantise-ns takes, into the same two settings."""
    import alphaq
    import alphaq.pipeline.convert as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_convert", lambda cfg: seen.append(cfg) or cfg)
    alphaq.convert(tmp_path / "m.gguf", tmp_path / "o.gguf", like="Q3_K_M", **given)
    assert seen[0].auto_quantise_cap is auto and seen[0].plan.max_quantise_ns == plan_cap



def test_fast_mode_prices_its_types_without_an_importance_matrix(float_ggufs):
    """--fast passes llama.cpp's quantiser no importance matrix (all-ones only where llama.cpp
    insists): its plan's quantiser estimate takes the per-type rates without one."""
    from alphaq.gguf.speed import mean_quantise_ns
    from alphaq.spectral.analyze import analyze_model

    model = float_ggufs["qwen3moe"]
    stats, tensors = analyze_model(model, use_cache=False, progress=False), tensor_infos(model)
    plan = make_plan(stats, tensors, PlanConfig(**MODES["fast"], budget=3.0), fixed_bytes=0)
    parts = [(i.params, i.type) for i in plan.items] + [(math.prod(f.shape), f.type) for f in plan.fixed if f.quantised]
    assert plan.totals.quantise_ns_per_weight == pytest.approx(mean_quantise_ns(parts, imatrix=False), rel=1e-12)
    assert plan.totals.quantise_ns_per_weight < mean_quantise_ns(parts, imatrix=True)  # Q4_K: 79 against 137 ns
