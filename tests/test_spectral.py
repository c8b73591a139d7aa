"""alphaq.spectral.alpha against a plain oracle written from the paper / reference code, and against
matrices whose power-law exponent is known."""

from __future__ import annotations

import ctypes
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alphaq.errors import AlphaQError
from alphaq.spectral.alpha import (
    SpectralConfig,
    analyze_matrix,
    farms_eigenvalues,
    hill_alpha,
    population_variance,
    xmin_window,
)

def _single_threaded_openblas() -> None:
    """Pin numpy's bundled OpenBLAS to one thread for the oracle's SVDs.

    Its worker threads spin-wait; on the project's shared 2-core box, with the other core busy,
    that made each 256x256 SVD 3-15x slower and these tests take minutes. There is no numpy API
    for it (threadpoolctl is not a dependency), so call the library's own setter if it is there.
    """
    libs = Path(np.__file__).parent.parent.glob("numpy.libs/*openblas*")
    for lib in libs:
        try:
            dll = ctypes.CDLL(str(lib))
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(dll, sym):
                getattr(dll, sym)(1)
                return


_single_threaded_openblas()

# --------------------------------------------------------------------------------------
# The oracle: deliberately simple, float64, one numpy SVD per block, a Python loop over
# candidates, straight from AlphaQ §3.2 / App. A.3 and Superone77/AlphaQ utils_alpha.py
# (``_svd_eigs_farms``, ``_esd_alpha_from_sorted_eigs`` with fix_fingers="xmin_peak").
# --------------------------------------------------------------------------------------


def oracle_eigs(w: np.ndarray, b: int = 256) -> np.ndarray:
    rows, cols = w.shape
    w = w.astype(np.float64)
    if rows < b or cols < b:
        blocks = [w]
    else:  # reference: range(0, m - m_sub + 1, stride) -> remainder strips dropped
        blocks = [
            w[i : i + b, j : j + b] for i in range(0, rows - b + 1, b) for j in range(0, cols - b + 1, b)
        ]
    return np.sort(np.concatenate([np.linalg.svd(x, compute_uv=False) ** 2 for x in blocks]))


def oracle_alpha(eigs, bins=100, window="reference", zero_rel_tol=1e-12):
    e = eigs[eigs > zero_rel_tol * eigs.max()]
    N = len(e)
    counts, edges = np.histogram(np.log10(e), bins=bins)
    peak = 10 ** edges[np.argmax(counts)]
    lo = math.log10(0.95 * peak) if window == "reference" else 0.95 * peak
    hi = 1.5 * peak
    best_d, best_alpha, best_k = 1.0, math.nan, 0
    for i in range(N - 1):
        xmin = e[i]
        if xmin < lo:
            continue
        if xmin > hi:
            break
        tail = e[i:]
        n = N - i
        alpha = 1 + n / np.sum(np.log(tail / xmin))
        d = np.max(np.abs(1 - (tail / xmin) ** (1 - alpha) - np.arange(n) / n)) if alpha > 1 else 1.0
        if d < best_d:  # strict: first candidate wins ties
            best_d, best_alpha, best_k = d, alpha, n
    return best_alpha, best_k, best_d


# --------------------------------------------------------------------------------------
# test matrices
# --------------------------------------------------------------------------------------


def random_matrix(shape, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)


