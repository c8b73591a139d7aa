"""alphaq.spectral.native (the spectral stage's compiled kernels) against LAPACK and numpy: eigvalsh for the
symmetric matrices, scipy's eigvalsh_tridiagonal for the QL half, np.var for the moments."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from alphaq.spectral import native

from alphaq.spectral import alpha as spectral
from alphaq.spectral.alpha import SpectralConfig, farms_eigenvalues, hill_alpha

def any_backend(test):
    """Marks a test that runs with or without the compiled kernel."""
    test.any_backend = True
    return test


@pytest.fixture(autouse=True)
def kernel(request):
    """Skip with the true reason when the kernel is off on purpose or there is no compiler; fail
    when a compiler is there and the build fails (a defect in native.c or its flags)."""
    why = None if getattr(request.function, "any_backend", False) else native.unavailable_reason()
    if why is None:
        return
    if why.startswith("compiling"):
        pytest.fail(f"the native kernel does not build on this machine: {why}")
    pytest.skip(f"native kernel unavailable: {why}")


def bf16_grams(count: int, n: int, seed: int, rows: int | None = None) -> np.ndarray:
    """Gram matrices B^T B of BF16-valued blocks, as FARMS builds them."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(count, rows or n, n, generator=g).mul(0.02).bfloat16().double().numpy()
    return np.matmul(b.transpose(0, 2, 1), b)


def assert_close_to_lapack(got: np.ndarray, want: np.ndarray, tol: float = 1e-13) -> None:
    assert got.shape == want.shape
    scale = np.maximum(np.abs(want).max(axis=-1, keepdims=True), np.finfo(np.float64).tiny)
    assert np.all(np.abs(got - want) <= tol * scale), np.abs(got - want).max()
    assert np.all(np.diff(got, axis=-1) >= 0), "not ascending"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 33, 64, 255, 256])
def test_symmetric_eigenvalues_match_eigvalsh(n):
    grams = bf16_grams(5, n, seed=n, rows=n + 3)
    b = torch.randn(4, n + 3, n, generator=torch.Generator().manual_seed(100 + n)).double().numpy()
    b[0][:, n // 2 :] = 0  # rank deficient: exact zero eigenvalues
    b[1] = 0  # all zero
    b[2] *= 1e-20  # tiny weights
    b[3][:, :2] *= 1e4  # two columns dominate
    grams = np.concatenate([grams, np.matmul(b.transpose(0, 2, 1), b), np.eye(n)[None]])
    assert_close_to_lapack(native.symmetric_eigenvalues(grams), np.linalg.eigvalsh(grams))


@pytest.mark.parametrize("sizes", [(5, 11), (1, 7, 2, 30), (64, 64, 128)])
def test_block_diagonal_matrices(sizes):
    """A block-diagonal Gram matrix: at each block's last step the reflector is the identity
    while the previous step's update is still pending, then the next block starts afresh."""
    g = torch.Generator().manual_seed(sum(sizes))
    n = sum(sizes)
    b = np.zeros((n + 4, n))
    r = c = 0
    for k in sizes:
        b[r : r + k + 1, c : c + k] = torch.randn(k + 1, k, generator=g).double().numpy()
        r, c = r + k + 1, c + k
    gram = (b.T @ b)[None]
    assert_close_to_lapack(native.symmetric_eigenvalues(gram), np.linalg.eigvalsh(gram))


def test_only_the_upper_triangle_is_read():
    g = bf16_grams(3, 40, seed=1)
    noisy = g.copy()
    il = np.tril_indices(40, -1)
    noisy[:, il[0], il[1]] = np.nan
    np.testing.assert_array_equal(native.symmetric_eigenvalues(noisy), native.symmetric_eigenvalues(g))


def test_a_matrix_gets_the_same_bits_in_any_batch():
    """Matrices are swept side by side (several per batch), but each one's arithmetic is its own:
    the analysis splits blocks into batches by thread count, and results must not depend on it."""
    grams = bf16_grams(11, 256, seed=3)
    whole = native.symmetric_eigenvalues(grams)
    for k in range(11):
        np.testing.assert_array_equal(native.symmetric_eigenvalues(grams[k : k + 1])[0], whole[k])
    np.testing.assert_array_equal(native.symmetric_eigenvalues(grams[::-1]), whole[::-1])


def tridiagonal_cases(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    m = max(n - 1, 0)
    ds = [rng.standard_normal(n), np.abs(rng.standard_normal(n)) * 1e3, 10.0 ** np.arange(n)[::-1] / 10.0 ** n,
          np.abs(np.arange(n) - n // 2).astype(float),  # Wilkinson-like: nearly equal pairs
          np.ones(n), np.zeros(n)]
    es = [rng.standard_normal(m), rng.standard_normal(m) * 1e-9, np.ones(m), np.ones(m),
          np.full(m, 1e-12), np.zeros(m)]
    es[0][::3] = 0.0  # splits into independent blocks
    return np.array(ds), np.array(es).reshape(len(es), m)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 9, 21, 64, 256])
def test_tridiagonal_eigenvalues_match_lapack(n):
    d, e = tridiagonal_cases(n, np.random.default_rng(n))
    want = np.array([scipy.linalg.eigvalsh_tridiagonal(d[k], e[k]) if n > 1 else d[k] for k in range(len(d))])
    assert_close_to_lapack(native.tridiagonal_eigenvalues(d, e), want)


def test_out_of_range_input_is_refused_and_lapack_takes_the_batch(caplog):
    """Entries beyond ~1e153 would need the rescaling LAPACK does (Gram matrices of float32 weights
    never get there); the kernel refuses, and the spectral stage falls back to eigvalsh."""
    grams = bf16_grams(3, 16, seed=4)
    grams[1] *= 1e160
    with pytest.raises(np.linalg.LinAlgError, match="matrix 1 of 3"):
        native.symmetric_eigenvalues(grams)
    with caplog.at_level(logging.WARNING, logger="alphaq.spectral.alpha"):
        got = spectral._gram_eigenvalues(grams)
    np.testing.assert_array_equal(got, np.linalg.eigvalsh(grams))
    assert "native eigensolver failed" in caplog.text


def test_farms_alpha_agrees_with_the_lapack_path(monkeypatch):
    """Whole spectral stage, kernel on vs off: eigenvalues within 1e-12 of lambda_max, same alpha
    (to 1e-12) and the same tail size k."""
    cfg = SpectralConfig(device="cpu")
    for shape in [(1408, 2048), (512, 768)]:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])).mul(0.02).bfloat16().float().numpy()
        fast = farms_eigenvalues(w, cfg)
        with monkeypatch.context() as m:
            m.setattr(native, "_state", {"error": "off for the test"})
            ref = farms_eigenvalues(w, cfg)
        assert np.abs(fast - ref).max() <= 1e-12 * ref.max(), shape
        (a, k, _), (a_ref, k_ref, _) = hill_alpha(fast, cfg), hill_alpha(ref, cfg)
        assert k == k_ref and a == pytest.approx(a_ref, rel=1e-12), shape


