"""llama.cpp forward passes over a float GGUF, for the stages that run the model on its own text.

A `Session` loads the model on the CPU with no repacked weight buffers, memory-mapped where the OS
allows it (see `alphaq.runtime.mapped`: the weights then cost page cache, not private memory, and a weight is
made writable copy-on-write while it is fake-quantised), else into a malloc'd writable copy. It
gives the three things those stages need:

* `logits(tokens)`: the logits at every position of one window, one ``llama_decode``;
* `step(tokens)`: one token for each of several sequences decoded together (sampling);
* `watch(callback)`: llama.cpp's ``ggml_backend_sched_eval_callback``, the hook ``llama-imatrix``
  uses, called with every matrix multiplication once it has been computed;
* `weights`: the bytes of every weight inside llama.cpp's own buffers, found through that hook,
  so a weight can be overwritten in place (fake quantisation) and restored without a reload.

Only llama.cpp's public C API and the ggml tensor struct are used; the struct layout is checked
against ``ggml_tensor_overhead()`` when the first session opens.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from alphaq.errors import AlphaQError
from alphaq.runtime.mapped import Mapper, in_mapped_file
from alphaq.runtime.mapped import available as mmap_available

log = logging.getLogger(__name__)

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_NAME, GGML_MAX_OP_PARAMS = 4, 10, 64, 64


class GGMLTensor(ctypes.Structure):
    """struct ggml_tensor (ggml/include/ggml.h of the vendored llama.cpp)."""


GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GGMLTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]

_GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type + padding
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_I32, GGML_TYPE_BF16 = 0, 1, 8, 26, 30
_NP_DTYPE = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16, GGML_TYPE_I32: np.int32,
             GGML_TYPE_BF16: np.uint16}


@functools.cache
def ops() -> dict[str, int]:
    """ggml op name -> enum value, read from the library itself (no retyped enum)."""
    from alphaq.gguf.ggml import libggml

    lib = libggml()
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = (ctypes.c_int,)
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    if lib.ggml_tensor_overhead() != _GGML_OBJECT_SIZE + ctypes.sizeof(GGMLTensor):
        raise RuntimeError("struct ggml_tensor layout differs from this llama.cpp build; update alphaq/runtime/forward.py")
    out = {}
    for i in range(200):
        name = lib.ggml_op_name(i)
        if name is None or name.decode() in out:
            break
        out[name.decode()] = i
    return out


def tensor_array(t: GGMLTensor) -> np.ndarray:
    """A numpy view (ne3, ne2, ne1, ne0) of a host tensor's data, strides as ggml has them."""
    dtype = _NP_DTYPE.get(t.type)
    if dtype is None:
        raise RuntimeError(f"tensor {t.name.decode()} has ggml type {t.type}, not F32/F16/BF16/I32")
    shape = tuple(int(t.ne[i]) for i in reversed(range(GGML_MAX_DIMS)))
    strides = tuple(int(t.nb[i]) for i in reversed(range(GGML_MAX_DIMS)))
    span = sum((n - 1) * s for n, s in zip(shape, strides)) + np.dtype(dtype).itemsize
    buf = (ctypes.c_char * span).from_address(t.data)
    return np.ndarray(shape, dtype=dtype, buffer=buf, strides=strides)