def structured_matrix(shape, seed):
    """Trained-looking: heavy-tailed entries, a few strong low-rank directions, uneven columns."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    w = rng.standard_t(3, size=shape) * 0.01
    for _ in range(4):
        w += 0.05 * np.outer(rng.standard_normal(rows), rng.standard_normal(cols)) / math.sqrt(cols)
    w *= rng.pareto(3.0, size=cols)[None, :] + 0.5
    return w.astype(np.float32)


SHAPES = [(256, 256), (512, 2048), (2048, 512), (1408, 2048), (100, 300)]


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fast_path_matches_oracle(shape, kind):
    make = random_matrix if kind == "random" else structured_matrix
    w = make(shape, seed=shape[0] * 7 + shape[1])
    cfg = SpectralConfig(device="cpu")
    want_eigs = oracle_eigs(w)
    got_eigs = farms_eigenvalues(w, cfg)
    assert got_eigs.shape == want_eigs.shape
    # Gram eigenvalues carry ~b*eps*lam_max absolute error; compare on that scale
    np.testing.assert_allclose(got_eigs, want_eigs, rtol=1e-9, atol=1e-12 * want_eigs.max())
    want_alpha, want_k, want_d = oracle_alpha(want_eigs)
    got_alpha, got_k, got_d = hill_alpha(got_eigs, cfg)
    assert got_k == want_k
    assert got_alpha == pytest.approx(want_alpha, rel=1e-5)
    assert got_d == pytest.approx(want_d, rel=1e-6)
    res = analyze_matrix(w, name="w", cfg=cfg)
    assert res.signal and res.alpha == got_alpha and res.k == got_k
    assert res.n_eigs == want_eigs.size
    assert res.variance == pytest.approx(float(np.var(w.astype(np.float64))), rel=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_ks_search_is_exact_on_many_spectra(seed):
    """The pruned KS search picks exactly the oracle's candidate, for varied spectra and sizes
    (N up to 5000 takes several refinement levels)."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([40, 300, 1500, 5000]))
    shape = rng.choice(["lognormal", "pareto", "mixture"])
    if shape == "lognormal":
        e = rng.lognormal(0.0, rng.uniform(0.3, 2.0), n)
    elif shape == "pareto":
        e = rng.pareto(rng.uniform(0.5, 4.0), n) + 1.0
    else:
        e = np.concatenate([rng.uniform(0.1, 1.0, n - n // 10), rng.pareto(1.5, n // 10) + 1.0])
    e = np.sort(e * 10.0 ** rng.uniform(-4, 4))
    for window in ("reference", "corrected"):
        cfg = SpectralConfig(xmin_window=window, device="cpu")
        want = oracle_alpha(e, window=window)
        got = hill_alpha(e, cfg)
        assert got[1] == want[1], (shape, n, window)
        assert got[0] == pytest.approx(want[0], rel=1e-9)
        assert got[2] == pytest.approx(want[2], rel=1e-9)


def test_window_reference_quirk_and_corrected():
    # log10 histogram with 3 bins over [0, 3]: counts [1, 1, 4] -> peak = 10**2 = 100 (linear)
    e = np.array([1.0, 10.0, 100.0, 100.0, 100.0, 1000.0])
    lo, hi = xmin_window(e, SpectralConfig(bins=3))
    assert lo == pytest.approx(math.log10(95.0)) and hi == pytest.approx(150.0)
    lo, hi = xmin_window(e, SpectralConfig(bins=3, xmin_window="corrected"))
    assert lo == pytest.approx(95.0) and hi == pytest.approx(150.0)


def test_windows_differ_when_peak_above_one():
    """With peak >> 1 the reference's log10 lower bound lets candidates far below 0.95*peak in;
    the corrected window does not. Both agree with the oracle."""
    w = structured_matrix((512, 2048), seed=3) * 300.0  # eigenvalues ~1e2..1e4: peak > 1.05
    e = oracle_eigs(w)
    ref = hill_alpha(e, SpectralConfig(device="cpu"))
    cor = hill_alpha(e, SpectralConfig(device="cpu", xmin_window="corrected"))
    assert ref[1] == oracle_alpha(e)[1] and cor[1] == oracle_alpha(e, window="corrected")[1]
    assert ref[0] == pytest.approx(oracle_alpha(e)[0], rel=1e-9)
    assert cor[0] == pytest.approx(oracle_alpha(e, window="corrected")[0], rel=1e-9)
    lo_c, _ = xmin_window(e, SpectralConfig(xmin_window="corrected"))
    lo_r, _ = xmin_window(e, SpectralConfig())
    assert lo_r < lo_c / 10  # the quirk really binds differently here
    xmin_cor = np.sort(e)[e.size - cor[1]]
    assert xmin_cor >= lo_c


# --------------------------------------------------------------------------------------
# ground truth: a known power-law spectrum
# --------------------------------------------------------------------------------------


def pareto_matrix(alpha: float, n_blocks_side: int, seed: int):
    """W whose every 256x256 FARMS block is U diag(s) V^T with lam = s^2 ~ density lam^-alpha
    (lam >= 1), so the pooled FARMS spectrum is an exact Pareto sample."""
    rng = np.random.default_rng(seed)
    b = 256
    w = np.zeros((b * n_blocks_side, b * n_blocks_side))
    lams = []
    # one random orthogonal pair serves every block: each block's spectrum is still its own lam
    u, _ = np.linalg.qr(rng.standard_normal((b, b)))
    v, _ = np.linalg.qr(rng.standard_normal((b, b)))
    for r in range(n_blocks_side):
        for c in range(n_blocks_side):
            lam = rng.uniform(size=b) ** (-1.0 / (alpha - 1.0))  # inverse-CDF Pareto, xmin = 1
            w[r * b : (r + 1) * b, c * b : (c + 1) * b] = (u * np.sqrt(lam)) @ v.T
            lams.append(lam)
    return w, np.sort(np.concatenate(lams))


@pytest.mark.parametrize("alpha_true", [2.0, 3.0, 4.5])
def test_recovers_known_power_law_exponent(alpha_true):
    w, lam = pareto_matrix(alpha_true, n_blocks_side=4, seed=int(alpha_true * 10))
    cfg = SpectralConfig(device="cpu")
    eigs = farms_eigenvalues(w, cfg)
    np.testing.assert_allclose(eigs, lam, rtol=1e-8)
    alpha, k, _ = hill_alpha(eigs, cfg)
    # Hill MLE on k Pareto samples: sd(alpha_hat) = (alpha - 1) / sqrt(k). 4 sd is loose enough
    # for any seed and still tight: alpha_true +- 1 would fail by > 20 sd.
    tol = 4.0 * (alpha_true - 1.0) / math.sqrt(k)
    assert k > 1000
    assert abs(alpha - alpha_true) <= tol, (alpha, alpha_true, tol)


# --------------------------------------------------------------------------------------
# FARMS partition
# --------------------------------------------------------------------------------------


def test_remainder_strips_are_dropped():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1408, 600)).astype(np.float32)  # 5x2 blocks + 128-row/88-col strips
    w2 = w.copy()
    w2[1280:, :] = rng.standard_normal((128, 600))
    w2[:, 512:] = 0.0
    cfg = SpectralConfig(device="cpu")
    e1, e2 = farms_eigenvalues(w, cfg), farms_eigenvalues(w2, cfg)
    assert e1.size == 10 * 256
    np.testing.assert_array_equal(e1, e2)


def test_short_side_uses_whole_matrix():
    w = random_matrix((100, 3000), seed=1)
    e = farms_eigenvalues(w, SpectralConfig(device="cpu"))
    want = np.sort(np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2)
    np.testing.assert_allclose(e, want, rtol=1e-10)


# --------------------------------------------------------------------------------------
# bad weights
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_raise_naming_tensor(bad):
    w = random_matrix((300, 300), seed=2)
    w[7, 9] = bad
    with pytest.raises(AlphaQError, match=r"blk\.3\.ffn_up_exps\.weight"):
        analyze_matrix(w, name="blk.3.ffn_up_exps.weight")


@pytest.mark.parametrize(
    "case",
    ["zeros", "constant", "one_row", "rank_one", "two_by_two", "scaled_orthogonal"],
)
def test_degenerate_matrices_have_no_signal(case, caplog):
    rng = np.random.default_rng(0)
    w = {
        "zeros": np.zeros((512, 512), np.float32),
        "constant": np.full((300, 700), 0.25, np.float32),
        "one_row": rng.standard_normal((1, 4096)).astype(np.float32),
        "rank_one": np.outer(rng.standard_normal(512), rng.standard_normal(512)).astype(np.float32),
        "two_by_two": rng.standard_normal((2, 2)).astype(np.float32),
        # every singular value equal: a flat spectrum has no tail to fit
        "scaled_orthogonal": (0.1 * np.linalg.qr(rng.standard_normal((256, 256)))[0]),
    }[case]
    with caplog.at_level(logging.WARNING, logger="alphaq.spectral.alpha"):
        res = analyze_matrix(w, name=f"t.{case}")
    assert res.signal is False
    assert math.isnan(res.alpha) and res.k == 0
    assert res.variance == pytest.approx(float(np.var(w.astype(np.float64))), abs=1e-12)
    assert any(f"t.{case}" in r.getMessage() and "no spectral signal" in r.getMessage() for r in caplog.records)


def test_population_variance_chunked_matches_numpy():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((2100, 2048)) * 0.02 + 0.5).astype(np.float32)  # > one 4M chunk
    assert population_variance(w) == pytest.approx(float(np.var(w.astype(np.float64))), rel=1e-12)


