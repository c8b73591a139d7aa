"""Spectral stage: PL_Alpha_Hill of one weight matrix, from the weights alone.

AlphaQ §3.2 / App. A.3. For a matrix W (numpy layout ``(rows, cols)``):

1. **FARMS eigenvalues** (`farms_eigenvalues`). W is cut into ``block_size x block_size``
   sub-matrices with stride ``block_size`` along both axes; the squared singular values of
   every block (eigenvalues of its Gram matrix) are pooled and sorted. As in the paper's
   reference code (Superone77/AlphaQ ``alphaq/utils_alpha.py``, ``_svd_eigs_farms`` and
   ``_iter_farms_blocks_indices``), blocks start at ``0, b, 2b, ...`` while a whole block
   still fits, so a remainder strip (e.g. the last 128 rows of a 1408-row matrix) is
   *dropped*; when either side is shorter than ``block_size`` the whole matrix is one block
   (``min(rows, cols)`` eigenvalues). The reference pools at most ``FARMS_MAX_BLOCKS`` = 256
   blocks, drawn at random without a seed; by default every block is used here, and
   ``SpectralConfig.max_blocks`` (``--farms-max-blocks``, 256 in ``--fast``) keeps that many
   *evenly spaced* blocks (`farms_blocks`), so the result stays deterministic.

2. **Fix-finger ``xmin_peak`` tail selection and Hill fit** (`hill_alpha`). A ``bins``-bin
   histogram of log10(eigenvalues); ``peak`` = 10**(left edge of the fullest bin), in linear
   units, as in the reference (``xmin2 = 10 ** boundaries[ih]``). Candidate thresholds are the
   eigenvalues ``lam[i]``, ``i <= N-2``, inside the window. For each, the Hill/MLE estimate
   ``alpha = 1 + n / sum(ln(lam[j] / lam[i]))`` over the ``n = N - i`` eigenvalues ``j >= i``
   and the KS distance ``D = max_j |1 - (lam[j]/lam[i])**(1-alpha) - (j-i)/n|``. ``D = 1``
   when ``alpha <= 1``. The smallest D wins (first candidate on ties); its alpha is
   PL_Alpha_Hill and its ``n`` is ``k``.

   The reference's lower window bound is ``log10(0.95 * peak)`` compared against a *linear*
   eigenvalue, so it only binds when ``peak > ~1.053``. ``xmin_window="reference"`` (default)
   keeps that effective behaviour; ``"corrected"`` uses ``0.95*peak <= lam <= 1.5*peak``.

Numerics (see docs/SPECTRAL.md for the measurements): everything runs in float64. Block
eigenvalues are those of the exact Gram matrices (numpy's OpenBLAS products on the CPU, faster
here than torch's MKL; torch otherwise), from `alphaq.spectral.native`'s compiled eigensolver (~2x
LAPACK) or, without a C compiler, numpy's ``eigvalsh``; the block that
holds the global minimum (which sets the histogram's left edge) is recomputed with an SVD,
because a Gram eigenvalue carries an absolute error of ~b*eps*lam_max. Eigenvalues below
``zero_rel_tol * lam_max`` are numerical zeros (rank deficiency) and are left out of the fit.
The KS search is exact but avoids the O(candidates x N) scan with rigorous bounds on a coarse
grid (`_ks_argmin`), refined only where a candidate can still win.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alphaq.spectral import native
from alphaq.errors import AlphaQError

logger = logging.getLogger(__name__)


class _LazyTorch:
    """``torch``, imported on first use: importing it takes 1-2 s of CPU, and the CLI imports
    this module (for SpectralConfig) before it knows whether anything will be analysed;
    `alphaq.pipeline.convert` starts llama.cpp's converter before the first matrix is analysed."""

    def __getattr__(self, name):
        import torch as module

        globals()["torch"] = module  # later lookups go straight to the module
        return getattr(module, name)


torch = _LazyTorch()

XMIN_WINDOWS = ("reference", "corrected")
DEVICES = ("auto", "cpu", "cuda")

# Bump when anything that changes results changes; it is part of the analysis cache key.
ESTIMATOR_VERSION = 2  # 2: SVDs on pool threads pinned to one MKL thread, as on the caller's

_EPS64 = float(np.finfo(np.float64).eps)
# a spectrum whose max/min - 1 is below this is flat up to rounding; its Hill alpha would be
# 1 + n / (rounding noise), i.e. meaningless
_FLAT_REL = 1e-9


