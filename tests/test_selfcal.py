"""The default path's forward stages against independent references.

* self text: deterministic, starts at BOS, never draws end/control tokens, and draws follow softmax;
* importance matrix (llama.cpp eval callback) against the same statistic from torch hooks on the
  HF model, on the same tokens;
* fake quantisation in llama.cpp's buffer against the tensor llama.cpp's own quantiser writes;
* KL: direction and value against plain numpy, and the in-buffer measurement against a file
  quantised by llama.cpp and run by llama-cpp-python;
* the estimated damage against the direct measurement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from alphaq.damage import (
    DamageConfig,
    Reference,
    Swap,
    from_float32,
    kl_per_token,
    log_softmax,
    quant_dequant,
    to_float32,
)
from alphaq.damage.measure import measure
from alphaq.runtime.forward import GGML_TYPE_BF16, Session
from alphaq.importance.collect import collect_imatrix
from alphaq.gguf.qtypes import resolve_types
from alphaq.selftext import SelfTextConfig, draw, sample

FIXTURES = Path(__file__).parent / "fixtures"
Q4_K = GGMLQuantizationType.Q4_K


@pytest.fixture(scope="module")
def own_text(float_ggufs):
    return sample(float_ggufs["mixtral"], SelfTextConfig(n_seq=4, n_ctx=64, seed=3))


@pytest.fixture(scope="module")
def session(float_ggufs):
    with Session(float_ggufs["mixtral"], 64) as s:
        yield s


def test_self_text_is_deterministic_and_starts_at_bos(float_ggufs, own_text, session):
    again = sample(float_ggufs["mixtral"], SelfTextConfig(n_seq=4, n_ctx=64, seed=3))
    assert again.tobytes() == own_text.tobytes()
    other = sample(float_ggufs["mixtral"], SelfTextConfig(n_seq=4, n_ctx=64, seed=4))
    assert other.tobytes() != own_text.tobytes()
    assert (own_text[:, 0] == session.bos).all()
    lc, vocab = session._lc, session._vocab
    assert not any(lc.llama_vocab_is_eog(vocab, int(t)) or lc.llama_vocab_is_control(vocab, int(t))
                   for t in own_text[:, 1:].ravel())


def test_draws_follow_softmax_at_the_temperature():
    logits = np.array([[0.0, 1.0, 2.0, -1.0, 5.0]] * 40000, dtype=np.float32)
    ban = np.array([False, False, False, False, True])
    for temp in (1.0, 2.0):
        got = np.bincount(draw(logits, ban, temp, np.random.default_rng(0)), minlength=5) / len(logits)
        p = np.exp(logits[0, :4] / temp)
        p /= p.sum()
        assert got[4] == 0
        np.testing.assert_allclose(got[:4], p, atol=0.01)


def test_importance_matches_torch_hooks_on_the_hf_model(float_ggufs, own_text, session):
    from alphaq.importance.real_text import compute_imatrix

    ours = collect_imatrix(session, own_text)
    ref = compute_imatrix(FIXTURES / "mixtral", float_ggufs["mixtral"], None, windows=own_text)
    means = ours.means()
    assert set(ref.data) <= set(means)
    for name, vec in ref.data.items():
        got = means[name]
        assert got.shape == vec.shape
        # bf16 weights in llama.cpp vs float32 torch: close, not equal; a wrong column, expert or
        # token mapping would be far off
        rel = np.abs(got - vec).sum() / np.abs(vec).sum()
        assert rel < 0.03, (name, rel)
    for name, counts in ref.expert_tokens.items():
        np.testing.assert_allclose(ours.counts[name], counts, atol=max(2, 0.02 * counts.sum()))
        assert ours.counts[name].sum() == own_text.size * 2  # Mixtral fixture: top-2 routing


def test_fake_quantisation_equals_what_llama_cpp_writes(float_ggufs, own_text, session, tmp_path):
    from alphaq.gguf.quantize import quantize_gguf
    from alphaq.gguf.io import read_tensors

    means = collect_imatrix(session, own_text).means()
    name = "blk.1.ffn_down_exps.weight"
    types = {n: GGMLQuantizationType.Q8_0 for n in (t.name for t in read_tensors(float_ggufs["mixtral"]))
             if n.endswith(".weight") and "norm" not in n and "gate_inp" not in n}
    types[name] = GGMLQuantizationType.IQ2_XS
    out = tmp_path / "q.gguf"
    quantize_gguf(float_ggufs["mixtral"], out, types, imatrix={name: means[name]})
    import gguf

    t = next(t for t in gguf.GGUFReader(out).tensors if t.name == name)
    written = dequantize(t.data, t.tensor_type).reshape(session.weights[name].shape)
    buf = session.weights[name]
    cols = buf.shape[-1]
    for e in range(buf.shape[0]):
        w = to_float32(buf.view()[e], buf.ggml_type)
        ours = quant_dequant(w, GGMLQuantizationType.IQ2_XS, means[name][e * cols:(e + 1) * cols])
        np.testing.assert_array_equal(ours, written[e])


def test_swap_writes_the_rounded_values_and_restores_the_bytes(session):
    buf = session.weights["blk.0.attn_q.weight"]
    before = buf.view().copy()
    with Swap(buf, Q4_K, None):
        inside = buf.view().copy()
        expected = from_float32(quant_dequant(to_float32(before, GGML_TYPE_BF16), Q4_K, None), GGML_TYPE_BF16)
        np.testing.assert_array_equal(inside, expected)
        assert not np.array_equal(inside, before)
    np.testing.assert_array_equal(buf.view(), before)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.1.ffn_down_exps.weight"])
def test_threaded_swap_in_row_blocks_equals_one_quantisation_of_each_matrix(session, own_text, monkeypatch, name):
    # the swap quantises row blocks and experts on threads: the values must not depend on it
    means = collect_imatrix(session, own_text).means()[name]
    buf = session.weights[name]
    monkeypatch.setattr(Swap, "WEIGHTS_PER_JOB", 7 * buf.shape[-1])  # 7 rows a job
    before = buf.view().copy()
    mats = before.reshape(-1, *buf.shape[-2:])
    imat = means.reshape(len(mats), buf.shape[-1])
    expected = np.stack([from_float32(quant_dequant(to_float32(m, GGML_TYPE_BF16), Q4_K, imat[e]), GGML_TYPE_BF16)
                         for e, m in enumerate(mats)]).reshape(before.shape)
    with Swap(buf, Q4_K, imat):
        np.testing.assert_array_equal(buf.view(), expected)
    np.testing.assert_array_equal(buf.view(), before)


def test_kl_direction_and_value_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 7)) * 3, rng.standard_normal((5, 7)) * 3
    p, q = np.exp(log_softmax(a)), np.exp(log_softmax(b))
    want = (p * np.log(p / q)).sum(axis=1)  # KL(p || q), p the reference
    np.testing.assert_allclose(kl_per_token(log_softmax(a), log_softmax(b)), want, rtol=1e-10)
    assert not np.allclose(want, (q * np.log(q / p)).sum(axis=1), rtol=0.05)  # the direction matters here


def _llama_logprobs(path: Path, windows: np.ndarray) -> list[np.ndarray]:
    """log-softmax of llama-cpp-python's logits, computed here in plain numpy."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], logits_all=True, verbose=False, seed=0)
    out = []
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        z = np.asarray(llm.scores[: len(w)], dtype=np.float64)
        z = z - z.max(1, keepdims=True)
        out.append(z - np.log(np.exp(z).sum(1, keepdims=True)))
    return out