def test_config_rejects_bad_values():
    with pytest.raises(AlphaQError, match="xmin_window"):
        SpectralConfig(xmin_window="peak")
    with pytest.raises(AlphaQError, match="device"):
        SpectralConfig(device="tpu")
    with pytest.raises(AlphaQError, match="block_size"):
        SpectralConfig(block_size=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    w = structured_matrix((1408, 2048), seed=5)
    cpu = analyze_matrix(w, cfg=SpectralConfig(device="cpu"))
    gpu = analyze_matrix(w, cfg=SpectralConfig(device="cuda"))
    assert gpu.k == cpu.k
    assert gpu.alpha == pytest.approx(cpu.alpha, rel=1e-9)


# --------------------------------------------------------------------------------------
# execution paths: BLAS for the Gram products, thread pools, thread pinning
# --------------------------------------------------------------------------------------


def bf16_valued(shape, seed):
    """float32 matrix whose values are BF16 numbers, like every weight read from a BF16 model."""
    return torch.from_numpy(random_matrix(shape, seed)).to(torch.bfloat16).to(torch.float32).numpy()


def test_numpy_lapack_path_matches_the_torch_path(monkeypatch):
    """With numpy's OpenBLAS pinnable, the CPU path takes Gram products and eigenvalues from numpy
    instead of torch (MKL). Two LAPACKs round differently, so the eigenvalues may differ in the
    last bits, never more: within 1e-12 of lambda_max, and the same alpha and k."""
    from alphaq.spectral import alpha as spectral

    if spectral._OpenBLAS.lib() is None:
        pytest.skip("numpy's OpenBLAS not found: the torch path is the only one")
    cfg = SpectralConfig(device="cpu")
    for shape in [(1408, 2048), (512, 768)]:
        w = bf16_valued(shape, seed=shape[0])
        fast = farms_eigenvalues(w, cfg)
        with monkeypatch.context() as m:
            m.setattr(spectral._OpenBLAS, "_lib", None)  # forces the torch path
            ref = farms_eigenvalues(w, cfg)
            a_ref, k_ref, _ = hill_alpha(ref, cfg)
        assert np.abs(fast - ref).max() <= 1e-12 * ref.max(), shape
        a, k, _ = hill_alpha(fast, cfg)
        assert k == k_ref and a == pytest.approx(a_ref, rel=1e-12), shape


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_parallel_and_serial_paths_are_identical(kind, torch_threads):
    """Block batches on a thread pool (variance beside them) and one thread give the same bits."""
    w = (random_matrix if kind == "random" else structured_matrix)((1280, 768), seed=11)
    cfg = SpectralConfig(device="cpu")
    torch_threads(2)
    par = analyze_matrix(w, cfg=cfg)
    torch_threads(1)
    ser = analyze_matrix(w, cfg=cfg)
    assert par == ser
    assert torch.get_num_threads() == 1  # restored to what it was


def test_one_block_matrices_on_pool_threads_equal_a_serial_run(torch_threads):
    """Matrices narrower than a block get an SVD from torch (MKL's LAPACK). MKL takes its thread
    count per calling thread: a pool thread that never set it ran the SVD on two threads, which
    rounds differently, so a model's alphas depended on which thread analysed a matrix (CI saw
    HF and GGUF input give alphas a unit in the last place apart). Every pool thread is pinned."""
    import threading

    from alphaq.spectral import alpha as spectral

    mats = [random_matrix((256, 96), seed=s) for s in range(6)]
    cfg = SpectralConfig(device="cpu")
    torch_threads(2)
    with spectral.pinned_threads():  # the caller pins itself; fresh threads inside it must too
        serial = [analyze_matrix(w, cfg=cfg) for w in mats]
        got = [None] * len(mats)

        def one(i):
            got[i] = analyze_matrix(mats[i], cfg=cfg)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(mats))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert got == serial
    assert torch.get_num_threads() == 2