@dataclass(frozen=True)
class WeightBuffer:
    """Where llama.cpp keeps one weight: address, ggml type and shape (numpy order)."""

    name: str
    address: int
    ggml_type: int
    shape: tuple[int, ...]
    n_bytes: int
    mapper: Mapper | None = field(default=None, compare=False, repr=False)  # set: the bytes are the mmapped file's

    def view(self, writable: bool = False) -> np.ndarray:
        """The weight's bytes as a numpy array of its element type (BF16 as uint16; a Q8_0 working
        copy's rows as uint8 bytes, shape (..., rows, bytes per row)). A mapped weight's pages are
        read-only until ``mapper.private`` (a write would kill the process), so its view is
        writable only when asked for, after that call (see damage.Swap)."""
        dtype, shape = _NP_DTYPE.get(self.ggml_type), self.shape
        if self.ggml_type == GGML_TYPE_Q8_0:
            from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
            dtype, shape = np.uint8, (*shape[:-1], shape[-1] // block * block_bytes)
        if dtype is None:
            raise AlphaQError(f"{self.name} is stored as ggml type {self.ggml_type}; the forward stages run "
                              "F32/F16/BF16 models or a Q8_0 working copy")
        buf = (ctypes.c_char * self.n_bytes).from_address(self.address)
        out = np.ndarray(shape, dtype=dtype, buffer=buf)
        out.flags.writeable = writable or self.mapper is None
        return out


Callback = Callable[[GGMLTensor], None]


class Session:
    """One float GGUF loaded by llama.cpp on the CPU, with a context for windows of ``n_ctx``."""

    def __init__(self, path: Path, n_ctx: int, *, n_seq: int = 1, n_threads: int | None = None,
                 mapped: bool | None = None):
        """mapped: load with mmap and write weights copy-on-write (default where the OS allows it),
        or False for llama.cpp's malloc'd copy of the whole model."""
        import llama_cpp as lc

        from alphaq.gguf.io import first_shard

        self._lc = lc
        path = self.path = first_shard(Path(path))  # llama.cpp loads a split GGUF from its first part
        self.n_ctx = n_ctx
        self._watchers: list[tuple[Callable[[GGMLTensor], bool], Callback]] = []
        self.weights: dict[str, WeightBuffer] = {}
        self._eval_cb = lc.ggml_backend_sched_eval_callback(self._on_eval)
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        self._mapper = Mapper() if (mmap_available() if mapped is None else mapped) else None
        # LLAMA_LOAD_MODE_MMAP (1): compute from the file's pages; NONE (0): a malloc'd, writable copy
        mp.load_mode = 1 if self._mapper else 0
        mp.use_extra_bufts = False  # no repacked copies: the buffer we write is the one computed with
        with _quiet(lc) as errors:
            self._model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self._model:
            raise AlphaQError(f"llama.cpp cannot load {path}" + _why(errors))
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq
        cp.n_batch = cp.n_ubatch = max(n_ctx, n_seq)  # a whole window in one graph: one callback per weight
        cp.n_seq_max = n_seq
        cp.kv_unified = True
        threads = n_threads or _default_threads()
        cp.n_threads = cp.n_threads_batch = threads
        cp.cb_eval = self._eval_cb
        cp.no_perf = True
        with _quiet(lc) as errors:
            self._ctx = lc.llama_init_from_model(self._model, cp)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise AlphaQError(f"llama.cpp cannot create a context for {path}" + _why(errors))
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self.bos = int(lc.llama_vocab_bos(self._vocab))
        self._batch = lc.llama_batch_init(max(n_ctx, n_seq), 0, max(n_seq, 1))
        self._find_weights()

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        lc = self._lc
        if getattr(self, "_ctx", None):
            with _quiet(lc):  # (llama.cpp logs its compute buffers as the context goes)
                lc.llama_batch_free(self._batch)
                lc.llama_free(self._ctx)
                lc.llama_model_free(self._model)
            self._ctx = self._model = None
        if getattr(self, "_mapper", None):
            self._mapper.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- decoding ---------------------------------------------------------------------------------

    def _decode(self, tokens, positions, seqs, want_logits: bool) -> np.ndarray:
        lc, b = self._lc, self._batch
        n = len(tokens)
        b.n_tokens = n
        for i, (tok, pos, seq) in enumerate(zip(tokens, positions, seqs)):
            b.token[i] = int(tok)
            b.pos[i] = int(pos)
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = int(seq)
            b.logits[i] = 1 if want_logits else 0
        rc = lc.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc} on {self.path.name}")
        if not want_logits:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        ptr = lc.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab).copy()

    def clear(self) -> None:
        self._lc.llama_memory_clear(self._lc.llama_get_memory(self._ctx), True)

    def logits(self, tokens) -> np.ndarray:
        """(len(tokens), n_vocab) float32 logits of one window, from a cleared cache."""
        if not 0 < len(tokens) <= self.n_ctx:
            raise AlphaQError(f"window of {len(tokens)} tokens; this session takes 1..{self.n_ctx}")
        self.clear()
        return self._decode(tokens, range(len(tokens)), [0] * len(tokens), True)

    def step(self, tokens, position: int) -> np.ndarray:
        """Sequence i gets tokens[i] at ``position``; returns (len(tokens), n_vocab) logits."""
        return self._decode(tokens, [position] * len(tokens), range(len(tokens)), True)

    # -- the eval hook ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def watch(self, wants: Callable[[GGMLTensor], bool], callback: Callback):
        """Call ``callback(t)`` for every graph node ``t`` that ``wants(t)`` accepts, after llama.cpp
        computed it (its inputs ``t.src[i]`` are then readable too)."""
        entry = (wants, callback)
        self._watchers.append(entry)
        try:
            yield
        finally:
            self._watchers.remove(entry)

    def _on_eval(self, t_ptr, ask, user_data) -> bool:
        try:
            t = ctypes.cast(t_ptr, ctypes.POINTER(GGMLTensor)).contents
            if ask:
                return any(w(t) for w, _ in self._watchers)
            for w, cb in self._watchers:
                if w(t):
                    cb(t)
            return True
        except Exception:  # an exception must not cross the C boundary: abort the graph instead
            log.exception("eval callback failed")
            return False

    def _find_weights(self) -> None:
        """Record where every weight a graph reads lives: run one token through the model and note
        each operation's sources that are model weights (named ``*.weight``, data in a buffer)."""
        found: dict[str, WeightBuffer] = {}

        def note(t: GGMLTensor) -> None:
            for i in range(GGML_MAX_SRC):
                if not t.src[i]:
                    continue
                s = t.src[i].contents
                name = s.name.decode()
                if name.endswith(".weight") and s.data and not s.view_src and name not in found:
                    shape = tuple(int(s.ne[d]) for d in reversed(range(GGML_MAX_DIMS)))
                    while len(shape) > 2 and shape[0] == 1:
                        shape = shape[1:]
                    n_bytes = int(s.nb[GGML_MAX_DIMS - 1]) * int(s.ne[GGML_MAX_DIMS - 1])
                    found[name] = WeightBuffer(name, int(s.data), int(s.type), shape, n_bytes, self._mapper)

        with self.watch(lambda t: True, note):
            self.logits([self.bos if self.bos >= 0 else 0, 1])
        if self._mapper:  # a weight llama.cpp copied out of the file (none on the CPU today) is written in place
            inside = in_mapped_file([(b.address, b.n_bytes) for b in found.values()])
            found = {n: b if ok else replace(b, mapper=None) for (n, b), ok in zip(found.items(), inside)}
        self.weights = found


def _default_threads() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextlib.contextmanager
def _quiet(lc):
    """Silence llama.cpp's loader log for the duration (it prints every tensor); yields the lines
    that report an error, which say why a load failed."""
    from alphaq.gguf.quantize import _captured_log

    errors: list[str] = []
    with _captured_log(lambda line: errors.append(line.strip()) if "error" in line.lower() else None):
        yield errors


def _why(errors: list[str]) -> str:
    """llama.cpp's own reason for a failed load, as the tail of our one-line error: its first error
    line without the function-name prefixes (e.g. "check_tensor_dims: tensor 'blk.0.attn_k_norm.weight'
    has wrong shape; expected 256, got 128, 1, 1, 1")."""
    if not errors:
        return " (llama.cpp gave no reason)"
    reason = errors[0].split("error loading model: ", 1)[-1]
    return ": " + " ".join(reason.split())
