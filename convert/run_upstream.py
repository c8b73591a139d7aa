"""Run llama.cpp's own ``convert_hf_to_gguf.py`` with one documented fallback.

Executed as a subprocess by convert.hf_to_gguf (``python -m convert.run_upstream VENDOR_DIR ARGS...``)
so the upstream script's logging setup and globals never leak into the caller.

Tokenizer fallback: some converter classes (Qwen2-MoE, Qwen3-MoE, OLMoE, ...) identify a BPE
tokenizer by hashing its pre-tokenizer output (``get_vocab_base_pre``) and raise
NotImplementedError for a tokenizer they don't know, such as a freshly trained one. When the
checkpoint also has a SentencePiece ``tokenizer.model``, we retry with the converter's own
``_set_vocab_sentencepiece`` (the path Mixtral/Llama use) and print a warning line starting with
``ALPHAQ-TOKENIZER-FALLBACK`` that the caller reports. Without tokenizer.model the error stands.
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


def main(argv: list[str]) -> None:
    _die_with_parent()
    vendor = Path(argv[0])
    sys.path.insert(0, str(vendor))
    sys.path.insert(1, str(vendor / "gguf-py"))  # the converter's own gguf-py, same as upstream
    sys.argv = ["convert_hf_to_gguf.py", *argv[1:]]
    import convert_hf_to_gguf as upstream

    lookup = upstream.get_model_class

    def get_model_class(*args, **kwargs):
        return _with_tokenizer_fallback(lookup(*args, **kwargs))

    upstream.get_model_class = get_model_class
    logging.getLogger("hf-to-gguf").setLevel(logging.WARNING)
    upstream.main()


if __name__ == "__main__":
    main(sys.argv[1:])