def test_in_buffer_kl_matches_a_quantised_file_run_by_llama_cpp(float_ggufs, own_text, session, tmp_path):
    """One tensor at Q4_K in llama.cpp's buffer vs a GGUF llama.cpp quantised with only that tensor
    at Q4_K (everything else BF16): KL(BF16 file || that file), both run by llama-cpp-python and
    scored in plain numpy."""
    from alphaq.gguf.io import read_tensors
    from alphaq.gguf.quantize import quantize_gguf

    name = "blk.1.attn_output.weight"
    ref = Reference(session, own_text)
    with Swap(session.weights[name], Q4_K, None):
        ours = ref.kl(session)
    keep = {t.name: GGMLQuantizationType.BF16 for t in read_tensors(float_ggufs["mixtral"]) if len(t.shape) >= 2
            and "gate_inp" not in t.name}
    keep[name] = Q4_K
    out = tmp_path / "one.gguf"
    quantize_gguf(float_ggufs["mixtral"], out, keep)
    total = 0.0
    for lq, lp in zip(_llama_logprobs(float_ggufs["mixtral"], own_text), _llama_logprobs(out, own_text)):
        total += float((np.exp(lq) * (lq - lp)).sum())
    theirs = total / own_text.size
    assert theirs > 1e-5
    # the file's matmul also quantises activations (Q8_K): close, not equal (1.3 % when written)
    assert abs(ours - theirs) / theirs < 0.1, (ours, theirs)


