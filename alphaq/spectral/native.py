"""Compiled CPU kernels of the spectral stage (``native.c``), with numpy as the fallback.

* `symmetric_eigenvalues`: numpy's ``eigvalsh`` for a stack of small symmetric matrices (the
  FARMS Gram blocks), ~2x faster on 256x256 here (docs/SPECTRAL.md): a fused Householder
  reduction to tridiagonal form over a packed copy that stays in L2, then a root-free QL that
  sweeps several matrices side by side. `tridiagonal_eigenvalues` is its second half alone.
* `moments`: the finiteness check and population variance of float32 weights in float64, ~7x
  faster than numpy's (which makes float64 temporaries).

The C file is compiled on first use with the machine's C compiler (``$CC``, else ``cc``;
``-O3 -march=native``) into ``~/.cache/alphaq/native``, keyed by the source, the compiler, its
flags and the CPU's features, and loaded with ctypes (calls release the GIL, so threads run in parallel). Without a
compiler, or when the compile fails, `available` is False and callers use numpy (logged once as a
WARNING with the compiler's error; `unavailable_reason` says why, and `alphaq convert` lists it
in its summary); results agree to rounding (eigenvalues to ~1e-15 * lambda_max, variances to
~1e-14 relative; tests). ``ALPHAQ_NATIVE=0`` turns it off on purpose (logged at INFO).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
# tried in order; the first that compiles is used (-march=native is not accepted everywhere)
FLAG_SETS = (("-O3", "-march=native"), ("-O3",))

_lock = threading.Lock()
_state: dict = {}  # "lib" once loaded; "error" (why not) when unavailable


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alphaq" / "native"


def _cpu_id() -> bytes:
    """What -march=native compiles for: the CPU's feature flags (Linux), else the platform. Part of
    the library's cache key, so that a cache directory shared between machines (a network home)
    never hands one CPU a library built for another's instruction set."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return (flags or f"{platform.machine()} {platform.processor()}").encode()


def _compile(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.blake2b(source + version.encode() + " ".join(flags).encode() + _cpu_id(),
                              digest_size=10).hexdigest()
        lib = cache_dir() / f"native-{key}.so"
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
        errors.append(f"{' '.join(flags)}: {_compiler_error(run)}")
    raise OSError("; ".join(errors))


def _compiler_error(run: subprocess.CompletedProcess) -> str:
    """The compiler's first error line (its last is often just "compilation terminated.")."""
    lines = [ln.strip() for ln in (run.stderr or "").splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else None)
    return first or f"exit code {run.returncode}"


def _bind(lib: ctypes.CDLL) -> None:
    p, i, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    for name, args, res in (
        ("alphaq_work_size", [i, i], size),
        ("alphaq_symmetric_eigenvalues", [p, i, i, p, p], i),
        ("alphaq_tridiagonal_eigenvalues", [p, p, i, i], i),
        ("alphaq_moments", [p, size, ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double)], size),
    ):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


def _load() -> dict:
    if _state:  # set once, under the lock; every spectral batch asks, from several threads
        return _state
    with _lock:
        if _state:
            return _state
        compiler = os.environ.get("CC") or "cc"
        if os.environ.get("ALPHAQ_NATIVE", "1") == "0":
            why = "ALPHAQ_NATIVE=0"
        elif shutil.which(compiler) is None:
            why = f"no C compiler ({compiler}; set $CC)"
        else:
            try:
                lib = ctypes.CDLL(str(_compile(compiler)))
                _bind(lib)
                _state["lib"] = lib
                return _state
            except (OSError, AttributeError, subprocess.SubprocessError) as exc:
                why = f"compiling {SOURCE.name} with {compiler} failed: {exc}"
        # on purpose: INFO; otherwise the user should know the spectral stage runs ~2x slower
        log.log(logging.INFO if why == "ALPHAQ_NATIVE=0" else logging.WARNING,
                "native kernels unavailable (%s); the spectral stage uses numpy (same results, slower)", why)
        _state["error"] = why
        return _state


def unavailable_reason() -> str | None:
    """Why the compiled kernels are not used ("ALPHAQ_NATIVE=0", "no C compiler (...)", or
    "compiling native.c with CC failed: <the compiler's error>"), or None when they are."""
    return _load().get("error")


def available() -> bool:
    return "lib" in _load()


def backend() -> str:
    """What computes the spectral stage's numbers: "native" or "numpy". Results agree to
    rounding; the analysis cache keys on it, so that a cached alpha is always what this machine
    would compute."""
    return "native" if available() else "numpy"


def _lib() -> ctypes.CDLL:
    st = _load()
    if "lib" not in st:
        raise RuntimeError(f"native kernels unavailable: {st['error']}")
    return st["lib"]


def symmetric_eigenvalues(grams: np.ndarray) -> np.ndarray:
    """Eigenvalues, ascending, of each symmetric matrix in ``grams`` (k, n, n) float64 (only the
    upper triangles, ``g[i, j]`` with ``j >= i``, are read): (k, n) float64. Raises LinAlgError
    for a matrix the kernel does not take (entries beyond ~1e153, which would need LAPACK's
    rescaling; Gram matrices of float32 weights stay below 1e80)."""
    lib = _lib()
    g = np.ascontiguousarray(grams, dtype=np.float64)
    k, n, n2 = g.shape
    if n != n2:
        raise ValueError(f"expected square matrices, got {g.shape}")
    out = np.empty((k, n), dtype=np.float64)
    # NaN-filled, not empty: a read of scratch the kernel did not write shows up as a failure
    work = np.full(max(1, lib.alphaq_work_size(n, k)), np.nan)
    bad = lib.alphaq_symmetric_eigenvalues(g.ctypes.data, k, n, out.ctypes.data, work.ctypes.data)
    if bad:
        raise np.linalg.LinAlgError(f"tridiagonal QL failed for matrix {bad - 1} of {k}")
    return out


def tridiagonal_eigenvalues(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Eigenvalues, ascending, of symmetric tridiagonal matrices: diagonals ``d`` (k, n),
    off-diagonals ``e`` (k, n-1). The eigensolver's second half, exposed for tests."""
    lib = _lib()
    out = np.array(d, dtype=np.float64, order="C", copy=True)
    k, n = out.shape
    ee = np.zeros((k, n), dtype=np.float64)
    ee[:, : n - 1] = e
    bad = lib.alphaq_tridiagonal_eigenvalues(out.ctypes.data, ee.ctypes.data, k, n)
    if bad:
        raise np.linalg.LinAlgError(f"tridiagonal QL failed for matrix {bad - 1} of {k}")
    return out


def moments(w: np.ndarray) -> tuple[int, float, float]:
    """(number of non-finite values, mean, population variance) of float32 ``w``, in float64;
    mean and variance are NaN when there are non-finite values."""
    x = np.ascontiguousarray(w, dtype=np.float32)
    mean, m2 = ctypes.c_double(), ctypes.c_double()
    bad = _lib().alphaq_moments(x.ctypes.data, x.size, ctypes.byref(mean), ctypes.byref(m2))
    if bad or x.size == 0:
        return int(bad), float("nan"), float("nan")
    return 0, mean.value, m2.value / x.size
