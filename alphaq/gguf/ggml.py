"""ctypes bindings to the ggml quantiser shipped inside the installed llama-cpp-python.

Only what the allocation stage needs: ``ggml_quantize_chunk`` (the real quantiser llama.cpp
uses when it writes a GGUF), ``ggml_row_size``, ``ggml_quantize_requires_imatrix`` and
``ggml_quantize_init``. The library is ``llama_cpp/lib/libggml-base.so``; it is found through the
package's location without importing ``llama_cpp`` (which would load the whole runtime).

Signatures are from ggml/include/ggml.h of the vendored llama.cpp; change them together with it.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from alphaq.errors import AlphaQError, QuantizeError

logger = logging.getLogger(__name__)

_c_float_p = ctypes.POINTER(ctypes.c_float)

# Types llama.cpp refuses to write without an importance matrix: llama-quant.cpp
# `tensor_requires_imatrix` (token_embd/output excepted, and Q2_K only inside a Q2_K_S file).
# This is wider than ggml's own `ggml_quantize_requires_imatrix` (IQ2_XXS, IQ2_XS, IQ1_S), which
# the tests check is a subset of it. The data-free choice for these is an all-ones imatrix.
LLAMA_IMATRIX_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    GGMLQuantizationType[n] for n in ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")
)


def _library_name() -> str:
    if sys.platform == "darwin":
        return "libggml-base.dylib"
    if sys.platform == "win32":
        return "ggml-base.dll"
    return "libggml-base.so"


def find_libggml() -> Path:
    """Path of libggml-base inside the installed llama_cpp package."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise AlphaQError("llama-cpp-python is not installed; `pip install llama-cpp-python==0.3.36`")
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "lib" / _library_name()
        if candidate.exists():
            return candidate
    raise AlphaQError(
        f"no {_library_name()} under {list(spec.submodule_search_locations)}/lib; reinstall llama-cpp-python==0.3.36"
    )


@functools.cache
def libggml() -> ctypes.CDLL:
    """The loaded libggml-base with argument types declared (loaded once per process)."""
    lib = ctypes.CDLL(str(find_libggml()))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = (
        ctypes.c_int,  # enum ggml_type type
        _c_float_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # int64_t start (element offset, multiple of n_per_row)
        ctypes.c_int64,  # int64_t nrows
        ctypes.c_int64,  # int64_t n_per_row
        _c_float_p,  # const float * imatrix (n_per_row weights, or NULL)
    )
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = (ctypes.c_int, ctypes.c_int64)
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = (ctypes.c_int,)
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = (ctypes.c_int,)
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = (ctypes.c_int,)
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = (ctypes.c_int,)
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = (ctypes.c_int,)
    return lib


def row_size(t: GGMLQuantizationType, n_per_row: int) -> int:
    """ggml_row_size(type, ne): bytes of one row."""
    return int(libggml().ggml_row_size(int(t), int(n_per_row)))


def type_name(t: GGMLQuantizationType) -> str:
    """ggml_type_name: the spelling llama.cpp prints and parses ("q4_K", "iq1_s")."""
    return libggml().ggml_type_name(int(t)).decode()


def ggml_requires_imatrix(t: GGMLQuantizationType) -> bool:
    """ggml_quantize_requires_imatrix: ggml_quantize_chunk asserts on a NULL imatrix for these."""
    return bool(libggml().ggml_quantize_requires_imatrix(int(t)))


def needs_imatrix(t: GGMLQuantizationType) -> bool:
    """Whether llama.cpp (or ggml itself) insists on an importance matrix for `t`."""
    return t in LLAMA_IMATRIX_TYPES or ggml_requires_imatrix(t)


def quantize_init(t: GGMLQuantizationType) -> None:
    """ggml_quantize_init: build the IQ lookup grids once (ggml_quantize_chunk also does it lazily)."""
    libggml().ggml_quantize_init(int(t))


def quantize(
    data: np.ndarray,
    t: GGMLQuantizationType,
    imatrix: np.ndarray | str | None = "auto",
) -> np.ndarray:
    """Quantise rows with ggml's own quantiser, exactly as llama.cpp writes them.

    data: (rows, n_per_row) float32, n_per_row divisible by the type's block size.
    imatrix: a (n_per_row,) float32 weight vector; None for no imatrix; "ones" for an all-ones
      vector; "auto" (default) for all-ones exactly where llama.cpp requires an imatrix
      (`needs_imatrix`) and None elsewhere -- the data-free choice, and what a GGUF written by
      llama_model_quantize with an all-ones imatrix for those types contains.
    Returns (rows, row_size) uint8, the bytes gguf-py's `dequantize` reads.
    """
    t = GGMLQuantizationType(t)
    x = np.ascontiguousarray(data, dtype=np.float32)
    if x.ndim != 2:
        raise AlphaQError(f"quantize expects a (rows, cols) array, got shape {x.shape}")
    n_rows, n_per_row = x.shape
    blck, _ = GGML_QUANT_SIZES[t]
    if n_per_row % blck != 0:
        raise AlphaQError(f"row length {n_per_row} is not a multiple of {t.name}'s block size {blck}")
    if isinstance(imatrix, str):
        if imatrix == "auto":
            imatrix = "ones" if needs_imatrix(t) else None
        if imatrix == "ones":
            imatrix = np.ones(n_per_row, dtype=np.float32)
        elif imatrix is not None:
            raise AlphaQError(f"imatrix {imatrix!r} must be an array, None, 'ones' or 'auto'")
    if imatrix is None:
        if ggml_requires_imatrix(t):
            raise AlphaQError(f"{t.name} cannot be quantised without an importance matrix; pass imatrix='ones'")
        qw = ctypes.cast(None, _c_float_p)
    else:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise AlphaQError(f"imatrix shape {imatrix.shape} must be ({n_per_row},)")
        qw = imatrix.ctypes.data_as(_c_float_p)
    rsize = row_size(t, n_per_row)
    out = np.zeros((n_rows, rsize), dtype=np.uint8)
    if n_rows == 0:
        return out
    written = libggml().ggml_quantize_chunk(
        int(t), x.ctypes.data_as(_c_float_p), out.ctypes.data_as(ctypes.c_void_p), 0, n_rows, n_per_row, qw
    )
    if written != out.size:
        raise QuantizeError(f"ggml's quantiser wrote {written} bytes of {t.name} for {n_rows} rows of {n_per_row}, "
                            f"expected {out.size}")
    return out
