"""The fast mode's costs: --alpha-experts (the spectral stage on evenly spaced experts, a tensor's cost scaled up to all of them) and fallback twins."""

from __future__ import annotations

import dataclasses

import pytest

import alphaq
from alphaq.allocate.plan import (
    FAST_ALPHA_EXPERTS,
    FAST_FARMS_BLOCKS,
    MODES,
    PlanConfig,
    alpha_experts,
    farms_max_blocks,
    gguf_model_infos,
    make_plan,
)
from alphaq.errors import AlphaQError
from alphaq.model.weights import sampled_experts
from alphaq.spectral.alpha import SpectralConfig
from alphaq.spectral.analyze import analyze_model


def test_sampled_experts_are_evenly_spaced_and_keep_both_ends():
    assert sampled_experts(128, 16) == [0, 8, 17, 25, 34, 42, 51, 59, 68, 76, 85, 93, 102, 110, 119, 127]
    assert sampled_experts(16, 4) == [0, 5, 10, 15]
    assert sampled_experts(16, 16) is None and sampled_experts(8, 16) is None and sampled_experts(8, None) is None
    for n in range(2, 70):
        for k in range(2, n):
            assert len(sampled_experts(n, k)) == k  # never two picks on one expert


@pytest.fixture(scope="module")
def qwen3_stats(float_ggufs):
    """The qwen3moe fixture (16 experts per merged tensor): every matrix, and 4 experts a tensor."""
    path = float_ggufs["qwen3moe"]
    full = analyze_model(path, use_cache=False, progress=False)
    some = analyze_model(path, SpectralConfig(max_experts=4), use_cache=False, progress=False)
    return path, full, some


def test_the_spectral_stage_analyses_the_sample_only_and_the_same_bits(qwen3_stats):
    _, full, some = qwen3_stats
    experts = {}
    for s in some:
        experts.setdefault(s.tensor, []).append(s.expert)
    assert {t: e for t, e in experts.items() if e[0] is not None} == {
        t: [0, 5, 10, 15] for t in {s.tensor for s in full if s.expert is not None}}
    assert [s for s in some if s.expert is None] == [s for s in full if s.expert is None]
    by_key = {(s.tensor, s.expert): s for s in full}
    assert all(s == by_key[(s.tensor, s.expert)] for s in some)  # alpha, variance, ...: the same numbers


def _uniform(stats):
    """Every expert of a tensor given expert 0's statistics: a sample then stands exactly for all."""
    first = {s.tensor: s for s in stats if s.expert in (None, 0)}
    return [dataclasses.replace(first[s.tensor], expert=s.expert) for s in stats]


def test_a_sampled_tensor_costs_what_all_its_experts_cost(qwen3_stats):
    """Fails if the plan forgets to scale a sample's cost up to the tensor's expert count."""
    path, full, some = qwen3_stats
    tensors, header = gguf_model_infos(path, 32)
    cfg = PlanConfig(**MODES["fast"], budget=3.0)
    keep = {(s.tensor, s.expert) for s in some}
    whole = make_plan(_uniform(full), tensors, cfg, fixed_bytes=header)
    sampled = make_plan([s for s in _uniform(full) if (s.tensor, s.expert) in keep], tensors, cfg, fixed_bytes=header)
    assert [i.type for i in sampled.items] == [i.type for i in whole.items]
    for a, b in zip(sampled.items, whole.items):
        assert len(a.slices) == 4 and len(b.slices) == 16
        assert a.costs == pytest.approx(b.costs, rel=1e-12)
    assert whole.settings["alpha_sample"] is None
    assert sampled.settings["alpha_sample"] == {"tensors": 6, "experts_analysed": [4], "experts": [16]}


def test_only_the_evenly_spaced_sample_stands_for_a_tensor(qwen3_stats):
    path, full, some = qwen3_stats
    tensors, header = gguf_model_infos(path, 32)
    cfg = PlanConfig(**MODES["fast"], budget=3.0)
    other = [s for s in full if s.expert is None or s.expert in (0, 1, 2, 3)]  # 4 experts, not the spaced ones
    with pytest.raises(AlphaQError, match=r"statistics missing for experts \[4, 5, 6"):
        make_plan(other, tensors, cfg, fixed_bytes=header)
    with pytest.raises(AlphaQError, match=r"alpha of 4 of its 16 experts \(a sample\); --granularity expert"):
        make_plan(some, tensors, dataclasses.replace(cfg, granularity="expert"), fixed_bytes=header)


