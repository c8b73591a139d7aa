"""Batched float64 eigenvalues of small symmetric matrices, on the CPU (the FARMS Gram blocks).

`symmetric_eigenvalues` is numpy's ``eigvalsh`` for a stack of matrices, about twice as fast
on 256x256 (docs/SPECTRAL.md): the C kernel in ``eigensolver.c`` reduces each matrix to
tridiagonal form in one fused pass per step over a packed copy that stays in L2, then calls
LAPACK's own ``dsterf`` from numpy's OpenBLAS for the tridiagonal eigenvalues.

The kernel is compiled on first use with the machine's C compiler (``$CC``, else ``cc``;
``-O3 -march=native``) into ``~/.cache/alphaq/native``, keyed by the source, the compiler and
its flags, and loaded with ctypes (calls release the GIL, so threads run blocks in parallel).
Without a compiler, or without numpy's ILP64 OpenBLAS to take ``dsterf`` from, `available` is
False and callers use ``eigvalsh``; the two agree to rounding (~1e-15 * lambda_max; tests).
``ALPHAQ_NATIVE=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("eigensolver.c")
# tried in order; the first that compiles is used (-march=native is not accepted everywhere)
FLAG_SETS = (("-O3", "-march=native"), ("-O3",))

_lock = threading.Lock()
_state: dict = {}  # "lib" and "fn" once loaded; "error" when unavailable


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alphaq" / "native"


def _compile(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.blake2b(source + version.encode() + " ".join(flags).encode(), digest_size=10).hexdigest()
        lib = cache_dir() / f"eigensolver-{key}.so"
        if lib.exists():
            return lib
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        run = subprocess.run([compiler, *flags, "-fPIC", "-shared", "-o", tmp, str(SOURCE), "-lm"],
                             capture_output=True, text=True)
        if run.returncode == 0:
            os.replace(tmp, lib)  # atomic: a concurrent process sees the whole library or none
            return lib
        os.unlink(tmp)
        errors.append(f"{' '.join(flags)}: {run.stderr.strip().splitlines()[-1:] or run.returncode}")
    raise OSError("; ".join(errors))


def _load() -> dict:
    with _lock:
        if _state:
            return _state
        why = None
        if os.environ.get("ALPHAQ_NATIVE", "1") == "0":
            why = "ALPHAQ_NATIVE=0"
        compiler = os.environ.get("CC") or "cc"
        if why is None and shutil.which(compiler) is None:
            why = f"no C compiler ({compiler})"
        if why is None:
            try:
                lib = ctypes.CDLL(str(_compile(compiler)))
                fn = lib.alphaq_symmetric_eigenvalues
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
                fn.restype = ctypes.c_int
                tri = lib.alphaq_tridiagonal_eigenvalues
                tri.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
                tri.restype = ctypes.c_int
                lib.alphaq_work_size.argtypes = [ctypes.c_int, ctypes.c_int]
                lib.alphaq_work_size.restype = ctypes.c_size_t
                _state.update(lib=lib, fn=fn)
                return _state
            except (OSError, subprocess.SubprocessError) as exc:
                why = f"compiling {SOURCE.name} failed ({exc})"
        log.info("native eigensolver unavailable (%s); using numpy's eigvalsh", why)
        _state["error"] = why
        return _state


def available() -> bool:
    return "fn" in _load()


def backend() -> str:
    """Which solver the spectral stage uses: "native" or "lapack" (numpy's eigvalsh). Results
    agree to rounding; the analysis cache keys on it so that a cached alpha is always what this
    machine would compute."""
    return "native" if available() else "lapack"


def symmetric_eigenvalues(grams: np.ndarray) -> np.ndarray:
    """Eigenvalues, ascending, of each symmetric matrix in ``grams`` (k, n, n) float64 (only the
    upper triangles, ``g[i, j]`` with ``j >= i``, are read): (k, n) float64. Requires `available()`."""
    st = _load()
    if "fn" not in st:
        raise RuntimeError(f"native eigensolver unavailable: {st['error']}")
    g = np.ascontiguousarray(grams, dtype=np.float64)
    k, n, n2 = g.shape
    if n != n2:
        raise ValueError(f"expected square matrices, got {g.shape}")
    out = np.empty((k, n), dtype=np.float64)
    # NaN-filled, not empty: a read of scratch the kernel did not write shows up as a failure
    work = np.full(max(1, st["lib"].alphaq_work_size(n, k)), np.nan)
    bad = st["fn"](g.ctypes.data, k, n, out.ctypes.data, work.ctypes.data)
    if bad:
        raise np.linalg.LinAlgError(f"tridiagonal QL failed for matrix {bad - 1} of {k}")
    return out


def tridiagonal_eigenvalues(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Eigenvalues, ascending, of symmetric tridiagonal matrices: diagonals ``d`` (k, n),
    off-diagonals ``e`` (k, n-1). The kernel's second half, exposed for tests."""
    st = _load()
    if "fn" not in st:
        raise RuntimeError(f"native eigensolver unavailable: {st['error']}")
    out = np.array(d, dtype=np.float64, order="C", copy=True)
    k, n = out.shape
    ee = np.zeros((k, n), dtype=np.float64)
    ee[:, : n - 1] = e
    bad = st["lib"].alphaq_tridiagonal_eigenvalues(out.ctypes.data, ee.ctypes.data, k, n)
    if bad:
        raise np.linalg.LinAlgError(f"tridiagonal QL failed for matrix {bad - 1} of {k}")
    return out
