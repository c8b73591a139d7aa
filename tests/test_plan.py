"""alphaq.allocate.plan: Eq. 4-5 against a plain oracle and brute force, and the written plan against llama.cpp.

The statistics here are synthetic on purpose: these tests check the allocation arithmetic (known
optimal answers), not whether PL_Alpha_Hill predicts anything.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import statistics

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from alphaq import cli

from alphaq.allocate import costs

from alphaq.gguf import ggml
from alphaq.errors import AlphaQError
from alphaq.allocate.plan import (
    PlanConfig,
    TensorInfo,
    gguf_output_header_bytes,
    gguf_tensor_infos,
    llama_quantizes,
    make_plan,
    measurement_requests,
    parse_size,
)
from alphaq.gguf.qtypes import nominal_bits, padded, tensor_bytes
from alphaq.records import MatrixStats

EXPERT_KINDS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
ATTN_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output")


def moe_model(
    n_blocks=2,
    n_expert=4,
    embd=256,
    ff=512,
    vocab=64,
    seed=0,
    alpha=None,
    variance=None,
    with_output=True,
    analyse_attention=True,
):
    """TensorInfo for every tensor of a small llama-style MoE, plus synthetic MatrixStats.

    alpha / variance: optional callables (tensor, block, expert) -> value."""
    rng = np.random.default_rng(seed)
    alpha = alpha or (lambda *_: float(rng.uniform(2.0, 6.0)))
    variance = variance or (lambda *_: float(rng.uniform(1e-4, 1e-3)))
    tensors = [TensorInfo("token_embd.weight", (vocab, embd), "F16")]
    stats = []

    def stat(name, b, e, kind, rows, cols):
        stats.append(MatrixStats(name, b, e, kind, rows, cols, rows * cols, alpha(name, b, e), variance(name, b, e), 10, 100))

    for b in range(n_blocks):
        tensors.append(TensorInfo(f"blk.{b}.attn_norm.weight", (embd,), "F32"))
        for k in ATTN_KINDS:
            name = f"blk.{b}.{k}.weight"
            tensors.append(TensorInfo(name, (embd, embd), "F16"))
            if analyse_attention:
                stat(name, b, None, k, embd, embd)
        tensors.append(TensorInfo(f"blk.{b}.ffn_norm.weight", (embd,), "F32"))
        tensors.append(TensorInfo(f"blk.{b}.ffn_gate_inp.weight", (n_expert, embd), "F32"))
        for k in EXPERT_KINDS:
            rows, cols = (embd, ff) if k == "ffn_down_exps" else (ff, embd)
            name = f"blk.{b}.{k}.weight"
            tensors.append(TensorInfo(name, (n_expert, rows, cols), "F16"))
            for e in range(n_expert):
                stat(name, b, e, k, rows, cols)
    tensors.append(TensorInfo("output_norm.weight", (embd,), "F32"))
    if with_output:
        tensors.append(TensorInfo("output.weight", (vocab, embd), "F16"))
    return tensors, stats


def oracle_eta(targets, s, bits, gamma=None):
    """Eq. 4 written out from the paper, with the App. A.7 default gamma (statistics module, not numpy)."""
    alphas = [t.alpha for t in targets if t.signal]
    a_tilde = statistics.median(alphas)
    if gamma is None:
        gamma = min(alphas) * (max(alphas) - min(alphas)) / statistics.pvariance(alphas)
    w = (a_tilde / s.alpha) ** gamma if s.signal else 1.0
    return w * s.variance * 2.0 ** (-2 * bits)


def expert_stats(stats):
    return [s for s in stats if s.expert is not None]


# ---------------------------------------------------------------------------------------------
# costs
# ---------------------------------------------------------------------------------------------


def test_default_gamma_formula():
    # alpha_min = 2, alpha_max = 5, population variance of [2, 3, 4, 5] = 1.25
    assert costs.default_gamma([2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 * 3 / 1.25)
    assert costs.default_gamma([3.0, float("nan"), 3.0]) == 0.0
    assert costs.default_gamma([3.0]) == 0.0


def test_costs_match_the_paper_oracle_and_merge_by_sum():
    tensors, stats = moe_model()
    targets = expert_stats(stats)
    for gran in ("expert", "tensor"):
        plan = make_plan(stats, tensors, PlanConfig(gamma=None, budget=2.5, granularity=gran), fixed_bytes=0)
        a = [s.alpha for s in targets]
        assert plan.settings["gamma"] == pytest.approx(min(a) * (max(a) - min(a)) / statistics.pvariance(a), rel=1e-12)
        for it in plan.items:
            members = [s for s in targets if s.tensor == it.tensor and (it.expert is None or s.expert == it.expert)]
            assert len(members) == (1 if gran == "expert" else 4)
            for name, bits in (("IQ1_S", 1), ("Q2_K", 2), ("Q3_K", 3), ("Q4_K", 4)):
                want = sum(oracle_eta(targets, s, bits) for s in members)
                assert it.costs[name] == pytest.approx(want, rel=1e-12)


def test_gamma_override_and_median_reference():
    tensors, stats = moe_model()
    plan = make_plan(stats, tensors, PlanConfig(budget=3, gamma=1.5, granularity="expert"), fixed_bytes=0)
    targets = expert_stats(stats)
    assert plan.settings["gamma"] == 1.5 and plan.settings["gamma_source"] == "fixed"
    assert plan.settings["alpha_tilde"] == statistics.median([s.alpha for s in targets])
    it = plan.items[5]
    s = next(t for t in targets if (t.tensor, t.expert) == (it.tensor, it.expert))
    assert it.costs["Q3_K"] == pytest.approx(oracle_eta(targets, s, 3, gamma=1.5), rel=1e-12)


def test_no_signal_is_neutral():
    tensors, stats = moe_model(seed=3)
    silent = ("blk.1.ffn_up_exps.weight", 2)
    stats = [
        MatrixStats(s.tensor, s.block, s.expert, s.kind, s.rows, s.cols, s.params, float("nan"), s.variance, 0, 0, signal=False)
        if (s.tensor, s.expert) == silent
        else s
        for s in stats
    ]
    plan = make_plan(stats, tensors, PlanConfig(gamma=None, budget=2.5, granularity="expert"), fixed_bytes=0)
    with_signal = [s.alpha for s in expert_stats(stats) if s.signal]
    assert plan.settings["alpha_tilde"] == statistics.median(with_signal)
    assert plan.settings["gamma"] == pytest.approx(costs.default_gamma(with_signal))
    item = next(it for it in plan.items if (it.tensor, it.expert) == silent)
    s = next(s for s in stats if (s.tensor, s.expert) == silent)
    assert item.slices[0].importance == 1.0
    assert item.costs["Q2_K"] == s.variance * 2.0**-4  # weight 1: exactly Var * 2^-2b
    d = next(i for i in json.loads(plan.to_json())["items"] if (i["tensor"], i["expert"]) == silent)
    assert d["alpha"] is None and d["signal"] is False and d["importance"] == 1.0


def test_signal_true_needs_a_positive_alpha():
    tensors, stats = moe_model()
    s = stats[8]
    stats[8] = MatrixStats(s.tensor, s.block, s.expert, s.kind, s.rows, s.cols, s.params, -1.0, s.variance, 1, 1)
    with pytest.raises(AlphaQError, match="alpha"):
        make_plan(stats, tensors, PlanConfig(budget=3), fixed_bytes=0)


def test_weight_by_params_scales_costs():
    tensors, stats = moe_model()
    a = make_plan(stats, tensors, PlanConfig(budget=3, granularity="expert"), fixed_bytes=0)
    b = make_plan(stats, tensors, PlanConfig(budget=3, granularity="expert", weight_by_params=True), fixed_bytes=0)
    for x, y in zip(a.items, b.items):
        assert y.costs["Q2_K"] == pytest.approx(x.costs["Q2_K"] * x.params, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# known optimal answers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1.4, 2.0, 2.5, 3.1, 3.75])
def test_plan_is_the_brute_force_optimum(budget):
    tensors, stats = moe_model(n_blocks=1, n_expert=2, seed=int(budget * 10))
    # 3 expert tensors x 2 experts = 6 slices at expert granularity: 4^6 assignments
    cfg = PlanConfig(gamma=None, budget=budget, granularity="expert")
    plan = make_plan(stats, tensors, cfg, fixed_bytes=0)
    targets = expert_stats(stats)
    bits = (1, 2, 3, 4)
    eta = {(i, b): oracle_eta(targets, s, b) for i, s in enumerate(targets) for b in bits}
    P = sum(s.params for s in targets)
    best, best_assign = np.inf, None
    for assign in itertools.product(bits, repeat=len(targets)):
        if sum(s.params * b for s, b in zip(targets, assign)) <= budget * P:
            v = sum(eta[(i, b)] for i, b in enumerate(assign))
            if v < best:
                best, best_assign = v, assign
    assert plan.totals.objective == pytest.approx(best, rel=1e-12)
    got = {(it.tensor, it.expert): nominal_bits(it.type) for it in plan.items}
    assert [got[(s.tensor, s.expert)] for s in targets] == list(best_assign)
    assert plan.totals.proven_optimal


def test_bits_budget_extremes_and_infeasible():
    tensors, stats = moe_model()
    lo = make_plan(stats, tensors, PlanConfig(budget=1.0), fixed_bytes=0)
    assert {it.type for it in lo.items} == {T.IQ1_S} and lo.totals.nominal_bits == 1.0
    hi = make_plan(stats, tensors, PlanConfig(budget=4.0), fixed_bytes=0)
    assert {it.type for it in hi.items} == {T.Q4_K} and hi.totals.nominal_bits == 4.0
    assert {it.type for it in make_plan(stats, tensors, PlanConfig(budget=7.0), fixed_bytes=0).items} == {T.Q4_K}
    with pytest.raises(AlphaQError) as e:
        make_plan(stats, tensors, PlanConfig(budget=0.99), fixed_bytes=0)
    assert "0.99" in str(e.value) and "1.0000" in str(e.value) and "4.0000" in str(e.value)


def test_bpw_budget_extremes_and_infeasible():
    tensors, stats = moe_model()
    lo = make_plan(stats, tensors, PlanConfig(budget_mode="bpw", budget=1.5625), fixed_bytes=0)
    assert {it.type for it in lo.items} == {T.IQ1_S} and lo.totals.true_bpw == 1.5625
    hi = make_plan(stats, tensors, PlanConfig(budget_mode="bpw", budget=4.5), fixed_bytes=0)
    assert {it.type for it in hi.items} == {T.Q4_K} and hi.totals.true_bpw == 4.5
    mid = make_plan(stats, tensors, PlanConfig(budget_mode="bpw", budget=3.0), fixed_bytes=0)
    assert mid.totals.true_bpw <= 3.0
    with pytest.raises(AlphaQError) as e:
        make_plan(stats, tensors, PlanConfig(budget_mode="bpw", budget=1.5), fixed_bytes=0)
    assert "1.5625" in str(e.value) and "4.5000" in str(e.value)


def test_target_size_extremes_and_infeasible():
    tensors, stats = moe_model()
    header = 5000
    lo_plan = make_plan(stats, tensors, PlanConfig(budget=1.0), fixed_bytes=header)
    smallest = lo_plan.totals.predicted_file_bytes
    lo = make_plan(stats, tensors, PlanConfig(budget_mode="size", budget=smallest), fixed_bytes=header)
    assert {it.type for it in lo.items} == {T.IQ1_S} and lo.totals.predicted_file_bytes == smallest
    mid = make_plan(stats, tensors, PlanConfig(budget_mode="size", budget=smallest + 300_000), fixed_bytes=header)
    assert smallest < mid.totals.predicted_file_bytes <= smallest + 300_000
    exp = make_plan(
        stats, tensors, PlanConfig(budget_mode="size", budget=smallest + 300_000, granularity="expert"), fixed_bytes=header
    )
    assert exp.totals.predicted_file_bytes <= smallest + 300_000
    with pytest.raises(AlphaQError) as e:
        make_plan(stats, tensors, PlanConfig(budget_mode="size", budget=smallest - 1), fixed_bytes=header)
    assert f"({smallest} B)" in str(e.value)


def test_a_size_the_plan_cannot_fill_is_a_warning(caplog):
    """Every item at its lowest-noise type leaves the file below the target: said at WARNING (the
    convert summary repeats it), since the user asked for a larger file; a bits budget at the top
    of its exact range is only an INFO."""
    import logging

    tensors, stats = moe_model()
    largest = make_plan(stats, tensors, PlanConfig(budget=4.0), fixed_bytes=5000).totals.predicted_file_bytes
    caplog.set_level(logging.INFO)
    plan = make_plan(stats, tensors, PlanConfig(budget_mode="size", budget=largest * 1.5), fixed_bytes=5000)
    assert plan.totals.predicted_file_bytes == largest
    [w] = [r for r in caplog.records if "not binding" in r.getMessage()]
    assert w.levelno == logging.WARNING and "stays below the target" in w.getMessage()
    caplog.clear()
    make_plan(stats, tensors, PlanConfig(budget=4.0), fixed_bytes=5000)
    assert {r.levelno for r in caplog.records if "not binding" in r.getMessage()} == {logging.INFO}


def test_predicted_size_adds_up():
    tensors, stats = moe_model()
    plan = make_plan(stats, tensors, PlanConfig(budget=2.5), fixed_bytes=1234)
    by_name = {t.name: t for t in tensors}
    total = 1234
    types = plan.tensor_types()
    for t in tensors:
        if llama_quantizes(t.name, t.shape):
            total += padded(tensor_bytes(types[t.name], t.shape), 32)
        else:
            total += padded(tensor_bytes(T[t.dtype], t.shape), 32)
    assert plan.totals.predicted_file_bytes == total
    for it in plan.items:
        assert it.bytes == tensor_bytes(it.type, by_name[it.tensor].shape)


def test_monotone_in_alpha():
    """Equal variance and size: a matrix with lower alpha never gets fewer bits than one with higher alpha."""
    for seed in range(12):
        rng = np.random.default_rng(seed)
        tensors, stats = moe_model(n_blocks=1, n_expert=16, seed=seed, variance=lambda *_: 5e-4, analyse_attention=False)
        stats = [s for s in stats if s.tensor == "blk.0.ffn_up_exps.weight"]
        tensors = [t for t in tensors if "exps" not in t.name or t.name == "blk.0.ffn_up_exps.weight"]
        budget = float(rng.uniform(1.0, 4.0))
        plan = make_plan(stats, tensors, PlanConfig(budget=budget, granularity="expert"), fixed_bytes=0)
        pairs = sorted((it.slices[0].alpha, nominal_bits(it.type)) for it in plan.items)
        got_bits = [b for _, b in pairs]
        assert got_bits == sorted(got_bits, reverse=True), (seed, budget, pairs)
        assert len(set(got_bits)) > 1 or budget > 3.9 or budget < 1.07


# ---------------------------------------------------------------------------------------------
# scope, granularity, policy, fallback
# ---------------------------------------------------------------------------------------------


def _block_avg(plan, block):
    its = [it for it in plan.items if it.block == block]
    return sum(it.params * nominal_bits(it.type) for it in its) / sum(it.params for it in its)


def test_block_scope_gives_every_block_the_budget():
    # block 0 heavy-tailed (important), block 1 light-tailed
    alpha = lambda name, b, e: (2.0 if b == 0 else 5.0) + 0.1 * (e or 0)  # noqa: E731
    tensors, stats = moe_model(alpha=alpha, variance=lambda *_: 5e-4)
    g = make_plan(stats, tensors, PlanConfig(budget=2.5, granularity="expert"), fixed_bytes=0)
    assert _block_avg(g, 0) > 2.5 > _block_avg(g, 1)
    b = make_plan(stats, tensors, PlanConfig(budget=2.5, granularity="expert", scope="block"), fixed_bytes=0)
    assert _block_avg(b, 0) <= 2.5 and _block_avg(b, 1) <= 2.5
    assert b.totals.objective >= g.totals.objective  # a constrained version of the same problem
    moe_t, moe_s = moe_model(n_blocks=2, embd=160, alpha=alpha)  # gate/up fall back to >= 4 bits
    with pytest.raises(AlphaQError, match="in block 0"):
        make_plan(moe_s, moe_t, PlanConfig(budget=2.0, scope="block"), fixed_bytes=0)


def test_granularities():
    tensors, stats = moe_model()
    t = make_plan(stats, tensors, PlanConfig(budget=2.7), fixed_bytes=0)
    assert len(t.items) == 6 and all(it.expert is None for it in t.items)
    e = make_plan(stats, tensors, PlanConfig(budget=2.7, granularity="expert"), fixed_bytes=0)
    assert len(e.items) == 24
    assert e.totals.objective <= t.totals.objective * (1 + 1e-12)  # finer choice, never worse
    assert set(e.expert_types()) == {(s.tensor, s.expert) for s in expert_stats(stats)}
    assert set(t.expert_types()) == set(e.expert_types())
    mixed = {n for n in {it.tensor for it in e.items} if len({it.type for it in e.items if it.tensor == n}) > 1}
    assert mixed, "the instance should produce mixed tensors"
    with pytest.raises(AlphaQError, match="expert_types"):
        e.tensor_types()
    assert not mixed & set(e.tensor_types(mixed="skip"))
    with pytest.raises(AlphaQError, match="tensor granularity"):
        e.tensor_type_lines()


def test_default_policy_for_non_allocated_tensors():
    tensors, stats = moe_model()
    plan = make_plan(stats, tensors, PlanConfig(budget=3), fixed_bytes=0)
    types = plan.tensor_types()
    fixed = {f.tensor: f for f in plan.fixed}
    assert types["blk.0.attn_q.weight"] is T.Q4_K and types["blk.1.attn_output.weight"] is T.Q4_K
    assert types["token_embd.weight"] is T.Q4_K and types["output.weight"] is T.Q6_K
    for name in ("blk.0.ffn_gate_inp.weight", "blk.0.attn_norm.weight", "output_norm.weight"):
        assert name not in types and not fixed[name].quantised and fixed[name].type is T.F32
    assert {it.tensor for it in plan.items} == {t.name for t in tensors if "_exps" in t.name}
    # tied embeddings (no output.weight): token_embd gets the output type, as in llama.cpp
    tensors, stats = moe_model(with_output=False)
    assert make_plan(stats, tensors, PlanConfig(budget=3), fixed_bytes=0).tensor_types()["token_embd.weight"] is T.Q6_K


def test_allocate_all_and_dense_models():
    tensors, stats = moe_model()
    plan = make_plan(stats, tensors, PlanConfig(budget=3, allocate="all"), fixed_bytes=0)
    assert {it.tensor for it in plan.items} == {s.tensor for s in stats}
    assert "token_embd.weight" not in {it.tensor for it in plan.items}
    # dense: no expert statistics at all -> every analysed linear layer in the blocks
    dense_t = [t for t in tensors if "_exps" not in t.name and "gate_inp" not in t.name]
    dense_s = [s for s in stats if s.expert is None]
    d = make_plan(dense_s, dense_t, PlanConfig(budget=2.5), fixed_bytes=0)
    assert d.settings["allocate_effective"] == "all"
    assert {it.tensor for it in d.items} == {s.tensor for s in dense_s}


def test_fallback_is_recorded_and_sized_as_written():
    tensors, stats = moe_model(embd=160)  # gate/up rows of 160: no 256-block type fits
    plan = make_plan(stats, tensors, PlanConfig(budget=3.2), fixed_bytes=0)
    up = next(it for it in plan.items if it.tensor == "blk.0.ffn_up_exps.weight")
    assert up.written == {"IQ1_S": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0"}
    assert up.type in (T.IQ4_NL, T.Q4_0, T.Q5_0) and up.is_fallback
    assert up.bytes == tensor_bytes(up.type, (4, 512, 160))
    down = next(it for it in plan.items if it.tensor == "blk.0.ffn_down_exps.weight")
    assert down.written == {n: n for n in ("IQ1_S", "Q2_K", "Q3_K", "Q4_K")} and not down.is_fallback
    assert plan.totals.n_fallback_items == 4
    assert plan.tensor_types()["blk.0.attn_q.weight"] is T.Q5_0  # policy Q4_K falls back too
    d = json.loads(plan.to_json())
    assert d["items"][1]["fallback"] == {"IQ1_S": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0"}
    assert {f["tensor"]: f["fallback_from"] for f in d["fixed"]}["blk.0.attn_q.weight"] == "Q4_K"


def test_measured_noise_model():
    tensors, stats = moe_model(n_blocks=1, n_expert=2, embd=256, ff=256)
    rng = np.random.default_rng(0)
    weights = {(s.tensor, s.expert): (rng.standard_t(5, (s.rows, s.cols)) * 0.02).astype(np.float32) for s in stats}

    class Matrix:  # the spectral stage's WeightMatrix, structurally
        def __init__(self, key):
            self.tensor, self.expert = key

        def load(self):
            return weights[(self.tensor, self.expert)]

    cfg = PlanConfig(budget=2.5, types=("Q2_K", "Q3_K", "Q4_K"), noise="measured", mse_rows=32, granularity="expert")
    req = measurement_requests(stats, tensors, cfg)
    assert set(req) == {(s.tensor, s.expert) for s in expert_stats(stats)}
    table = costs.measure_noise((Matrix(k) for k in weights), req, max_rows=32, progress=False)
    plan = make_plan(stats, tensors, cfg, fixed_bytes=0, noise_table=table)
    for it in plan.items:
        direct = costs.measured_mse(weights[(it.tensor, it.expert)], [T.Q3_K], max_rows=32)[T.Q3_K]
        assert it.costs["Q3_K"] == pytest.approx(it.slices[0].importance * direct, rel=1e-12)
    assert plan.settings["noise"] == "measured" and plan.settings["mse_rows"] == 32
    with pytest.raises(AlphaQError, match="noise table"):
        make_plan(stats, tensors, cfg, fixed_bytes=0)


# ---------------------------------------------------------------------------------------------
# output files
# ---------------------------------------------------------------------------------------------


def test_json_is_deterministic_complete_and_not_overwritten(tmp_path):
    tensors, stats = moe_model()
    cfg = PlanConfig(budget=2.5)
    a = make_plan(stats, tensors, cfg, fixed_bytes=0).to_json()
    b = make_plan(list(stats), list(tensors), cfg, fixed_bytes=0).to_json()
    assert a == b
    d = json.loads(a)
    item = d["items"][0]
    for key in ("tensor", "expert", "alpha", "variance", "params", "costs", "type", "bytes"):
        assert key in item
    assert set(item["costs"]) == {"IQ1_S", "Q2_K", "Q3_K", "Q4_K"}
    for key in ("budget_mode", "budget", "gamma", "types", "granularity", "scope", "noise", "solver", "alphaq_version"):
        assert key in d["settings"]
    for key in ("nominal_bits", "true_bpw", "predicted_file_bytes"):
        assert key in d["totals"]
    assert {f["tensor"] for f in d["fixed"]} | {i["tensor"] for i in d["items"]} == {t.name for t in tensors}
    plan = make_plan(stats, tensors, cfg, fixed_bytes=0)
    path = tmp_path / "plan.json"
    plan.write_json(path)
    assert path.read_text() == a
    with pytest.raises(AlphaQError, match="--force"):
        plan.write_json(path)
    plan.write_json(path, force=True)
    assert os.listdir(tmp_path) == ["plan.json"]  # no temporary files left behind


def _emulate_llama_overrides(text):
    """tools/quantize/quantize.cpp: whitespace-separated `name=type`, split at the first '=';
    llama-quant.cpp: std::regex_search, first match wins."""
    entries = []
    for tok in text.split():
        pattern, _, tname = tok.partition("=")
        t = next(t for t in T if t.name.lower() == tname.lower())
        entries.append((re.compile(pattern), t))
    return entries


def test_tensor_type_lines_select_exactly_each_tensor():
    tensors, stats = moe_model(n_blocks=12, n_expert=2)  # blk.1 vs blk.11
    plan = make_plan(stats, tensors, PlanConfig(budget=2.4), fixed_bytes=0)
    entries = _emulate_llama_overrides("\n".join(plan.tensor_type_lines()))
    types = plan.tensor_types()
    for t in tensors:
        hit = next((qt for rx, qt in entries if rx.search(t.name)), None)
        assert hit is types.get(t.name), t.name


def _llama_quantize(src, dst, overrides: list[tuple[str, T]], imatrix: dict[str, int]) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf.LlamaFileType.MOSTLY_Q4_K_M
    params.nthread = 1
    keep = []
    ov = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (pattern, t) in enumerate(overrides):
        keep.append(pattern.encode())
        ov[i].pattern = keep[-1]
        ov[i].type = int(t)
    ov[len(overrides)].pattern = None
    params.tt_overrides = ctypes.cast(ov, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    im = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, size) in enumerate(imatrix.items()):
        keep.append(np.ones(size, dtype=np.float32))
        keep.append(name.encode())
        im[i].name = keep[-1]
        im[i].data = keep[-2].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        im[i].size = size
    im[len(imatrix)].name = None
    params.imatrix = ctypes.cast(im, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def _write_tiny_gguf(path, tensors, seed=0):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(160)
    w.add_block_count(2)
    w.add_feed_forward_length(512)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    data = {}
    for t in tensors:
        data[t.name] = (rng.standard_t(5, t.shape) * 0.02).astype(np.float32)
        w.add_tensor(t.name, data[t.name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return data


def test_llama_cpp_writes_exactly_the_plan(tmp_path):
    """End to end: the tensor-type file drives llama_model_quantize; every written type, every tensor's
    bytes and the file size equal the plan, and the written bytes equal alphaq.gguf.ggml.quantize."""
    tensors, stats = moe_model(embd=160, seed=4)  # gate/up fall back, down (ne0 512) does not
    tensors = [TensorInfo(t.name, t.shape, "F32") for t in tensors]
    src, dst, tt = tmp_path / "tiny-f32.gguf", tmp_path / "tiny-q.gguf", tmp_path / "tt.txt"
    data = _write_tiny_gguf(src, tensors)
    reader = gguf.GGUFReader(src)
    assert gguf_tensor_infos(reader) == tensors
    plan = make_plan(stats, tensors, PlanConfig(budget=3.3), fixed_bytes=gguf_output_header_bytes(reader))
    plan.write_tensor_type_file(tt)
    overrides = [(rx.pattern, t) for rx, t in _emulate_llama_overrides(tt.read_text())]
    types = plan.tensor_types()
    imatrix = {
        n: int(np.prod([s for s in data[n].shape[:-2]], dtype=int)) * data[n].shape[-1]
        for n, t in types.items()
        if ggml.needs_imatrix(t)
    }
    assert any(t is T.IQ1_S for t in types.values()), "the instance should use an imatrix type"
    _llama_quantize(src, dst, overrides, imatrix)

    out = gguf.GGUFReader(dst)
    written = {t.name: t for t in out.tensors}
    fixed = {f.tensor: f for f in plan.fixed}
    item_bytes = {}
    for it in plan.items:
        item_bytes[it.tensor] = item_bytes.get(it.tensor, 0) + it.bytes
    for t in tensors:
        w = written[t.name]
        want_type = types.get(t.name, T[t.dtype])
        assert T(w.tensor_type) is want_type, t.name
        assert int(w.n_bytes) == item_bytes.get(t.name, fixed.get(t.name) and fixed[t.name].bytes), t.name
    assert os.path.getsize(dst) == plan.totals.predicted_file_bytes
    assert out.data_offset == plan.totals.header_bytes

    # the measured-noise quantiser is the quantiser llama.cpp used (imatrix: ones where required)
    for it in plan.items:
        x = data[it.tensor]
        got = np.asarray(written[it.tensor].data).reshape(x.shape[0], -1)
        for e in range(x.shape[0]):
            assert np.array_equal(got[e], ggml.quantize(x[e], it.type).reshape(-1)), (it.tensor, e)


def test_parse_size():
    assert parse_size("12GiB") == 12 * 2**30
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("100") == 100
    assert parse_size("10kb") == 10_000
    assert parse_size("3MiB") == 3 * 2**20
    for bad in ("12 parsecs", "GiB", "0", "-1GB"):
        with pytest.raises(AlphaQError):
            parse_size(bad)


def test_config_validation_names_the_allowed_values():
    with pytest.raises(AlphaQError, match="tensor, expert"):
        PlanConfig(granularity="layer")
    with pytest.raises(AlphaQError, match="Q4_K"):
        PlanConfig(types=("Q4_K", "Q9_K"))
    with pytest.raises(AlphaQError):
        PlanConfig(budget=-1)
    with pytest.raises(AlphaQError, match="dp, highs, cbc"):
        PlanConfig(solver="gurobi")


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def test_plan_command(tmp_path, monkeypatch, capsys):
    from alphaq.commands import plan as plan_cmd

    tensors, stats = moe_model(embd=160, seed=4)
    tensors = [TensorInfo(t.name, t.shape, "F32") for t in tensors]
    src = tmp_path / "tiny-f32.gguf"
    _write_tiny_gguf(src, tensors)
    monkeypatch.setattr(plan_cmd, "_analyze", lambda model, cache_dir, use_cache, cfg, progress: stats)
    out, tt = tmp_path / "plan.json", tmp_path / "tt.txt"
    argv = ["plan", str(src), "--budget", "3.3", "--json", str(out), "--tensor-types-out", str(tt)]
    assert cli.main(argv) == 0
    d = json.loads(out.read_text())
    assert d["settings"]["budget"] == 3.3 and d["totals"]["header_estimated"] is False
    assert d["totals"]["header_bytes"] == gguf_output_header_bytes(gguf.GGUFReader(src))
    assert len(tt.read_text().split()) == len([t for t in tensors if llama_quantizes(t.name, t.shape)])
    assert cli.main(argv) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert cli.main(argv + ["--force"]) == 0
    assert cli.main(["plan", str(src), "--budget", "0.5", "--json", str(tmp_path / "x.json")]) == 2
    assert "achievable range" in capsys.readouterr().err
    assert cli.main(["plan", str(src), "--budget", "3", "--granularity", "expert", "--json", str(tmp_path / "e.json"),
                     "--tensor-types-out", str(tmp_path / "e.txt")]) == 2
    capsys.readouterr()
    # llama-quantize's pins, as in convert: --tensor-type-file is read (an input: never written over)
    pins = tmp_path / "pins.txt"
    pins.write_text("attn_v=q8_0\n")
    assert cli.main(["plan", str(src), "--budget", "3", "--json", str(tmp_path / "p.json"), "--tensor-type-file",
                     str(pins), "--tensor-types-out", str(pins), "--force"]) == 2
    assert "is an input" in capsys.readouterr().err and pins.read_text() == "attn_v=q8_0\n"
    assert cli.main(["plan", str(src), "--budget", "4.5", "--json", str(tmp_path / "p.json"), "--tensor-type-file",
                     str(pins), "--output-tensor-type", "q6_k", "--tensor-type", "ffn_down=q5_k"]) == 0
    d = json.loads((tmp_path / "p.json").read_text())
    pinned = {f["tensor"]: f["fallback_from"] or f["type"] for f in d["fixed"] if f["reason"].startswith("pinned")}
    assert pinned == {"blk.0.attn_v.weight": "Q8_0", "blk.1.attn_v.weight": "Q8_0", "blk.0.ffn_down_exps.weight": "Q5_K",
                      "blk.1.ffn_down_exps.weight": "Q5_K", "output.weight": "Q6_K"} and d["totals"]["n_pinned"] == 5
    out_text = capsys.readouterr().out
    assert "pinned 5 tensor(s)" in out_text and "WARNING" not in out_text
    # a pin that takes no tensor is said, not silent (llama-quantize ignores it)
    assert cli.main(["plan", str(src), "--budget", "4.5", "--json", str(tmp_path / "p.json"), "--force",
                     "--tensor-type", "attn_v=q8_0", "--tensor-type", "no_such_tensor=q8_0"]) == 0
    out_text = capsys.readouterr().out
    assert "pinned 2 tensor(s)" in out_text and "WARNING --tensor-type no_such_tensor=q8_0" in out_text
    assert cli.main(["plan", str(src), "--budget", "3", "--json", str(tmp_path / "p2.json"),
                     "--tensor-type", "attn_v=q9_9"]) == 2
    assert "q9_9" in capsys.readouterr().err and not (tmp_path / "p2.json").exists()
    assert cli.main(["plan", str(src), "--target-size", "1.5MiB", "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["totals"]["predicted_file_bytes"] <= 1.5 * 2**20
    capsys.readouterr()
    # more than every type at its largest can fill (this tiny model tops out at ~1.6 MiB): refused
    assert cli.main(["plan", str(src), "--target-size", "2MiB", "--json", str(tmp_path / "s2.json")]) == 2
    assert "is above the largest file" in capsys.readouterr().err and not (tmp_path / "s2.json").exists()


def test_multi_dim_non_expert_tensor_is_one_item():
    """DeepSeek-V2 attn_k_b is (n_head, rows, cols) but not an expert tensor: the spectral stage
    analyses it as one (n_head * rows, cols) matrix, and llama.cpp gives it one type."""
    tensors, stats = moe_model(n_blocks=1)
    tensors.append(TensorInfo("blk.0.attn_k_b.weight", (4, 256, 32), "F16"))
    stats.append(MatrixStats("blk.0.attn_k_b.weight", 0, None, "attn_k_b", 1024, 32, 1024 * 32, 3.0, 1e-3, 10, 100))
    for gran in ("tensor", "expert"):
        plan = make_plan(stats, tensors, PlanConfig(budget=3, allocate="all", granularity=gran), fixed_bytes=0)
        kb = [it for it in plan.items if it.tensor == "blk.0.attn_k_b.weight"]
        assert len(kb) == 1 and kb[0].expert is None and kb[0].shape == (4, 256, 32)
        assert kb[0].written["Q4_K"] == "Q5_0"  # ne0 = 32
        assert kb[0].bytes == tensor_bytes(kb[0].type, (4, 256, 32))
    plan = make_plan(stats, tensors, PlanConfig(budget=3), fixed_bytes=0)  # default: policy type
    assert plan.tensor_types()["blk.0.attn_k_b.weight"] is T.Q5_0
    bad = stats[:-1] + [MatrixStats("blk.0.attn_k_b.weight", 0, None, "attn_k_b", 256, 32, 256 * 32, 3.0, 1e-3, 10, 100)]
    with pytest.raises(AlphaQError, match="stats say 256x32"):
        make_plan(bad, tensors, PlanConfig(budget=3), fixed_bytes=0)


def test_huge_gamma_stays_finite_and_optimal():
    """(alpha_tilde/alpha)^gamma overflows float64 for gamma ~ 1e3; costs are rescaled, not inf."""
    tensors, stats = moe_model(seed=7)
    plan = make_plan(stats, tensors, PlanConfig(budget=2.5, granularity="expert", gamma=3000.0), fixed_bytes=0)
    assert plan.settings["importance_log_scale"] > 600
    assert all(np.isfinite(v) for it in plan.items for v in it.costs.values())
    # the most important matrix (lowest alpha) gets the most bits
    top = min(plan.items, key=lambda it: it.slices[0].alpha)
    assert top.type is T.Q4_K
    ref = make_plan(stats, tensors, PlanConfig(budget=2.5, granularity="expert", gamma=3.0), fixed_bytes=0)
    assert ref.settings["importance_log_scale"] == 0.0


@pytest.mark.parametrize("target", [400_000, 600_000, 850_000])
def test_damage_cost_plan_is_the_brute_force_optimum_over_every_tensor(target):
    """The damage cost allocates every quantised tensor (embeddings and output included) from a
    damage table, with no spectral statistics; its plan is the exhaustive optimum under the size."""
    from alphaq.allocate.plan import MODES, TensorInfo, make_plan

    tensors = [TensorInfo("token_embd.weight", (512, 256), "BF16"), TensorInfo("blk.0.attn_norm.weight", (256,), "F32"),
               TensorInfo("blk.0.attn_q.weight", (256, 256), "BF16"),
               TensorInfo("blk.0.ffn_up_exps.weight", (4, 512, 256), "BF16"),
               TensorInfo("output.weight", (512, 256), "BF16")]
    types = ("Q2_K", "Q4_K", "Q8_0")
    rng = np.random.default_rng(1)
    quantised = [t for t in tensors if t.name.endswith("weight") and len(t.shape) >= 2]
    damage = {(t.name, None): dict(zip(types, sorted(rng.uniform(0, 1, 3), reverse=True))) for t in quantised}
    cfg = PlanConfig(**{**MODES["damage"], "types": types, "budget_mode": "size", "budget": float(target)})
    plan = make_plan([], tensors, cfg, fixed_bytes=4096, damage=damage)
    assert {it.tensor for it in plan.items} == {t.name for t in quantised}
    fixed = 4096 + sum(padded(f.bytes, 32) for f in plan.fixed)
    best = min(
        (sum(damage[(t.name, None)][c] for t, c in zip(quantised, combo)), combo)
        for combo in itertools.product(types, repeat=len(quantised))
        if fixed + sum(padded(tensor_bytes(T[c], t.shape), 32) for t, c in zip(quantised, combo)) <= target
    )
    assert plan.totals.objective == pytest.approx(best[0])
    assert plan.totals.predicted_file_bytes <= target
