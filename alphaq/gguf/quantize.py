"""Quantise a BF16/F16/F32 GGUF with llama.cpp's own quantiser, one planned type per tensor.

We drive ``llama_model_quantize`` (src/llama-quant.cpp) through llama-cpp-python's ctypes
bindings with one anchored ``tt_overrides`` pattern per tensor, so every byte of every quantised
tensor comes from llama.cpp itself, its shape fallbacks included.

Importance matrix: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S (and Q2_K in a Q2_K_S file) refuse to
quantise without one. AlphaQ is calibration-free, so those tensors get an all-ones vector (equal
importance for every column), which llama.cpp accepts. Tensors of other types get *no* imatrix,
so they are byte-identical to a stock ``llama-quantize`` run without calibration data.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from alphaq.errors import AlphaQError, QuantizeError
from alphaq.gguf.ggml import LLAMA_IMATRIX_TYPES
from alphaq.gguf.io import first_shard, read_tensors

log = logging.getLogger(__name__)

# types llama.cpp refuses to write without an importance matrix (one list: alphaq.gguf.ggml's)
NEEDS_IMATRIX = LLAMA_IMATRIX_TYPES

# llama_ftype used for general.file_type, chosen by the type holding most of the planned weights.
# Every quantisable tensor has an explicit override, so the ftype changes no tensor.
_FTYPE_BY_TYPE = {
    "IQ1_S": "LLAMA_FTYPE_MOSTLY_IQ1_S", "IQ1_M": "LLAMA_FTYPE_MOSTLY_IQ1_M",
    "IQ2_XXS": "LLAMA_FTYPE_MOSTLY_IQ2_XXS", "IQ2_XS": "LLAMA_FTYPE_MOSTLY_IQ2_XS",
    "IQ2_S": "LLAMA_FTYPE_MOSTLY_IQ2_S", "IQ3_XXS": "LLAMA_FTYPE_MOSTLY_IQ3_XXS",
    "IQ3_S": "LLAMA_FTYPE_MOSTLY_IQ3_S", "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K", "Q3_K": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
}

# llama.cpp's stock mixes, for baselines and for the summary's "nearest stock mix"
STOCK_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M")
# every weight mix llama-quantize offers from IQ1_S to Q8_0: what --like accepts, and the grid
ALL_MIXES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S", "Q2_K", "IQ3_XXS", "IQ3_XS",
             "IQ3_S", "IQ3_M", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "IQ4_NL", "Q4_K_S", "Q4_K_M",
             "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
# mixes llama.cpp writes only with an importance matrix (llama-quantize refuses them without one)
IMATRIX_MIXES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S", "IQ3_XXS", "IQ3_XS")


def mix_ftype(mix: str) -> int:
    """LLAMA_FTYPE_MOSTLY_<mix>, or a one-line error naming the mixes there are."""
    ftype = getattr(_llama(), f"LLAMA_FTYPE_MOSTLY_{str(mix).upper()}", None)
    if ftype is None or str(mix).upper() not in ALL_MIXES:
        raise AlphaQError(f"unknown llama.cpp mix {mix!r}; allowed: {', '.join(ALL_MIXES)}")
    return int(ftype)


def tensor_pattern(name: str) -> str:
    """Anchored, escaped pattern: llama.cpp uses std::regex_search (unanchored, first match wins),
    so a bare 'blk.1.ffn_up_exps' would also hit 'blk.11.ffn_up_exps'."""
    return "^" + re.escape(name) + "$"


def _load_path(src: Path) -> bytes:
    """The path llama.cpp loads ``src`` from: the first part of a split GGUF. A file whose header
    cannot be read goes to llama.cpp as it is, so that the refusal carries llama.cpp's own reason
    (a missing part of a split GGUF is alphaq's one-line InputError)."""
    try:
        return str(first_shard(src)).encode()
    except (ValueError, OSError, struct.error, UnicodeDecodeError):
        return str(src).encode()


def _llama():
    import llama_cpp

    return llama_cpp


def ftype_for(tensor_types: dict[str, GGMLQuantizationType], n_elements: dict[str, int]) -> int:
    llama_cpp = _llama()
    weight: dict[str, int] = {}
    for name, t in tensor_types.items():
        weight[t.name] = weight.get(t.name, 0) + n_elements[name]
    dominant = max(sorted(weight), key=weight.get) if weight else "Q4_K"
    return int(getattr(llama_cpp, _FTYPE_BY_TYPE.get(dominant, "LLAMA_FTYPE_MOSTLY_Q4_K_M")))


# llama.cpp's quantiser converts a tensor's rows to float32 (and writes them) a slab at a time, at
# most this many bytes of rows (source, float32 and output) at once. Its default, 8 GiB, takes every
# tensor of a real model whole: a merged Mixtral-8x7B expert tensor (8 x 14336 x 4096) is 1.9 GB of
# float32 plus its output. A slab of 512 MiB costs no time (the slabs are quantised one after another,
# each on every thread) and the bytes written are the same (rows are quantised on their own, each
# expert's rows with its own importance vector: tested). llama-quantize's --max-buffer-size (MiB)
# sets it there, and alphaq's (ConvertConfig.max_buffer_size) here; the stock baselines keep
# llama.cpp's default.
QUANTISER_BUFFER_BYTES = 512 << 20


@dataclass
class _Keepalive:
    """ctypes buffers that must outlive the llama_model_quantize call."""

    objects: list


def _build_params(ftype: int, nthread: int, overrides: dict[str, GGMLQuantizationType] | None,
                  imatrix: dict[str, np.ndarray] | None, dry_run: bool = False, kv_overrides=(),
                  max_buf_size: int | None = None):
    llama_cpp = _llama()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    params.dry_run = dry_run
    # a Q8_0 source is requantised only after alphaq's own gate (--allow-requantize,
    # alphaq.pipeline.convert.check_source_gguf); the dry runs of a stock mix need it too
    params.allow_requantize = True
    params.max_buf_size = QUANTISER_BUFFER_BYTES if max_buf_size is None else max_buf_size  # 0: llama.cpp's default
    keep = _Keepalive([])
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (name, t) in enumerate(sorted(overrides.items())):
            pat = tensor_pattern(name).encode()
            keep.objects.append(pat)
            arr[i].pattern = pat
            arr[i].type = int(t)
        arr[len(overrides)].pattern = None  # NULL-terminated
        params.tt_overrides = arr
        keep.objects.append(arr)
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, vec) in enumerate(sorted(imatrix.items())):
            vec = np.ascontiguousarray(vec, dtype=np.float32)
            keep.objects.append(vec)
            bname = name.encode()
            keep.objects.append(bname)
            arr[i].name = bname
            arr[i].data = vec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = vec.size
        arr[len(imatrix)].name = None
        params.imatrix = arr
        keep.objects.append(arr)
    if kv_overrides:
        arr = _kv_override_array(kv_overrides)
        params.kv_overrides = arr
        keep.objects.append(arr)
    return params, keep