@dataclass(frozen=True)
class SpectralConfig:
    # FARMS sub-matrix side and stride (paper §4: "256 x 256 with sampling stride 256").
    block_size: int = 256
    # histogram bins over log10(eigenvalues) for the fix-finger peak (reference default 100).
    bins: int = 100
    # upper end of the xmin window, as a multiple of peak (reference ``xmin_max = 1.5 * xmin2``).
    peak_factor: float = 1.5
    # lower end of the window, as a multiple of peak (reference ``0.95 * xmin2``).
    lower_factor: float = 0.95
    # "reference": lower bound log10(lower_factor*peak) vs a linear eigenvalue, as the
    # reference code does (effectively no lower bound unless peak > ~1.05);
    # "corrected": lower_factor*peak <= lam <= peak_factor*peak.
    xmin_window: str = "reference"
    # "auto" uses CUDA when torch sees a GPU; results agree to rounding either way.
    device: str = "auto"
    # eigenvalues <= zero_rel_tol * lam_max are numerical zeros (Gram noise is ~6e-14 * lam_max).
    zero_rel_tol: float = 1e-12
    # fewer usable eigenvalues than this gives "no signal": a tail fit needs some points.
    min_eigs: int = 10
    # analyse at most this many evenly spaced experts of each merged expert tensor (None: all, as
    # the paper does). Which matrices are read, not how one is estimated: not a cache field. The
    # plan scales a sampled tensor's cost up to all its experts (alphaq.allocate.plan).
    max_experts: int | None = None
    # pool the eigenvalues of at most this many evenly spaced FARMS blocks of a matrix (None: every
    # block). The reference code's FARMS_MAX_BLOCKS is 256, drawn at random (`farms_blocks`).
    max_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise AlphaQError(f"block_size {self.block_size} must be >= 2")
        if self.bins < 1:
            raise AlphaQError(f"bins {self.bins} must be >= 1")
        if not self.peak_factor > 0 or not self.lower_factor > 0:
            raise AlphaQError(
                f"peak_factor {self.peak_factor} and lower_factor {self.lower_factor} must be > 0"
            )
        if self.xmin_window not in XMIN_WINDOWS:
            raise AlphaQError(f"xmin_window {self.xmin_window!r} is not one of {XMIN_WINDOWS}")
        if self.device not in DEVICES:
            raise AlphaQError(f"device {self.device!r} is not one of {DEVICES}")
        if not 0 <= self.zero_rel_tol < 1:
            raise AlphaQError(f"zero_rel_tol {self.zero_rel_tol} must be in [0, 1)")
        if self.min_eigs < 2:
            raise AlphaQError(f"min_eigs {self.min_eigs} must be >= 2")
        if self.max_experts is not None and self.max_experts < 2:
            raise AlphaQError(f"max_experts {self.max_experts} must be >= 2 (or None: every expert)")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise AlphaQError(f"max_blocks {self.max_blocks} must be >= 1 (or None: every FARMS block)")

    def cache_fields(self) -> dict:
        """The settings that change the result (device does not), for cache keys."""
        return {
            "block_size": self.block_size,
            "bins": self.bins,
            "peak_factor": self.peak_factor,
            "lower_factor": self.lower_factor,
            "xmin_window": self.xmin_window,
            "zero_rel_tol": self.zero_rel_tol,
            "min_eigs": self.min_eigs,
            "version": ESTIMATOR_VERSION,
            # only when set (and SpectralCache drops it where it does not bind), so that the cached
            # every-block results stay valid and serve a capped run's smaller matrices
            **({} if self.max_blocks is None else {"max_blocks": self.max_blocks}),
        }


@dataclass(frozen=True)
class SpectralResult:
    alpha: float  # PL_Alpha_Hill; NaN when signal is False
    variance: float  # population variance of the weights
    k: int  # tail size n of the winning candidate (0 without signal)
    n_eigs: int  # pooled FARMS eigenvalues (numerical zeros included)
    signal: bool  # False for all-zero / constant / too-small / degenerate matrices
    ks_distance: float = math.nan  # KS distance D of the winning fit