def test_non_finite_error_comes_first_on_the_parallel_path(torch_threads):
    torch_threads(2)
    w = random_matrix((512, 768), seed=4)  # 2 x 3 blocks: block batches go to the pool
    w[300, 600] = np.nan
    with pytest.raises(AlphaQError, match=r"blk\.0\.ffn_gate_exps\.weight.*1 NaN"):
        analyze_matrix(w, name="blk.0.ffn_gate_exps.weight")
    assert torch.get_num_threads() == 2


def testpinned_threads_nest_across_threads_and_restore(torch_threads):
    """The outermost caller gets the thread count and pins torch (and numpy's OpenBLAS) to one
    thread; callers nested inside it, from any thread, get 1; the last one out restores."""
    from concurrent.futures import ThreadPoolExecutor

    from alphaq.spectral import alpha as spectral

    torch_threads(2)
    blas = spectral._OpenBLAS.lib()
    blas_before = blas[0]() if blas else None
    with spectral.pinned_threads() as outer:
        assert outer == 2 and torch.get_num_threads() == 1
        if blas:
            assert blas[0]() == 1

        def nested(_):
            with spectral.pinned_threads() as n:
                return n, torch.get_num_threads()

        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(nested, range(4))) == [(1, 1)] * 4
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    if blas:
        assert blas[0]() == blas_before


def test_importing_the_stage_does_not_import_torch():
    """The CLI imports this module for its settings; torch (1-2 s) is imported on first use, so
    `alphaq convert` can start llama.cpp's converter first."""
    import subprocess
    import sys

    code = ("import sys, alphaq.cli; alphaq.cli.build_parser(); import alphaq.pipeline.convert; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
