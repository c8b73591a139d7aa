"""Run llama.cpp's own ``convert_hf_to_gguf.py`` with two documented changes: a tokenizer
fallback, and merged expert tensors written a part at a time.

Executed as a subprocess by convert.hf_to_gguf (``python -m convert.run_upstream VENDOR_DIR ARGS...``)
so the upstream script's logging setup and globals never leak into the caller.

Tokenizer fallback: some converter classes (Qwen2-MoE, Qwen3-MoE, OLMoE, ...) identify a BPE
tokenizer by hashing its pre-tokenizer output (``get_vocab_base_pre``) and raise
NotImplementedError for a tokenizer they don't know, such as a freshly trained one. When the
checkpoint also has a SentencePiece ``tokenizer.model``, we retry with the converter's own
``_set_vocab_sentencepiece`` (the path Mixtral/Llama use) and print a warning line starting with
``ALPHAQ-TOKENIZER-FALLBACK`` that the caller reports. Without tokenizer.model the error stands.

Merged expert tensors written a part at a time: the converter merges a block's experts with
``torch.stack`` and, when it writes the result, evaluates the whole stack in float32 and rounds it
at once. For Mixtral-8x7B (8 experts of 14336 x 4096) that made the converter the largest process
of every pipeline, 3.7-4.1 GiB of private memory (README, "Conversion"). A tensor the model class
yields that is still an unevaluated stack of lazy tensors along dimension 0 is handed to the
writer as upstream's own ``gguf.LazyChunkedTensor`` instead, one chunk per stacked part: the same
rows in the same order, each rounded on its own (the output types round element by element or in
blocks within a row), so the file is byte-identical (tested against upstream's converter run
directly) and only one part is in memory at a time. ``--as-upstream`` (our flag, before the
converter's own) leaves them out: the benchmarks' stock pipeline runs llama.cpp's converter as it is.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FALLBACK_MARK = "ALPHAQ-TOKENIZER-FALLBACK"


def _with_tokenizer_fallback(model_class):
    original = model_class.set_vocab

    def set_vocab(self):
        try:
            original(self)
        except NotImplementedError as exc:
            spm_model = Path(self.dir_model) / "tokenizer.model"
            if "pre-tokenizer was not recognized" not in str(exc) or not spm_model.is_file():
                raise
            print(f"{FALLBACK_MARK}: {model_class.__name__}: BPE pre-tokenizer hash not recognised "
                  f"by llama.cpp's converter; using the SentencePiece vocabulary in {spm_model.name}",
                  file=sys.stderr, flush=True)
            self._set_vocab_sentencepiece()

    model_class.set_vocab = set_vocab  # patched in place: this process converts one model
    return model_class


def _with_chunked_stacks(model_class):
    """The class with every yielded stack of lazy parts along dimension 0 written a part at a time."""
    original = model_class.modify_tensors

    def modify_tensors(self, data_torch, name, bid):
        for new_name, tensor in original(self, data_torch, name, bid):
            yield new_name, _ChunkedStack.of(tensor) or tensor

    model_class.modify_tensors = modify_tensors
    return model_class


class _ChunkedStack:
    """What prepare_tensors needs of a yielded tensor (``.numpy()``), for ``torch.stack(parts, 0)``
    not yet evaluated: a LazyChunkedTensor whose chunks evaluate one part each, without keeping it."""

    def __init__(self, stacked, parts):
        self._stacked, self._parts = stacked, parts

    @staticmethod
    def of(tensor):
        import torch
        from conversion.base import LazyTorchTensor

        if not isinstance(tensor, LazyTorchTensor) or tensor._data is not None or tensor._func is not torch.stack:
            return None
        args, kwargs = tensor._args, tensor._kwargs or {}
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        parts = args[0]
        if dim != 0 or set(kwargs) - {"dim"} or not isinstance(parts, (list, tuple)) or len(parts) < 2:
            return None
        if not all(isinstance(p, LazyTorchTensor) for p in parts):
            return None
        if any(p.dtype not in (torch.float16, torch.float32) for p in parts):
            return None  # numpy has no bfloat16; prepare_tensors converts to float32 before this point
        return _ChunkedStack(tensor, list(parts))

    def __getattr__(self, name):  # shape, dtype, ...: the stack's own
        return getattr(self._stacked, name)

    def numpy(self):
        import gguf
        import numpy as np
        import torch

        dtype = np.float16 if self._stacked.dtype == torch.float16 else np.float32
        return gguf.LazyChunkedTensor([_part_loader(p) for p in self._parts], shape=tuple(self._stacked.shape),
                                      dtype=dtype)


def _part_loader(part):
    def load():
        return _evaluate(part).contiguous().numpy()
    return load


def _evaluate(t):
    """A lazy tensor's value, computed without storing it (or its inputs) in the lazy graph:
    upstream's to_eager memoises every node, which would keep every part alive until the end."""
    from gguf import LazyBase

    if t._data is not None:
        return t._data
    return t._func(*LazyBase._recurse_apply(t._args, _evaluate), **(t._kwargs or {}))


PARENT_ENV = "ALPHAQ_CONVERTER_PARENT"


def _die_with_parent() -> None:
    """Linux: be killed when the alphaq process that started us dies, even by SIGKILL (which gives it
    no chance to stop us), so that no orphaned converter keeps writing. The parent asks for it by
    setting PARENT_ENV to its pid, only from its main thread: the signal follows the thread that
    started the process."""
    import os

    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # it died before the prctl
        os._exit(1)


AS_UPSTREAM = "--as-upstream"  # our runner's own flag: no chunked stacks (the benchmarks' stock pipeline)


def main(argv: list[str]) -> None:
    _die_with_parent()
    chunked = AS_UPSTREAM not in argv
    argv = [a for a in argv if a != AS_UPSTREAM]
    vendor = Path(argv[0])
    sys.path.insert(0, str(vendor))
    sys.path.insert(1, str(vendor / "gguf-py"))  # the converter's own gguf-py, same as upstream
    sys.argv = ["convert_hf_to_gguf.py", *argv[1:]]
    import convert_hf_to_gguf as upstream

    lookup = upstream.get_model_class

    def get_model_class(*args, **kwargs):
        model_class = _with_tokenizer_fallback(lookup(*args, **kwargs))
        return _with_chunked_stacks(model_class) if chunked else model_class

    upstream.get_model_class = get_model_class
    logging.getLogger("hf-to-gguf").setLevel(logging.WARNING)
    upstream.main()


if __name__ == "__main__":
    main(sys.argv[1:])
