"""Baselines for the evaluation: importance matrix, calibrated stock mix, uniform and random plans.

All on the committed Mixtral fixture (real trained weights), converted once by llama.cpp's own
converter; every GGUF here is written by llama.cpp's quantiser.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from alphaq.evaluate import baselines
from alphaq.errors import AlphaQError
from alphaq.allocate.plan import PlanConfig

FIXTURES = Path(__file__).parent / "fixtures"
Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, float_ggufs):
    from alphaq.spectral.analyze import analyze_model

    out = tmp_path_factory.mktemp("baselines")
    bf16 = float_ggufs["mixtral"]
    fm = baselines.FloatModel.open(bf16)
    stats = analyze_model(bf16, progress=False, use_cache=False)
    return fm, stats, out


@pytest.fixture(scope="module")
def imatrix(mixtral):
    from alphaq.evaluate.corpus import read_text
    from alphaq.importance.real_text import ImatrixConfig, compute_imatrix

    fm, _, _ = mixtral
    text = read_text("prose", "val", max_chars=30_000)
    return compute_imatrix(FIXTURES / "mixtral", fm.path, text, ImatrixConfig(n_ctx=128, max_windows=4, batch=4))


def test_imatrix_names_sizes_and_routing_counts(mixtral, imatrix):
    fm, _, _ = mixtral
    cfg = json.loads((FIXTURES / "mixtral" / "config.json").read_text())
    shapes = {t.name: t.shape for t in fm.tensors}
    # every matrix llama.cpp multiplies activations with: all 2-D/3-D weights but the embedding
    # lookup (get_rows) and the router, which llama.cpp never quantises
    want = {n for n, s in shapes.items() if len(s) >= 2 and n != "token_embd.weight" and "ffn_gate_inp" not in n}
    assert set(imatrix.data) == want
    baselines.check_imatrix(fm, imatrix.data)  # sizes ne0 * n_expert, finite, >= 0
    for name, vec in imatrix.data.items():
        s = shapes[name]
        assert vec.shape == (s[-1] * (s[0] if len(s) == 3 else 1),)
        assert (vec >= 0).all() and vec.max() > 0
    # each token is routed to exactly top_k experts in every block
    assert imatrix.n_tokens == 4 * 128
    for name, counts in imatrix.expert_tokens.items():
        assert counts.shape == (cfg["num_local_experts"],)
        assert counts.sum() == imatrix.n_tokens * cfg["num_experts_per_tok"], name
    # gate and up of the same expert see the same routed inputs; down sees different ones
    g, u, d = (imatrix.data[f"blk.0.ffn_{k}_exps.weight"] for k in ("gate", "up", "down"))
    np.testing.assert_array_equal(g, u)
    assert not np.allclose(g, d)


def test_imatrix_matches_hidden_states_oracle(mixtral, imatrix):
    """attn_q of block 0 sees RMSNorm(embeddings): recompute it without hooks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alphaq.evaluate.corpus import read_text

    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "mixtral", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(FIXTURES / "mixtral")
    ids = tok(read_text("prose", "val", max_chars=30_000), add_special_tokens=False)["input_ids"]
    x = torch.tensor(ids[: 4 * 128]).view(4, 128)
    x[:, 0] = tok.bos_token_id
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(x))
    expect = h.reshape(-1, h.shape[-1]).pow(2).mean(0).numpy()
    np.testing.assert_allclose(imatrix.data["blk.0.attn_q.weight"], expect, rtol=1e-4)


def test_calibrated_stock_differs_from_uncalibrated(mixtral, imatrix):
    fm, _, out = mixtral
    plain, cal = out / "q3km.gguf", out / "q3km-imat.gguf"
    baselines.stock(fm, plain, "Q3_K_M", nthread=1)
    baselines.stock(fm, cal, "Q3_K_M", imatrix=imatrix.data, nthread=1)
    a = {t.name: t for t in GGUFReader(plain).tensors}
    b = {t.name: t for t in GGUFReader(cal).tensors}
    assert {n: t.tensor_type for n, t in a.items()} == {n: t.tensor_type for n, t in b.items()}
    assert plain.stat().st_size == cal.stat().st_size  # same types, same bytes
    changed = [n for n in a if a[n].tensor_type != Q.F32 and not np.array_equal(a[n].data, b[n].data)]
    assert "blk.0.ffn_down_exps.weight" in changed
    unchanged = [n for n in a if a[n].tensor_type in (Q.F32,) and not np.array_equal(a[n].data, b[n].data)]
    assert unchanged == []


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K"])
def test_uniform_baseline_has_the_single_type(mixtral, qtype, tmp_path):
    fm, stats, _ = mixtral
    plan = baselines.uniform_plan(fm, stats, qtype)
    out = tmp_path / "u.gguf"
    size = baselines.write_plan(fm, plan, out, nthread=1)
    written = baselines.file_types(out)
    exps = {n: t for n, t in written.items() if "_exps" in n}
    assert exps and set(exps.values()) == {Q[qtype]}  # width 256: no shape fallback
    assert written["blk.0.attn_q.weight"] == Q.Q4_K and written["output.weight"] == Q.Q6_K
    assert size == plan.totals.predicted_file_bytes