@any_backend
def test_a_failed_compile_is_a_warning_with_the_compilers_error(monkeypatch, tmp_path, caplog):
    """A compiler that rejects native.c: numpy takes over, and the WARNING (not INFO) carries the
    compiler's own error line."""
    cc = tmp_path / "bad-cc"
    cc.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'native.c:1:1: error: no such instruction' >&2\n"
                  "echo 'compilation terminated.' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(cc))
    with caplog.at_level(logging.INFO, logger="alphaq.spectral.native"):
        assert not native.available()
    assert native.unavailable_reason().startswith(f"compiling native.c with {cc} failed")
    assert "error: no such instruction" in native.unavailable_reason()
    [record] = [r for r in caplog.records if r.name == "alphaq.spectral.native"]
    assert record.levelno == logging.WARNING and "error: no such instruction" in record.getMessage()
    assert not list(tmp_path.rglob("*.so")), "a failed compile left a library behind"
    with pytest.raises(RuntimeError, match="unavailable"):
        native.symmetric_eigenvalues(np.eye(3)[None])


@any_backend
def test_without_a_compiler_it_says_so(monkeypatch, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.INFO, logger="alphaq.spectral.native"):
        assert not native.available()
    assert native.unavailable_reason() == "no C compiler (/nonexistent/cc; set $CC)"
    assert [r.levelno for r in caplog.records if r.name == "alphaq.spectral.native"] == [logging.WARNING]


@any_backend
def test_alphaq_native_0_turns_it_off(monkeypatch, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("ALPHAQ_NATIVE", "0")
    with caplog.at_level(logging.INFO, logger="alphaq.spectral.native"):
        assert not native.available()
    assert native.unavailable_reason() == "ALPHAQ_NATIVE=0"
    assert [r.levelno for r in caplog.records if r.name == "alphaq.spectral.native"] == [logging.INFO]  # on purpose


@pytest.mark.parametrize("size", [1, 7, 8, 9, 1000, 3 * 2**20 + 5])
def test_moments_match_numpy_in_float64(size):
    w = (np.random.default_rng(size).standard_normal(size) * 0.02 + 0.003).astype(np.float32)
    n_bad, mean, var = native.moments(w)
    x = w.astype(np.float64)
    assert n_bad == 0
    assert mean == pytest.approx(float(x.mean()), rel=1e-12)
    assert var == pytest.approx(float(x.var()), rel=1e-12)
    assert spectral._finite_variance(w.reshape(1, -1), "w") == var


def test_moments_count_non_finite_weights_and_the_error_names_the_tensor():
    w = np.ones((64, 64), dtype=np.float32)
    w[3, 4], w[5, 6], w[7, 8] = np.nan, np.inf, -np.inf
    n_bad, mean, var = native.moments(w)
    assert n_bad == 3 and np.isnan(mean) and np.isnan(var)
    with pytest.raises(spectral.AlphaQError, match="blk.0.ffn_up_exps.weight has 1 NaN and 2 Inf"):
        spectral._finite_variance(w, "blk.0.ffn_up_exps.weight")


def test_the_library_is_keyed_by_the_cpu(monkeypatch, tmp_path):
    """-march=native code must never reach another CPU through a shared cache directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiler = os.environ.get("CC") or "cc"
    here = native._compile(compiler)
    monkeypatch.setattr(native, "_cpu_id", lambda: b"flags : some other cpu")
    other = native._compile(compiler)
    assert here.exists() and other.exists() and here != other