# llama.h enum llama_model_kv_override_type
_KV_TAGS = {"int": "LLAMA_KV_OVERRIDE_TYPE_INT", "float": "LLAMA_KV_OVERRIDE_TYPE_FLOAT",
            "bool": "LLAMA_KV_OVERRIDE_TYPE_BOOL", "str": "LLAMA_KV_OVERRIDE_TYPE_STR"}


def _kv_override_array(kv_overrides):
    """llama_model_kv_override[] as llama-quantize builds it from --override-kv: one entry per
    override in order, terminated by an empty key; llama-quant.cpp writes them into the output
    (int as u32, float as f32) after its own keys, so a later one wins."""
    llama_cpp = _llama()
    arr = (llama_cpp.llama_model_kv_override * (len(kv_overrides) + 1))()
    for i, o in enumerate(kv_overrides):
        arr[i].key = o.key.encode()
        arr[i].tag = int(getattr(llama_cpp, _KV_TAGS[o.kind]))
        if o.kind == "int":
            arr[i].value.val_i64 = o.value
        elif o.kind == "float":
            arr[i].value.val_f64 = o.value
        elif o.kind == "bool":
            arr[i].value.val_bool = o.value
        else:
            arr[i].value.val_str = o.value.encode()
    arr[len(kv_overrides)].key = b""
    return arr


def ones_imatrix(src: Path, names: list[str]) -> dict[str, np.ndarray]:
    """All-ones importance vectors: for a merged 3-D expert tensor size = ne0 * n_expert."""
    shapes = {t.name: t.shape for t in read_tensors(src)}  # numpy order: (n_expert, rows, cols)
    sizes = {name: shapes[name][-1] * (shapes[name][-3] if len(shapes[name]) >= 3 else 1) for name in names}
    # views of one array (read-only: the quantiser only reads them): a DeepSeek-V3's 174 merged expert
    # tensors would otherwise take 1.3 GB of ones, for each dry run of an IQ mix
    ones = np.ones(max(sizes.values(), default=0), dtype=np.float32)
    ones.flags.writeable = False
    return {name: ones[:n] for name, n in sizes.items()}