@pytest.mark.parametrize("resolve, auto, what, smallest, auto_expert_granularity", [
    (alpha_experts, FAST_ALPHA_EXPERTS, "experts", 2, None),  # expert granularity needs every expert
    (farms_max_blocks, FAST_FARMS_BLOCKS, "blocks", 1, FAST_FARMS_BLOCKS),  # (tests/test_farms_blocks.py)
])
def test_auto_samples_in_the_fast_mode_only(resolve, auto, what, smallest, auto_expert_granularity):
    fast, paper, damage = (PlanConfig(**MODES[m]) for m in ("fast", "paper", "damage"))
    assert resolve("auto", fast) == auto and auto in (16, 256)
    assert resolve("auto", paper) is None and resolve("auto", damage) is None
    assert resolve("auto", dataclasses.replace(fast, granularity="expert")) == auto_expert_granularity
    assert resolve("all", fast) is None and resolve(8, paper) == 8
    assert resolve(8, dataclasses.replace(damage, gamma=1.0)) == 8
    with pytest.raises(AlphaQError, match="has no effect"):
        resolve(8, damage)
    with pytest.raises(AlphaQError, match=f"not a number of {what} >= {smallest}"):
        resolve(smallest - 1, fast)
    with pytest.raises(AlphaQError, match=f"not a number of {what}"):
        resolve("8", fast)  # (a string from the Python front door)


def test_the_front_doors_sample_as_the_fast_mode_says(float_ggufs):
    p = alphaq.plan(float_ggufs["qwen3moe"], budget=3, alpha_experts=4)
    assert p.settings["alpha_sample"]["experts_analysed"] == [4]
    assert alphaq.plan(float_ggufs["qwen3moe"], budget=3).settings["alpha_sample"] is None  # 16 experts: all
    with pytest.raises(AlphaQError, match="alpha_experts/farms_max_blocks and spectral both"):
        alphaq.convert(float_ggufs["qwen3moe"], "o.gguf", mode="fast", alpha_experts=4, spectral=SpectralConfig())


@pytest.mark.parametrize("argv, needle", [
    (["--fast", "--alpha-experts", "4", "--granularity", "expert"], "--granularity expert needs every expert's"),
    (["--alpha-experts", "4"], "has no effect"),
    (["--fast", "--alpha-experts", "1"], "'1' is not a number of experts >= 2, all or auto"),
    (["--farms-max-blocks", "64"], "has no effect"),  # (tests/test_farms_blocks.py)
    (["--fast", "--farms-max-blocks", "0"], "'0' is not a positive number of blocks, all or auto"),
])
def test_convert_refuses_a_spectral_sample_it_cannot_use(argv, needle, fixtures_dir, tmp_path, capsys):
    from alphaq.cli import main

    try:
        code = main(["convert", str(fixtures_dir / "qwen3moe"), "-o", str(tmp_path / "o.gguf"), "--budget", "3", *argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code not in (0, None)
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_of_two_fallbacks_the_cost_cannot_tell_apart_the_plan_takes_the_faster_to_write(qwen3_stats):
    """The fixture's 128-wide down projections: IQ1_S falls back to IQ4_NL, Q2_K and Q3_K to Q4_0,
    the same nominal bits and bytes, so the fast mode's costs are equal; llama.cpp writes Q4_0
    about 100x faster (alphaq/gguf/quantise_speed.json), and it is the one a plan may pick."""
    path, full, _ = qwen3_stats
    tensors, header = gguf_model_infos(path, 32)
    plan = make_plan(full, tensors, PlanConfig(**MODES["fast"], budget=3.0), fixed_bytes=header)
    down = [i for i in plan.items if "ffn_down_exps" in i.tensor]
    assert down and all(i.written["IQ1_S"] == "IQ4_NL" and i.written["Q3_K"] == "Q4_0" for i in down)
    assert all(i.costs["IQ1_S"] == i.costs["Q3_K"] for i in down)  # twins to the fast mode's cost
    assert "IQ4_NL" not in {i.type.name for i in plan.items} and "Q4_0" in {i.type.name for i in down}