def test_random_baseline_respects_the_budget_and_the_seed(mixtral):
    fm, stats, _ = mixtral
    target = baselines.solve(fm, stats, PlanConfig(budget=3.0)).totals.predicted_file_bytes
    cfg = PlanConfig(budget_mode="size", budget=float(target))
    plans = [baselines.random_plan(fm, stats, cfg, seed=s) for s in (0, 0, 1, 2)]
    for p in plans:
        assert p.totals.predicted_file_bytes <= target
        assert p.totals.predicted_file_bytes >= 0.95 * target  # the budget is used, not wasted
    types = [tuple(it.type for it in p.items) for p in plans]
    assert types[0] == types[1]  # seeded
    assert len(set(types[1:])) > 1  # different seeds, different allocations
    with pytest.raises(AlphaQError):
        baselines.random_plan(fm, stats, PlanConfig(budget_mode="size", budget=1e5), seed=0)


def test_check_imatrix_rejects_wrong_sizes(mixtral, imatrix):
    fm, _, _ = mixtral
    bad = dict(imatrix.data)
    bad["blk.0.ffn_up_exps.weight"] = bad["blk.0.ffn_up_exps.weight"][:256]
    with pytest.raises(AlphaQError, match="entries"):
        baselines.check_imatrix(fm, bad)
    neg = dict(imatrix.data)
    neg["blk.0.attn_q.weight"] = -neg["blk.0.attn_q.weight"]
    with pytest.raises(AlphaQError, match="negative"):
        baselines.check_imatrix(fm, neg)


# ---- router-norm change (paper 004) ---------------------------------------------------------------


def test_router_norm_importance_hand_computed():
    trained = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # row norms 5, 1, 2
    init = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.5]])  # row norms 1, 1, 1.5
    delta = baselines.router_norm_change(trained, init)
    np.testing.assert_allclose(delta, [4.0, 0.0, 0.5])

    experts = [np.array([[1.0, 1, 1, 1], [0, 0, 0, 0]]),  # row variances 0, 0 -> v = 0
               np.array([[0.0, 2, 0, 2], [1, 1, 1, 1]]),  # 1, 0 -> v = 1
               np.array([[0.0, 4, 0, 4], [3, 3, 3, 3]])]  # 4, 0 -> v = 4 (max over rows, not mean)
    v = np.array([baselines.max_row_variance(w) for w in experts])
    np.testing.assert_allclose(v, [0.0, 1.0, 4.0])

    # Δ ranks 1, 0, 0.5 -> 4^(1 - q) = 1, 4, 2; quantile_0.75(v) = 2.5: only expert 2 promoted (x4)
    np.testing.assert_allclose(baselines.router_norm_importance(delta, v), [1.0, 4.0, 8.0])
    # quantile_0.25(v) = 0.5: experts 1 and 2 promoted
    cfg = baselines.RouterNormConfig(var_quantile=0.25)
    np.testing.assert_allclose(baselines.router_norm_importance(delta, v, cfg), [1.0, 16.0, 8.0])
    # two bits of spread, no promotion: 16, 1, 4 -> 1, 16, 4
    cfg = baselines.RouterNormConfig(spread_bits=2.0, promote_bits=0.0)
    np.testing.assert_allclose(baselines.router_norm_importance(delta, v, cfg), [1.0, 16.0, 4.0])
    with pytest.raises(AlphaQError):
        baselines.router_norm_change(trained, init[:2])