def test_estimated_damage_ranks_like_the_direct_measurement(own_text, session):
    from alphaq.importance.collect import collect_imatrix as collect

    im = collect(session, own_text)
    ref = Reference(session, own_text)
    names = ["token_embd.weight", "blk.0.attn_v.weight", "blk.1.ffn_down_exps.weight", "output.weight"]
    types = resolve_types(["IQ2_XXS", "Q2_K", "Q3_K", "Q4_K", "Q6_K"])
    kw = dict(imatrix=im.means(), tokens=im.counts)
    direct = measure(session, ref, names, types, DamageConfig(method="direct"), **kw)
    est = measure(session, ref, names, types, DamageConfig(method="estimate"), **kw)
    a = [direct.costs[k][t] for k in direct.costs for t in direct.costs[k]]
    b = [est.costs[k][t] for k in direct.costs for t in direct.costs[k]]
    from scipy.stats import spearmanr

    assert spearmanr(a, b).statistic > 0.9
    for k in direct.costs:  # the reference type is measured, not estimated
        assert est.costs[k]["Q4_K"] == pytest.approx(direct.costs[k]["Q4_K"], rel=1e-9)


def test_depth_anchors_pick_first_last_and_between():
    from alphaq.damage.anchors import anchor_positions, depth_anchors

    assert anchor_positions(48, 4) == [0, 16, 31, 47]
    assert anchor_positions(3, 4) == [0, 1, 2]
    assert anchor_positions(5, 1) == [2]
    names = ["token_embd.weight", *(f"blk.{b}.{k}" for b in range(10) for k in ("attn_q.weight", "ffn_up_exps.weight")),
             "blk.0.ffn_up.weight", "output.weight"]  # a dense block 0 has its own kind
    a = depth_anchors(names, 3)
    assert a.measured == {"token_embd.weight", "output.weight", "blk.0.ffn_up.weight",
                          *(f"blk.{b}.{k}" for b in (0, 4, 9) for k in ("attn_q.weight", "ffn_up_exps.weight"))}
    assert a.of("blk.7.attn_q.weight") == ["blk.0.attn_q.weight", "blk.4.attn_q.weight", "blk.9.attn_q.weight"]
    values = {"blk.0.attn_q.weight": 1.0, "blk.4.attn_q.weight": 3.0, "blk.9.attn_q.weight": 13.0}
    assert a.interpolate("blk.2.attn_q.weight", values) == pytest.approx(2.0)
    assert a.interpolate("blk.7.attn_q.weight", values) == pytest.approx(9.0)
    assert depth_anchors(names, None).measured == set(names)
    assert DamageConfig().windows(names) == 2 and DamageConfig(anchors=10).windows(names) == 16