class _OpenBLAS:
    """numpy's bundled OpenBLAS thread setter, or None (then the Gram products stay in torch).

    numpy's OpenBLAS spin-waits in its worker threads, and several Python threads each calling a
    multi-threaded BLAS oversubscribe the cores; the spectral stage pins it to one thread, like
    torch (see `pinned_threads`)."""

    _lib = None
    _found = False

    @classmethod
    def lib(cls):
        if not cls._found:
            cls._found = True
            for path in sorted((Path(np.__file__).parent.parent / "numpy.libs").glob("*openblas*")):
                try:
                    dll = ctypes.CDLL(str(path))
                except OSError:
                    continue
                for get, set_ in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                                  ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                                  ("openblas_get_num_threads", "openblas_set_num_threads")):
                    if hasattr(dll, get) and hasattr(dll, set_):
                        getattr(dll, set_).argtypes = [ctypes.c_int]
                        cls._lib = (getattr(dll, get), getattr(dll, set_))
                        return cls._lib
        return cls._lib


_pin_lock = threading.Lock()
_pin_depth = 0
_pin_saved: tuple[int, int | None] = (1, None)
_pin_period = 0  # counts outermost entries: a thread pinned in an earlier period pins again
_pinned_here = threading.local()  # .period: the period in which this thread pinned itself


@contextmanager
def pinned_threads():
    """Run torch ops (and numpy's OpenBLAS) single-threaded; yields how many worker threads the
    caller may use: the previous intra-op thread count for the outermost caller, 1 for callers
    nested inside it (the outer one parallelises, e.g. `alphaq.spectral.analyze` over matrices).

    Spectral work is many small LAPACK calls (256x256). Intra-op OpenMP threads barely speed
    those up, and on a loaded machine a spinning OpenMP barrier can make them ~100x slower
    (measured on this project's shared 2-core box); MKL's eigvalsh also rounds differently with
    two threads. Parallelism comes from thread pools over block batches or matrices instead.
    Thread counts are set once by the outermost caller (any thread) and restored when the last
    one leaves. MKL's LAPACK (torch's SVD) takes its thread count per calling thread, though: a
    thread that never set it runs an SVD on two threads, which rounds differently from one (CI
    saw the same matrix give two alphas a unit in the last place apart). So every thread that
    enters pins itself too (`_pin_this_thread`), and results never depend on which thread ran.
    """
    global _pin_depth, _pin_saved, _pin_period
    with _pin_lock:
        _pin_depth += 1
        outer = _pin_depth == 1
        if outer:
            _pin_period += 1
            blas = _OpenBLAS.lib()
            _pin_saved = (torch.get_num_threads(), blas[0]() if blas else None)
            torch.set_num_threads(1)
            _pinned_here.period = _pin_period
            if blas:
                blas[1](1)
        else:
            _pin_this_thread()
    try:
        yield _pin_saved[0] if outer else 1
    finally:
        with _pin_lock:
            _pin_depth -= 1
            if _pin_depth == 0:
                n_torch, n_blas = _pin_saved
                torch.set_num_threads(n_torch)
                if n_blas is not None:
                    _OpenBLAS.lib()[1](n_blas)


def _pin_this_thread() -> None:
    """One intra-op (and MKL) thread for the calling thread, once per pinned period; under
    `_pin_lock`, inside a pinned period."""
    if getattr(_pinned_here, "period", None) != _pin_period:
        torch.set_num_threads(1)
        _pinned_here.period = _pin_period


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise AlphaQError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(device)


# --------------------------------------------------------------------------------------
# FARMS eigenvalues
# --------------------------------------------------------------------------------------


def farms_grid(rows: int, cols: int, block_size: int) -> tuple[int, int] | None:
    """Number of (row, col) FARMS blocks, or None when the whole matrix is one block."""
    if rows < block_size or cols < block_size:
        return None
    return rows // block_size, cols // block_size  # remainder strips dropped (reference)


def farms_blocks(grid: tuple[int, int], max_blocks: int | None) -> np.ndarray:
    """Row-major indices into the block ``grid`` of the FARMS blocks whose eigenvalues are pooled:
    all of them, or ``max_blocks`` evenly spaced ones when there are more. The reference code
    draws its 256 at random without a seed; evenly spaced blocks cover the whole matrix the same
    way on every run (and in every numpy version, which a seeded generator does not promise)."""
    n = grid[0] * grid[1]
    if max_blocks is None or n <= max_blocks:
        return np.arange(n)
    return (np.arange(max_blocks) * n) // max_blocks  # strictly increasing: n > max_blocks


