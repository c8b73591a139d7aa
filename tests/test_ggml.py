"""alphaq.gguf.ggml (ctypes to libggml-base) against gguf-py's reference quantisers and dequantisers."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize as gguf_quantize

from alphaq.allocate import costs

from alphaq.gguf import ggml

from alphaq.gguf import qtypes
from alphaq.errors import AlphaQError


def _weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Heavy-ish tailed rows with per-row scales, like trained weights (not a model: a quantiser input)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=5, size=(rows, cols)) * 0.02
    x *= rng.uniform(0.5, 2.0, size=(rows, 1))
    return x.astype(np.float32)


def test_library_is_the_installed_llama_cpp():
    path = ggml.find_libggml()
    assert path.parent.name == "lib" and path.parent.parent.name == "llama_cpp"
    assert ggml.type_name(T.Q4_K) == "q4_K"
    assert ggml.type_name(T.IQ1_S) == "iq1_s"


# gguf-py implements these quantisers in numpy, written to match ggml bit for bit
@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.BF16, T.F16], ids=lambda t: t.name)
def test_quantize_is_bit_exact_with_gguf_py(t):
    x = _weights(16, 512)
    x[3, 17] = 0.5  # an outlier, so that block scales differ
    x[5, :32] = 0.0  # an all-zero block
    ours = ggml.quantize(x, t, imatrix=None)
    ref = gguf_quantize(x, t)
    assert ours.shape == (16, ggml.row_size(t, 512))
    assert np.array_equal(ours.view(np.uint8).reshape(-1), np.ascontiguousarray(ref).view(np.uint8).reshape(-1))


@pytest.mark.parametrize("name", sorted(set(qtypes.DEFAULT_CANDIDATES) | {"IQ2_XXS", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "Q4_0", "Q5_0"}))
def test_round_trip_error_is_sane(name):
    """Relative MSE after ggml quantise -> gguf-py dequantise is of the order 4^-b of the nominal bits
    (App. A.6), and ordered by bits. A wrong layout or dequantiser gives ~1 or worse."""
    t = qtypes.resolve_type(name)
    x = _weights(16, 512, seed=1)
    q = ggml.quantize(x, t)
    y = dequantize(q, t).reshape(x.shape)
    rel = float(np.mean((y - x) ** 2) / np.mean(x**2))
    b = qtypes.nominal_bits(t)
    assert 0.5 * 4.0**-b < rel < 6.0 * 4.0**-b, (name, rel)


def test_round_trip_error_decreases_with_bits():
    x = _weights(16, 512, seed=2)
    order = [T.IQ1_S, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0]
    mse = costs.measured_mse(x, order)
    values = [mse[t] for t in order]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_imatrix_handling():
    x = _weights(4, 256)
    assert T.IQ1_S in ggml.LLAMA_IMATRIX_TYPES
    with pytest.raises(AlphaQError):
        ggml.quantize(x, T.IQ1_S, imatrix=None)  # ggml would abort the process
    auto = ggml.quantize(x, T.IQ1_S)  # "auto": all-ones for the types llama.cpp requires it for
    ones = ggml.quantize(x, T.IQ1_S, imatrix=np.ones(256, dtype=np.float32))
    assert np.array_equal(auto, ones)
    # for other types "auto" means no imatrix, which is not the same as an all-ones one
    assert np.array_equal(ggml.quantize(x, T.Q4_K), ggml.quantize(x, T.Q4_K, imatrix=None))
    assert not np.array_equal(ggml.quantize(x, T.Q4_K, imatrix=None), ggml.quantize(x, T.Q4_K, imatrix="ones"))


@pytest.mark.parametrize("t", [t for t in T if t in GGML_QUANT_SIZES and t.name not in ("Q8_1", "Q8_K")])
def test_llama_imatrix_types_cover_ggml_requirements(t):
    if ggml.ggml_requires_imatrix(t):
        assert ggml.needs_imatrix(t)


def test_quantize_rejects_bad_input():
    with pytest.raises(AlphaQError):
        ggml.quantize(np.zeros((4, 160), np.float32), T.Q4_K)
    with pytest.raises(AlphaQError):
        ggml.quantize(np.zeros(256, np.float32), T.Q4_K)


def test_row_subsample_is_deterministic_and_spread():
    idx = costs.sample_rows(1000, 128)
    assert len(idx) == 128 and idx[0] == 0 and idx[-1] == 999 and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, costs.sample_rows(1000, 128))
    assert np.array_equal(costs.sample_rows(50, 128), np.arange(50))
    assert np.array_equal(costs.sample_rows(50, None), np.arange(50))


def test_measured_mse_column_weights_are_activation_weighted_error():
    """With column weights c (e.g. an imatrix): mean of c_j * err_ij^2 / mean(c); all-equal weights
    give the plain MSE."""
    x = _weights(16, 256, seed=5)
    c = np.random.default_rng(0).uniform(0.0, 3.0, 256)
    err = (dequantize(ggml.quantize(x, T.Q2_K), T.Q2_K).reshape(16, 256).astype(np.float64) - x) ** 2
    got = costs.measured_mse(x, [T.Q2_K], col_weights=c)[T.Q2_K]
    assert got == pytest.approx(float(np.mean(err * c / c.mean())), rel=1e-12)
    plain = costs.measured_mse(x, [T.Q2_K])[T.Q2_K]
    assert costs.measured_mse(x, [T.Q2_K], col_weights=np.full(256, 7.0))[T.Q2_K] == pytest.approx(plain, rel=1e-12)
    assert got != pytest.approx(plain, rel=1e-3)


def test_measured_mse_uses_the_sampled_rows_only():
    x = _weights(64, 256, seed=3)
    sub = costs.measured_mse(x, [T.Q3_K], max_rows=8)[T.Q3_K]
    rows = costs.sample_rows(64, 8)
    direct = float(np.mean((dequantize(ggml.quantize(x[rows], T.Q3_K), T.Q3_K).reshape(8, 256) - x[rows]) ** 2))
    assert sub == pytest.approx(direct, rel=1e-12)
    full = costs.measured_mse(x, [T.Q3_K])[T.Q3_K]
    assert full == pytest.approx(sub, rel=0.5)  # an estimate of the same quantity


def test_quantiser_slabs_write_the_same_bytes(float_ggufs, tmp_path, monkeypatch):
    """llama.cpp's quantiser under our buffer bound (QUANTISER_BUFFER_BYTES) writes what it writes with
    its own 8 GiB default: here one row per slab, each expert's rows with their own importance vector."""
    import gguf

    import alphaq.gguf.quantize as q
    from alphaq.gguf.io import read_tensors

    src = float_ggufs["mixtral"]
    rng = np.random.default_rng(0)
    types, imatrix = {}, {}
    for t in read_tensors(src):
        if len(t.shape) < 2 or "norm" in t.name or "gate_inp" in t.name:
            continue
        types[t.name] = T.IQ2_XS if "_exps" in t.name else T.Q4_K
        n_mat = t.shape[0] if len(t.shape) == 3 else 1
        imatrix[t.name] = rng.uniform(0.1, 4.0, n_mat * t.shape[-1]).astype(np.float32)
    written = {}
    for label, buffer in (("whole", 0), ("rows", 1)):
        monkeypatch.setattr(q, "QUANTISER_BUFFER_BYTES", buffer)
        q.quantize_gguf(src, tmp_path / f"{label}.gguf", types, imatrix=imatrix)
        written[label] = {t.name: bytes(t.data) for t in gguf.GGUFReader(tmp_path / f"{label}.gguf").tensors}
    assert any("_exps" in n for n in written["whole"])
    assert written["rows"] == written["whole"]