def test_router_norm_costs_match_an_oracle_from_the_files(mixtral):
    """Δ from the GGUF's own router (blk.N.ffn_gate_inp) and the HF router at init, v and Var from
    the expert slices: the plan's costs are exactly imp · Var · 2^(-2b) for every expert slice."""
    from safetensors.numpy import load_file

    fm, stats, _ = mixtral
    init = load_file(str(FIXTURES / "mixtral" / "router_init.safetensors"))
    reader = GGUFReader(fm.path)
    gate_inp = {t.name: np.asarray(t.data, np.float64) for t in reader.tensors if t.name.endswith("ffn_gate_inp.weight")}
    assert len(gate_inp) == 2
    slices = {}
    from alphaq.model.weights import open_model

    with open_model(fm.path) as w:
        for m in w.matrices():
            if m.expert is not None:
                slices[(m.tensor, m.expert)] = m.load().astype(np.float64)

    cfg = PlanConfig(budget=3.0, granularity="expert")
    plan = baselines.router_norm_plan(fm, stats, cfg, FIXTURES / "mixtral")
    assert plan.totals.nominal_bits <= 3.0
    assert len(plan.items) == len(slices)
    n_checked = 0
    for it in plan.items:
        b = it.block
        trained = gate_inp[f"blk.{b}.ffn_gate_inp.weight"]  # (n_expert, hidden)
        # this fixture's init file spells it 'block_sparse_moe.gate', the bench models' 'mlp.gate'
        (r0,) = [w for k, w in init.items() if k.startswith(f"model.layers.{b}.") and k.endswith(".gate.weight")]
        delta = np.abs(np.linalg.norm(trained, axis=1) - np.linalg.norm(r0, axis=1))
        v = np.array([slices[(it.tensor, e)].var(axis=1).max() for e in range(trained.shape[0])])
        rank = np.argsort(np.argsort(delta)) / (len(delta) - 1)  # no ties in real weights
        imp = 4.0 ** (1 - rank) * np.where(v > np.quantile(v, 0.75), 4.0, 1.0)
        var = slices[(it.tensor, it.expert)].var()
        for name, cost in it.costs.items():
            want = imp[it.expert] * var * 2.0 ** (-2 * {"IQ1_S": 1, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4}[name])
            assert cost == pytest.approx(want, rel=1e-4)
            n_checked += 1
    assert n_checked == len(slices) * 4
    # with both terms switched off the costs are AlphaQ's at γ=0, so is the plan; with them on, not
    flat = baselines.router_norm_plan(fm, stats, cfg, FIXTURES / "mixtral",
                                      baselines.RouterNormConfig(spread_bits=0.0, promote_bits=0.0))
    gamma0 = baselines.solve(fm, stats, PlanConfig(budget=3.0, granularity="expert", gamma=0.0))
    assert [it.type for it in flat.items] == [it.type for it in gamma0.items]
    assert [it.type for it in plan.items] != [it.type for it in gamma0.items]


def test_calibrated_loss_weights_each_expert_by_its_own_activations(mixtral, imatrix):
    """measure_table with an imatrix: slice (tensor, e) is weighted by columns e*cols..(e+1)*cols
    of that tensor's (expert-major) imatrix vector, i.e. the loss on the calibration text."""
    from alphaq.allocate import costs
    from alphaq.model.weights import open_model

    fm, stats, _ = mixtral
    cfg = PlanConfig(noise="measured", mse_rows=16)
    table = baselines.measure_table(fm, stats, cfg, imatrix=imatrix.data)
    plain = baselines.measure_table(fm, stats, cfg)
    key = next(k for k in table if k[1] == 1 and "ffn_down_exps" in k[0])
    name, e = key
    with open_model(fm.path) as weights:
        w = next(m for m in weights.matrices() if (m.tensor, m.expert) == key).load()
    cols = w.shape[1]
    vec = imatrix.data[name][e * cols:(e + 1) * cols]
    for t, v in table[key].items():
        assert v == pytest.approx(costs.measured_mse(w, [t], 16, vec)[t], rel=1e-12)
    assert table[key] != plain[key]


def test_alpha_only_costs_are_importance_times_bits_without_variance(mixtral):
    """Ablation "α only": cost of slice l at type t = (α̃/α_l)^γ · 2^(-2 b(t)), α̃ the median α of
    the allocated slices; no Var(W) factor. Checked against the formula written out here, and the
    plan it solves is the brute-force optimum of those costs under the budget."""
    import itertools

    from alphaq.gguf.qtypes import nominal_bits

    fm, stats, _ = mixtral
    cfg = PlanConfig(budget=2.5, noise="measured", gamma=0.0)
    table = baselines.alpha_only_noise_table(fm, stats, cfg, gamma=1.0)
    experts = [s for s in stats if (s.tensor, s.expert) in table]
    assert experts and all(s.expert is not None for s in experts)
    tilde = float(np.median([s.alpha for s in experts if s.signal]))
    for s in experts:
        w = tilde / s.alpha if s.signal else 1.0
        for t, v in table[(s.tensor, s.expert)].items():
            assert v == pytest.approx(w * 2.0 ** (-2 * nominal_bits(t)), rel=1e-12)
    plan = baselines.alpha_only_plan(fm, stats, PlanConfig(budget=2.5), gamma=1.0)
    assert plan.totals.nominal_bits <= 2.5 + 1e-9

    tensors = sorted({s.tensor for s in experts})
    params = {n: sum(s.rows * s.cols for s in experts if s.tensor == n) for n in tensors}
    types = {n: list(table[next((s.tensor, s.expert) for s in experts if s.tensor == n)]) for n in tensors}
    cost = {(n, t): sum(table[(s.tensor, s.expert)][t] for s in experts if s.tensor == n) for n in tensors for t in types[n]}
    total = sum(params.values())
    best = min((sum(cost[(n, t)] for n, t in zip(tensors, choice)), choice)
               for choice in itertools.product(*(types[n] for n in tensors))
               if sum(params[n] * nominal_bits(t) for n, t in zip(tensors, choice)) <= 2.5 * total + 1e-9)
    got = {it.tensor: it.type for it in plan.items}
    assert sum(cost[(n, got[n])] for n in tensors) == pytest.approx(best[0], rel=1e-12)