def cap_binds(rows: int, cols: int, cfg: SpectralConfig) -> bool:
    """Whether ``cfg.max_blocks`` leaves out some FARMS blocks of a rows x cols matrix."""
    grid = farms_grid(rows, cols, cfg.block_size)
    return cfg.max_blocks is not None and grid is not None and grid[0] * grid[1] > cfg.max_blocks


def farms_cap(stats, cfg: SpectralConfig) -> dict | None:
    """What ``cfg.max_blocks`` did to the analysed matrices ``stats`` (MatrixStats), for the plan's
    record and the summary: None when no matrix had more blocks than the cap."""
    if cfg.max_blocks is None:
        return None
    grids = [farms_grid(s.rows, s.cols, cfg.block_size) for s in stats if cap_binds(s.rows, s.cols, cfg)]
    blocks = [g[0] * g[1] for g in grids]
    if not blocks:
        return None
    return {"max_blocks": cfg.max_blocks, "matrices_capped": len(blocks), "matrices": len(stats),
            "blocks": sorted(set(blocks))}


def describe_farms_cap(cap: dict) -> str:
    """`farms_cap`'s record in words, for the summaries."""
    blocks = " or ".join(str(b) for b in cap["blocks"])
    return (f"alpha from {cap['max_blocks']} of {blocks} FARMS blocks in {cap['matrices_capped']} of "
            f"{cap['matrices']} matrices (--farms-max-blocks all: every block)")


def farms_eigenvalues(w: np.ndarray, cfg: SpectralConfig | None = None) -> np.ndarray:
    """Pooled FARMS eigenvalues of ``w`` (rows, cols), float64, sorted ascending, >= 0."""
    cfg = cfg or SpectralConfig()
    if w.ndim != 2:
        raise AlphaQError(f"expected a 2-D matrix, got shape {w.shape}")
    with pinned_threads() as n_workers:
        if n_workers > 1 and _n_blocks(w.shape, cfg) > 1:
            with ThreadPoolExecutor(n_workers) as pool:
                return _farms(w, cfg, pool, n_workers)
        return _farms(w, cfg, None, 1)


def _n_blocks(shape: tuple[int, int], cfg: SpectralConfig) -> int:
    """How many FARMS blocks of a matrix of ``shape`` are pooled."""
    grid = farms_grid(*shape, cfg.block_size)
    return 1 if grid is None else len(farms_blocks(grid, cfg.max_blocks))


def _farms(w: np.ndarray, cfg: SpectralConfig, pool: ThreadPoolExecutor | None, n_workers: int) -> np.ndarray:
    """`farms_eigenvalues` inside `pinned_threads`; block batches go to ``pool`` if given."""
    rows, cols = w.shape
    if min(rows, cols) == 0:
        return np.zeros(0)
    dev = resolve_device(cfg.device)
    b = cfg.block_size
    grid = farms_grid(rows, cols, b)
    with torch.no_grad():
        if grid is None or grid == (1, 1):
            # one block: its squared singular values (min(rows, cols) of them) straight from an
            # SVD, which is as cheap as Gram + eigvalsh and more accurate for small ones
            one = w if grid is None else w[:b, :b]
            x = torch.from_numpy(np.ascontiguousarray(one)).to(torch.float64)  # CPU, as below
            eig = torch.linalg.svdvals(x).square()
        else:
            chosen = farms_blocks(grid, cfg.max_blocks)
            eig = _blocked_eigs(w, grid[1], chosen, b, dev, cfg.zero_rel_tol, pool, n_workers)
        eig = eig.clamp_min(0.0).sort().values
    return eig.cpu().numpy()


def _block(w: np.ndarray, index: int, nc: int, b: int) -> np.ndarray:
    """FARMS block ``index`` (row-major over a grid ``nc`` blocks wide) of ``w``."""
    r, c = divmod(int(index), nc)
    return w[r * b : (r + 1) * b, c * b : (c + 1) * b]