def quantize_gguf(src: Path, dst: Path, tensor_types: dict[str, GGMLQuantizationType], *,
                  nthread: int = 0, progress: bool = False,
                  file_type_from: dict[str, GGMLQuantizationType] | None = None,
                  imatrix: dict[str, np.ndarray] | None = None, kv_overrides=(),
                  max_buf_size: int | None = None) -> None:
    """Quantise ``src`` into ``dst`` with exactly ``tensor_types`` (GGUF name -> written type).

    file_type_from: the types that decide general.file_type (default: tensor_types).
    imatrix: importance vectors (flat, per expert for merged tensors) handed to llama.cpp for
      every tensor that has one; a tensor of a type that requires one and has none gets all-ones.
    kv_overrides: alphaq.allocate.overrides.KVOverride, written into ``dst`` by llama.cpp (--override-kv).
    max_buf_size: bytes of one tensor's rows the quantiser holds at once (--max-buffer-size); None:
      QUANTISER_BUFFER_BYTES."""
    llama_cpp = _llama()
    n_elements = {t.name: t.n_elements for t in read_tensors(src)}
    unknown = sorted(set(tensor_types) - set(n_elements))
    if unknown:
        raise AlphaQError(f"plan names tensors that are not in {src.name}: {', '.join(unknown[:5])}")
    given = {n: v for n, v in (imatrix or {}).items() if n in tensor_types}
    needs = [n for n, t in tensor_types.items() if t in NEEDS_IMATRIX and n not in given]
    vectors = {**(ones_imatrix(src, needs) if needs else {}), **given}
    params, keep = _build_params(ftype_for(file_type_from or tensor_types, n_elements), nthread, tensor_types,
                                 vectors or None, kv_overrides=kv_overrides, max_buf_size=max_buf_size)
    from tqdm import tqdm

    tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL)

    def on_line(line: str) -> None:
        tail.append(line)
        if _PROGRESS_LINE.match(line):
            bar.update(1)

    with tqdm(total=len(n_elements), desc="quantise", unit="tensor", disable=not progress,
              dynamic_ncols=True) as bar, _captured_log(on_line):
        rc = llama_cpp.llama_model_quantize(_load_path(src), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        raise QuantizeError(f"llama.cpp's quantiser failed on {src}: {failure_reason(tail, rc)}")


# llama.cpp's log lines kept to explain a failure (its reason is the last one or close to it)
_LOG_TAIL = 64


def failure_reason(lines, rc: int) -> str:
    """llama.cpp's own reason from its log ("llama_model_quantize: failed to quantize: ..."), else
    its last line, else the return code."""
    text = [ln.strip() for ln in lines if ln.strip()]
    for ln in reversed(text):
        if "failed to quantize:" in ln:
            return ln.split("failed to quantize:", 1)[1].strip()
    return text[-1] if text else f"llama_model_quantize returned {rc}"


def quantize_stock(src: Path, dst: Path, mix: str, *, nthread: int = 0,
                   imatrix: dict[str, np.ndarray] | None = None, max_buf_size: int = 0) -> None:
    """llama.cpp's own mix (e.g. "Q3_K_M") with its heuristics, as ``llama-quantize`` would
    (``max_buf_size`` 0: with its default buffers too)."""
    llama_cpp = _llama()
    params, keep = _build_params(mix_ftype(mix), nthread, None, imatrix, max_buf_size=max_buf_size)
    tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL)
    with _captured_log(tail.append):
        rc = llama_cpp.llama_model_quantize(_load_path(src), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        raise QuantizeError(f"llama.cpp's quantiser failed on {src} ({mix}): {failure_reason(tail, rc)}")


_DRY_RUN_LINE = re.compile(r"\]\s+(\S+)\s+- \[.*?\], type =\s*(\S+), size = .*?(?:\((\S+)\))?\s*$")


def stock_mix_types(src: Path, mix: str) -> dict[str, str]:
    """Per-tensor target types of a stock mix, from llama.cpp's own ``dry_run`` (no quantising).

    llama.cpp reports the decision only through its log, so we capture the log lines
    '[ i/ n] NAME - [shape], type = SRC, size = a MiB -> b MiB (NEW)' for the duration.
    A mix that llama.cpp writes only with an importance matrix gets an all-ones one (the types it
    picks do not depend on the vector's values)."""
    llama_cpp = _llama()
    ftype = mix_ftype(mix)
    lines: list[str] = []
    imatrix = None
    if mix.upper() in IMATRIX_MIXES:
        imatrix = ones_imatrix(src, [t.name for t in read_tensors(src) if len(t.shape) >= 2])
    params, keep = _build_params(ftype, 1, None, imatrix, dry_run=True)
    with _captured_log(lines.append):
        rc = llama_cpp.llama_model_quantize(_load_path(src), b"/dev/null", ctypes.byref(params))
    del keep
    if rc != 0:
        raise QuantizeError(f"llama.cpp's quantiser failed on {src} ({mix}, dry run): "
                            f"{failure_reason(lines[-_LOG_TAIL:], rc)}")
    types = {}
    for line in lines:
        m = _DRY_RUN_LINE.search(line.rstrip("\n"))
        if m:
            name, cur, new = m.group(1), m.group(2), m.group(3)
            types[name] = (new or cur).upper()
    return types


_PROGRESS_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]")


@contextlib.contextmanager
def _captured_log(on_line):
    """Route llama.cpp's log to ``on_line`` (whole lines) for the duration; llama.cpp reports
    per-tensor progress and dry-run decisions only through its log."""
    llama_cpp = _llama()
    partial: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        s = text.decode(errors="replace")
        partial.append(s)
        if s.endswith("\n"):
            on_line("".join(partial))
            partial.clear()

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        yield
    finally:
        _restore_llama_log()


def _restore_llama_log() -> None:
    """Hand llama.cpp's log back to llama-cpp-python's own callback."""
    llama_cpp = _llama()
    try:
        from llama_cpp._logger import llama_log_callback as default_cb

        llama_cpp.llama_log_set(default_cb, ctypes.c_void_p(0))
    except ImportError:  # older layouts: silence instead of leaving a dangling pointer
        llama_cpp.llama_log_set(llama_cpp.llama_log_callback(lambda *a: None), ctypes.c_void_p(0))