def test_default_anchors_measure_up_to_8_blocks_in_full_and_8_per_kind_beyond():
    """The default measured on a 24-block model (bench/selfcal-deep24.json): 8 anchors per kind."""
    from alphaq.damage.anchors import depth_anchors

    def blocks(n):
        return [f"blk.{b}.{k}" for b in range(n) for k in ("attn_q.weight", "ffn_up_exps.weight")] + ["output.weight"]

    eight, deep = blocks(8), blocks(24)
    assert depth_anchors(eight, DamageConfig().anchors).measured == set(eight)
    assert DamageConfig().windows(eight) == 16
    measured = depth_anchors(deep, DamageConfig().anchors).measured
    assert len(measured) == 2 * 8 + 1 and {"blk.0.attn_q.weight", "blk.23.attn_q.weight"} <= measured
    assert DamageConfig().windows(deep) == 2


def test_anchored_damage_is_the_anchor_rate_times_own_weighted_error(own_text, session):
    im = collect_imatrix(session, own_text)
    ref = Reference(session, own_text[:2])
    names = ["blk.0.attn_v.weight", "blk.1.attn_v.weight", "blk.0.ffn_gate_exps.weight", "blk.1.ffn_gate_exps.weight"]
    types = resolve_types(["IQ2_XXS", "Q3_K", "Q4_K", "Q6_K"])
    kw = dict(imatrix=im.means(), tokens=im.counts)
    full = measure(session, ref, names, types, DamageConfig(anchors=None), **kw)
    one = measure(session, ref, names, types, DamageConfig(anchors=1), **kw)
    assert set(one.measured) == {"blk.0.attn_v.weight", "blk.0.ffn_gate_exps.weight"}
    assert one.interpolated == {"blk.1.attn_v.weight": ["blk.0.attn_v.weight"],
                                "blk.1.ffn_gate_exps.weight": ["blk.0.ffn_gate_exps.weight"]}
    for name in one.measured:  # measured exactly as without anchors
        assert one.costs[(name, None)] == full.costs[(name, None)]
    for name, (anchor,) in one.interpolated.items():
        err, anchor_err = full.weighted_error[(name, None)], full.weighted_error[(anchor, None)]
        for t in ("IQ2_XXS", "Q3_K", "Q6_K"):
            rate = full.costs[(anchor, None)][t] / anchor_err[t]
            assert one.costs[(name, None)][t] == pytest.approx(rate * err[t], rel=1e-9)
        # and it is an estimate, not the measurement
        assert one.costs[(name, None)]["Q4_K"] != pytest.approx(full.costs[(name, None)]["Q4_K"], rel=1e-6)


def test_capped_error_sample_reads_fewer_rows_and_keeps_the_ratios(own_text, session):
    from alphaq.damage.measure import sample_size, sampled_experts

    name = "blk.0.ffn_gate_exps.weight"
    buf = session.weights[name]
    experts = sampled_experts(buf.shape[0], 16)
    assert sample_size(buf, experts, DamageConfig()) == 128  # the zoo's tensors are below the cap
    assert sample_size(buf, experts, DamageConfig(max_sampled_weights=1)) == 16  # never fewer than 16 rows
    im = collect_imatrix(session, own_text)
    ref = Reference(session, own_text[:1])
    types = resolve_types(["IQ2_XXS", "Q3_K", "Q4_K", "Q6_K"])
    kw = dict(imatrix=im.means(), tokens=im.counts)
    full = measure(session, ref, [name], types, DamageConfig(), **kw).weighted_error[(name, None)]
    capped = measure(session, ref, [name], types, DamageConfig(max_sampled_weights=1), **kw).weighted_error[(name, None)]
    assert capped != full
    for t in ("IQ2_XXS", "Q3_K", "Q6_K"):  # the ratios that scale the damage barely move on 16 rows
        assert capped[t] / capped["Q4_K"] == pytest.approx(full[t] / full["Q4_K"], rel=0.15)