def _blocks_eigs(w: np.ndarray, indices: np.ndarray, nc: int, b: int, dev: torch.device):
    """Gram eigenvalues of the FARMS blocks ``indices`` (row-major over the block grid):
    (len(indices), b), ascending, on the CPU.

    On the CPU, when numpy's OpenBLAS can be pinned to one thread (`_OpenBLAS`), the float64
    Gram products are numpy's: on this project's AMD CPU its 256x256 products are 2.5x faster
    than torch's MKL (docs/SPECTRAL.md). For BF16 weights the float64 Gram is exact, so any BLAS
    gives the same Gram bits. Otherwise, and on CUDA, torch computes the products (on ``dev``).
    The eigenvalues always come from the CPU (`_gram_eigenvalues`): cuSOLVER has no batched
    float64 solver for 256x256 and loops at ~2 ms per matrix on an H100, no faster than one CPU
    core, while the CPU thread pool scales with the cores.
    """
    if dev.type == "cpu" and _OpenBLAS.lib() is not None:
        x = np.empty((len(indices), b, b), dtype=np.float64)
        for k, i in enumerate(indices):
            x[k] = _block(w, i, nc, b)  # float32 -> float64 is exact
        return torch.from_numpy(_gram_eigenvalues(np.matmul(x.transpose(0, 2, 1), x)))  # of B^T B
    blocks = np.stack([_block(w, i, nc, b) for i in indices])  # (n, b, b)
    x = torch.from_numpy(blocks).to(dev, torch.float64)
    grams = (x.mT @ x).cpu()  # of B^T B
    if native.available():
        return torch.from_numpy(_gram_eigenvalues(grams.numpy()))
    return torch.linalg.eigvalsh(grams)


def _gram_eigenvalues(grams: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of each matrix in ``grams`` (k, b, b): the native kernel
    (`alphaq.spectral.native`, ~2x LAPACK's syevd on 256x256 here) when it is available, else numpy's
    ``eigvalsh``. The two agree to ~1e-15 * lambda_max (tests)."""
    if native.available():
        try:
            return native.symmetric_eigenvalues(grams)
        except np.linalg.LinAlgError as exc:  # a block outside the kernel's range: LAPACK takes the batch
            logger.warning("native eigensolver failed on a batch (%s); using numpy's eigvalsh", exc)
    return np.linalg.eigvalsh(grams)


def _blocked_eigs(
    w: np.ndarray, nc: int, chosen: np.ndarray, b: int, dev: torch.device, zero_rel_tol: float,
    pool: ThreadPoolExecutor | None, n_workers: int,
) -> torch.Tensor:
    """Pooled eigenvalues of the FARMS blocks ``chosen`` of a grid ``nc`` blocks wide."""
    n_blocks = len(chosen)
    # at least one task per worker, at most 8 blocks per task: the blocks, their Gram matrices
    # and the eigensolver's copies then stay in cache (10 % faster per block than 32 here)
    per = max(1, min(8, -(-n_blocks // max(1, n_workers))))
    tasks = [chosen[i : i + per] for i in range(0, n_blocks, per)]
    if pool is not None and len(tasks) > 1:
        # one single-threaded block batch per core: LAPACK's syevd on 256x256 matrices scales
        # poorly across intra-op threads (docs/SPECTRAL.md); torch and numpy release the GIL.
        # (CUDA kernels issued from several threads share the default stream: still correct.)
        def batch(indices):
            with pinned_threads():  # a pool thread pins itself too (MKL's count is per thread)
                return _blocks_eigs(w, indices, nc, b, dev)

        parts = list(pool.map(batch, tasks))
    else:
        parts = [_blocks_eigs(w, indices, nc, b, dev) for indices in tasks]
    eig = torch.cat(parts)  # (n_blocks, b)

    # A Gram eigenvalue is accurate to ~b*eps*lam_max absolute only. The global minimum sets
    # the histogram's left edge, so the block(s) that can hold it get an SVD (which is
    # accurate to ~eps*s_max in s, i.e. relatively much better for small lam).
    lam_max = float(eig[:, -1].max())
    if lam_max <= 0:
        return eig.reshape(-1)
    err = 2.0 * b * _EPS64 * lam_max
    floor = zero_rel_tol * lam_max
    above = eig[eig > floor + err]
    gmin = float(above.min()) if above.numel() else floor
    near = (eig >= floor - err) & (eig <= gmin + 2 * err)
    redo = torch.nonzero(near.any(dim=1)).flatten().tolist()
    for row in redo:
        blk = torch.from_numpy(np.ascontiguousarray(_block(w, chosen[row], nc, b))).to(torch.float64)
        eig[row] = torch.linalg.svdvals(blk).square().flip(0)
    if len(redo) > 1:
        logger.debug("recomputed %d of %d FARMS blocks with SVD", len(redo), n_blocks)
    return eig.reshape(-1)


# --------------------------------------------------------------------------------------
# Fix-finger xmin_peak + Hill estimator
# --------------------------------------------------------------------------------------


def usable_eigenvalues(eigs: np.ndarray, cfg: SpectralConfig) -> np.ndarray:
    """Drop numerical zeros (<= zero_rel_tol * max); input and output sorted ascending."""
    eigs = np.asarray(eigs, dtype=np.float64)
    if eigs.size == 0:
        return eigs
    top = float(eigs.max())
    if not top > 0:
        return eigs[:0]
    return eigs[eigs > cfg.zero_rel_tol * top]


def xmin_window(lam: np.ndarray, cfg: SpectralConfig) -> tuple[float, float]:
    """(lower, upper) bounds on candidate xmin for sorted positive eigenvalues ``lam``."""
    counts, edges = np.histogram(np.log10(lam), bins=cfg.bins)
    peak = 10.0 ** edges[int(np.argmax(counts))]  # linear units, as in the reference
    upper = cfg.peak_factor * peak
    if cfg.xmin_window == "reference":
        # reference: ``xmin_min = log10(0.95 * xmin2)`` then ``if xmin < xmin_min: continue``
        # with xmin a linear eigenvalue. Kept on purpose; see module docstring.
        lower = math.log10(cfg.lower_factor * peak)
    else:
        lower = cfg.lower_factor * peak
    return lower, upper


def hill_alpha(eigs: np.ndarray, cfg: SpectralConfig | None = None) -> tuple[float, int, float]:
    """PL_Alpha_Hill of sorted eigenvalues: ``(alpha, k, D)``; ``(nan, 0, nan)`` if no fit."""
    cfg = cfg or SpectralConfig()
    lam = usable_eigenvalues(eigs, cfg)
    n_all = lam.size
    if n_all < max(2, cfg.min_eigs):
        return math.nan, 0, math.nan
    if np.any(np.diff(lam) < 0):
        raise AlphaQError("hill_alpha expects eigenvalues sorted ascending")
    if lam[-1] <= lam[0] * (1.0 + _FLAT_REL):
        return math.nan, 0, math.nan  # flat spectrum (e.g. a scaled orthogonal matrix): no tail
    lower, upper = xmin_window(lam, cfg)
    idx = np.arange(n_all - 1)  # the largest eigenvalue is never a candidate (reference)
    cand = idx[(lam[:-1] >= lower) & (lam[:-1] <= upper)]
    if cand.size == 0:
        return math.nan, 0, math.nan

    dev = resolve_device(cfg.device)
    with torch.no_grad(), pinned_threads():
        L = torch.from_numpy(np.log(lam)).to(dev)  # (N,) float64
        # sum_{j>=i} ln(lam_j / lam_i) = (suffix sum of L from i) - n_i * L_i
        suffix = torch.flip(torch.cumsum(torch.flip(L, (0,)), 0), (0,))
        ci = torch.from_numpy(cand).to(dev)
        n = (n_all - ci).to(torch.float64)
        denom = suffix[ci] - n * L[ci]
        beta = n / denom  # alpha - 1
        # alpha <= 1 (or a degenerate, all-equal tail) gets D = 1, as in the reference
        valid = torch.isfinite(beta) & (beta > 0)
        best, d_best = _ks_argmin(L, ci, beta, valid)
    if best is None or not d_best < 1.0:
        return math.nan, 0, math.nan
    return 1.0 + float(beta[best]), int(n_all - cand[best]), float(d_best)


# rounding slack for the KS bounds; D values are O(1e-3..1), rounding is O(1e-15)
_KS_TOL = 1e-12
# grid points per work array chunk: 2**21 float64 = 16 MiB per temporary
_KS_CHUNK = 1 << 21
# each refinement level splits an interval into this many parts
_KS_SPLIT = 8


class _KSProblem:
    """Candidates of one KS search, all float64 on one device.

    For candidate c (tail start ``i``, ``n = N - i``, ``beta = alpha - 1 > 0``) and tail index
    ``j >= i``: fitted CDF ``F(j) = 1 - (lam_j/lam_i)**-beta`` and empirical ``e(j) = (j-i)/n``.
    D_c = max_j |F(j) - e(j)|. F and e both increase with j, so for an interval a < b
    every j inside has ``F(j) - e(j) <= F(b) - e(a)`` and ``e(j) - F(j) <= e(b) - F(a)``:
    the interval's *bracket* bounds the deviation anywhere inside it.
    """

    def __init__(self, L: torch.Tensor, ci: torch.Tensor, beta: torch.Tensor):
        self.L = L  # (N,) log eigenvalues, ascending
        self.N = L.numel()
        self.ci = ci  # (C,) candidate tail starts
        self.beta = beta  # (C,)
        self.Li = L[ci]
        self.nf = (self.N - ci).to(torch.float64)

    def fit_emp(self, c: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F and e for candidates ``c`` (P,) at tail indices ``j`` (P, T)."""
        x = (self.L[j] - self.Li[c, None]).clamp_min(0.0)
        fit = -torch.expm1(-self.beta[c, None] * x)  # 1 - (lam_j/lam_i)^(1-alpha)
        emp = (j - self.ci[c, None]) / self.nf[c, None]
        return fit, emp

    def exact(self, c: int) -> float:
        j = torch.arange(int(self.ci[c]), self.N, device=self.L.device)[None, :]
        fit, emp = self.fit_emp(torch.tensor([c], device=self.L.device), j)
        return float((fit - emp).abs().max())


def _ks_argmin(
    L: torch.Tensor, ci: torch.Tensor, beta: torch.Tensor, valid: torch.Tensor
) -> tuple[int | None, float]:
    """Index (into ci) of the first candidate with the smallest KS distance, and that D.

    Exact, without scanning every tail point of every candidate: each candidate's tail is
    cut into intervals of ``step`` points; the deviation at the interval ends gives a lower
    bound LB_c on D_c and the brackets an upper bound UB_c. A candidate whose LB exceeds the
    best upper bound U* (min UB, or the exact D of the most promising candidate) cannot win
    and is dropped; an interval whose bracket is <= LB_c cannot hold D_c and is dropped.
    The remaining intervals are split 8 ways until they are single points, where LB_c = D_c.
    """
    dev = L.device
    prob = _KSProblem(L, ci, beta)
    n_all = prob.N
    alive = valid.clone()
    lb = torch.where(valid, 0.0, 1.0).to(torch.float64)  # D = 1 for alpha <= 1 (reference)
    live = torch.nonzero(alive).flatten()
    if live.numel() == 0:
        return None, 1.0

    step = 1
    while step * 64 < n_all:  # first level: <= ~64 intervals per candidate
        step *= _KS_SPLIT
    # level 0: one "interval" per candidate spanning its whole tail, cut into n_parts pieces
    n_parts = -(-(n_all - 1 - int(ci[live].min())) // step)
    pair_c, pair_a = live, ci[live]

    while True:
        n_pts = n_parts + 1
        offs = torch.arange(n_pts, device=dev) * step  # (T,)
        new_c, new_a, new_br = [], [], []
        per = max(1, _KS_CHUNK // n_pts)
        for s in range(0, pair_c.numel(), per):
            c = pair_c[s : s + per]
            j = (pair_a[s : s + per, None] + offs[None, :]).clamp_max(n_all - 1)  # (P, T)
            fit, emp = prob.fit_emp(c, j)
            lb.scatter_reduce_(0, c, (fit - emp).abs().amax(dim=1), reduce="amax")
            if step > 1:
                br = torch.maximum(fit[:, 1:] - emp[:, :-1], emp[:, 1:] - fit[:, :-1])  # (P, T-1)
                keep = br > lb[c, None]  # lb so far only grows: a superset of the final keep
                rows, cols = torch.nonzero(keep, as_tuple=True)
                new_c.append(c[rows])
                new_a.append(pair_a[s : s + per][rows] + cols * step)
                new_br.append(br[rows, cols])
        if step == 1:
            break  # every remaining tail point was evaluated: lb is exact for live candidates
        pair_c, pair_a, br = torch.cat(new_c), torch.cat(new_a), torch.cat(new_br)
        keep = br > lb[pair_c]
        pair_c, pair_a, br = pair_c[keep], pair_a[keep], br[keep]
        ub = lb.clone()
        ub.scatter_reduce_(0, pair_c, br, reduce="amax")
        # best upper bound: the smallest UB, or the exact D of the lowest-LB candidate
        u_star = float(ub[alive].min())
        cand_lb = torch.where(alive, lb, torch.inf)
        u_star = min(u_star, prob.exact(int(torch.argmin(cand_lb))))
        alive &= lb <= u_star + 2 * _KS_TOL
        keep = alive[pair_c]
        pair_c, pair_a = pair_c[keep], pair_a[keep]
        step //= _KS_SPLIT
        n_parts = _KS_SPLIT

    d = torch.where(alive, lb, torch.inf)
    best = int(torch.argmin(d))  # first occurrence on ties, in candidate order
    return best, float(d[best])


# --------------------------------------------------------------------------------------
# one matrix
# --------------------------------------------------------------------------------------


def population_variance(w: np.ndarray) -> float:
    """Population variance in float64 without a full float64 copy of ``w``."""
    n = w.size
    if n == 0:
        return math.nan
    chunk = 1 << 22
    if n <= chunk:
        return float(np.var(w, dtype=np.float64))
    flat = w.reshape(-1)
    mean = sum(float(np.sum(flat[s : s + chunk], dtype=np.float64)) for s in range(0, n, chunk)) / n
    ss = 0.0
    for s in range(0, n, chunk):
        d = flat[s : s + chunk].astype(np.float64) - mean
        ss += float(np.dot(d, d))
    return ss / n


def check_finite(w: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(w)
    if bad.any():
        n_nan = int(np.isnan(w).sum())
        raise AlphaQError(
            f"tensor {name} has {n_nan} NaN and {int(bad.sum()) - n_nan} Inf weights "
            f"(of {w.size}); weights must be finite"
        )


def _no_signal(name: str, variance: float, n_eigs: int, why: str) -> SpectralResult:
    logger.warning("%s: no spectral signal (%s); alpha = NaN", name, why)
    return SpectralResult(math.nan, variance, 0, n_eigs, False)


def analyze_matrix(
    w: np.ndarray, *, name: str = "<matrix>", cfg: SpectralConfig | None = None
) -> SpectralResult:
    """PL_Alpha_Hill, variance and fit details of one matrix ``w`` (rows, cols)."""
    cfg = cfg or SpectralConfig()
    w = np.asarray(w)
    if w.ndim != 2:
        raise AlphaQError(f"tensor {name}: expected a 2-D matrix, got shape {w.shape}")
    if w.dtype != np.float32 and w.dtype != np.float64:
        w = w.astype(np.float32)
    with pinned_threads() as n_workers:
        if n_workers > 1 and min(w.shape) >= 2 and _n_blocks(w.shape, cfg) > 1:
            # the finiteness check and the variance (one core, ~10 ms for 3M weights) run
            # beside the block eigenvalues; their verdicts still come first
            with ThreadPoolExecutor(n_workers) as pool:
                first = pool.submit(_finite_variance, w, name)
                try:
                    eigs = _farms(w, cfg, pool, n_workers)
                except Exception:
                    first.result()  # non-finite weights are the error to report
                    raise
                variance = first.result()
        else:
            variance = _finite_variance(w, name)
            eigs = None
        if min(w.shape) < 2:
            return _no_signal(name, variance, 0, f"shape {w.shape} is too small")
        if variance == 0.0:
            return _no_signal(name, variance, 0, "all weights are equal")
        if eigs is None:
            eigs = _farms(w, cfg, None, 1)
        usable = usable_eigenvalues(eigs, cfg).size
        if usable < cfg.min_eigs:
            return _no_signal(
                name, variance, eigs.size, f"{usable} non-zero eigenvalues < min_eigs {cfg.min_eigs}"
            )
        alpha, k, d = hill_alpha(eigs, cfg)
    if not math.isfinite(alpha):
        return _no_signal(name, variance, eigs.size, "degenerate spectrum, no tail fit")
    return SpectralResult(alpha, variance, k, int(eigs.size), True, d)


def _finite_variance(w: np.ndarray, name: str) -> float:
    """`check_finite`, then `population_variance`; one compiled pass pair for float32 weights."""
    if w.dtype == np.float32 and w.size and native.available():
        n_bad, _, variance = native.moments(w)
        if not n_bad:
            return variance
    check_finite(w, name)
    return population_variance(w)