def test_per_expert_costs_add_up_to_the_tensor(own_text, session):
    im = collect_imatrix(session, own_text)
    ref = Reference(session, own_text[:2])
    name = "blk.0.ffn_up_exps.weight"
    types = resolve_types(["Q2_K", "Q4_K"])
    whole = measure(session, ref, [name], types, DamageConfig(max_experts=None), imatrix=im.means(), tokens=im.counts)
    split = measure(session, ref, [name], types, DamageConfig(), imatrix=im.means(), tokens=im.counts, per_expert=True)
    assert len(split.costs) == session.weights[name].shape[0]
    for t in ("Q2_K", "Q4_K"):
        assert sum(c[t] for c in split.costs.values()) == pytest.approx(whole.costs[(name, None)][t], rel=1e-9)


def test_default_error_sample_leaves_every_fixture_tensor_as_measured_in_the_grid(float_ggufs):
    """The zoo grid (bench/selfcal-autocap.json) was measured with weighted errors on at most 2^20
    sampled weights per tensor; the default's smaller cap must give every fixture tensor the same
    rows, or the README's headline no longer describes the default."""
    from types import SimpleNamespace

    from gguf import GGUFReader

    from alphaq.damage.measure import sample_size, sampled_experts

    grid = DamageConfig(max_sampled_weights=1 << 20)
    assert DamageConfig().max_sampled_weights < grid.max_sampled_weights  # else this test says nothing
    seen = 0
    for path in float_ggufs.values():
        for t in GGUFReader(path).tensors:
            if len(t.shape) < 2:
                continue
            buf = SimpleNamespace(shape=tuple(int(n) for n in reversed(t.shape.tolist())))  # numpy order
            experts = sampled_experts(buf.shape[0], DamageConfig().max_experts) if len(buf.shape) == 3 else None
            assert sample_size(buf, experts, DamageConfig()) == sample_size(buf, experts, grid), t.name
            seen += 1
    assert seen > 50


@pytest.mark.parametrize("per_expert", [False, True])
def test_a_stopped_damage_stage_resumes_from_its_journal(per_expert, own_text, session, tmp_path, monkeypatch):
    """Every tensor's results go to the journal as they are made; a re-run takes the recorded ones
    (a line cut short by a kill is measured again) and its table is the uninterrupted one, float for
    float; a journal of other settings is ignored."""
    import alphaq.damage.measure as measure_mod
    from alphaq.damage.journal import Journal

    im = collect_imatrix(session, own_text)
    ref = Reference(session, own_text[:2])
    names = ["blk.0.attn_v.weight", "blk.0.ffn_gate_exps.weight", "blk.1.attn_v.weight", "blk.1.ffn_gate_exps.weight"]
    types = resolve_types(["IQ2_XXS", "Q3_K", "Q4_K", "Q6_K"])
    kw = dict(imatrix=im.means(), tokens=im.counts, per_expert=per_expert)
    cfg = DamageConfig(anchors=1)  # blk.1 interpolated: resumed records of both kinds
    path = tmp_path / "k.partial.jsonl"
    whole = measure(session, ref, names, types, cfg, journal=Journal(path, "k"), **kw)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + len(names) and whole.resumed == 0
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])  # 2 records + a torn one
    made = []
    real = measure_mod._measure_tensor
    monkeypatch.setattr(measure_mod, "_measure_tensor", lambda s, r, buf, *a: made.append(buf.name) or real(s, r, buf, *a))
    resumed = measure(session, ref, names, types, cfg, journal=Journal(path, "k"), **kw)
    assert made == names[2:] and resumed.resumed == 2
    for field in ("costs", "measured", "interpolated", "weighted_error", "passes"):
        assert getattr(resumed, field) == getattr(whole, field), field
    assert "2 of the 4 tensors' results resumed from a stopped run" in resumed.describe()
    assert sorted(Journal(path, "k").done) == sorted(names)  # the torn line did not swallow a new record
    made.clear()
    other = measure(session, ref, names, types, cfg, journal=Journal(path, "another key"), **kw)
    assert made == names and other.costs == whole.costs
