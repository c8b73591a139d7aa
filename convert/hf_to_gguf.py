"""HF checkpoint -> float GGUF with llama.cpp's own converter (see convert/run_upstream.py).

Architecture quirks, tokenizers and tensor layout all come from upstream; this module only runs
it in a subprocess, reports its documented tokenizer fallback, and turns its failures into one
clear line.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from alphaq.errors import InputError
from convert.run_upstream import FALLBACK_MARK, PARENT_ENV
from convert.vendor import ensure_vendor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conversion:
    path: Path  # the written float GGUF
    tokenizer_fallback: str | None  # the converter's warning when the SentencePiece fallback ran


# Where llama.cpp's converter reads a vocabulary from (conversion/base.py, conversion/llama.py):
# SentencePiece tokenizer.model (_set_vocab_sentencepiece), an HF tokenizer.json
# (_set_vocab_llama_hf, and transformers' AutoTokenizer in _set_vocab_gpt2), or a slow BPE
# tokenizer's vocab.json + merges.txt (AutoTokenizer). With none of them it fails deep inside
# transformers ("You need to have sentencepiece or tiktoken installed ..."), which names another cause.
TOKENIZER_CHOICES = (("tokenizer.model",), ("tokenizer.json",), ("vocab.json", "merges.txt"))


def check_tokenizer_files(model_dir: Path) -> None:
    """InputError unless ``model_dir`` has the files of one tokenizer llama.cpp's converter reads."""
    if any(all((model_dir / f).is_file() for f in files) for files in TOKENIZER_CHOICES):
        return
    if remote_tokenizer_module(model_dir) is not None:
        return
    present = [f for files in TOKENIZER_CHOICES for f in files if (model_dir / f).is_file()]
    missing = [f for files in TOKENIZER_CHOICES for f in files if f not in present]
    raise InputError(f"{model_dir} has no tokenizer llama.cpp's converter can read: it needs tokenizer.model "
                     f"(SentencePiece) or tokenizer.json, or vocab.json with merges.txt, or a tokenizer in the "
                     f"checkpoint's own code (tokenizer_config.json's auto_map and its .py file); missing: "
                     f"{', '.join(missing)}")


def remote_tokenizer_module(model_dir: Path) -> Path | None:
    """The .py file of a tokenizer the checkpoint ships as code, named by tokenizer_config.json's
    ``auto_map.AutoTokenizer`` (e.g. Kimi K2's and Kimi-Linear's tokenization_kimi.py over
    tiktoken.model, Hunyuan's tokenization_hy.py over hy.tiktoken), when it is in ``model_dir``.
    llama.cpp's converter loads such a tokenizer with AutoTokenizer.from_pretrained(...,
    trust_remote_code=True) (conversion/deepseek.py, kimi_linear.py, hunyuan.py); the tiktoken
    package they import is one of alphaq's dependencies."""
    import json

    try:
        auto = json.loads((model_dir / "tokenizer_config.json").read_text()).get("auto_map", {}).get("AutoTokenizer")
    except (OSError, ValueError, AttributeError):
        return None
    for ref in auto if isinstance(auto, list) else [auto]:
        if isinstance(ref, str) and "--" not in ref and "." in ref:  # ("repo--module.Class" is another repo's code)
            module = model_dir / (ref.rsplit(".", 1)[0].replace(".", "/") + ".py")
            if module.is_file():
                return module
    return None


def convert_hf(model_dir: Path, out_path: Path, *, outtype: str = "bf16", extra: tuple[str, ...] = ()) -> Conversion:
    """Run convert_hf_to_gguf.py on ``model_dir``; write ``out_path`` (float ``outtype``). ``extra``:
    more converter options, e.g. ``("--split-max-tensors", "20")``: the result's path is then the
    first part of the split GGUF (``OUT-00001-of-0000N.gguf``, the converter's naming)."""
    running = start_convert_hf(model_dir, out_path, outtype=outtype, extra=extra)
    try:
        return running.wait()
    except BaseException:
        running.kill()  # e.g. Ctrl-C: never leave the converter running
        raise


def start_convert_hf(model_dir: Path, out_path: Path, *, outtype: str = "bf16",
                     extra: tuple[str, ...] = ()) -> "RunningConversion":
    """Start convert_hf_to_gguf.py on ``model_dir`` in the background; ``.wait()`` gives the
    `Conversion` (or raises its error), ``.kill()`` stops it. The caller may work meanwhile
    (`alphaq.pipeline.convert` analyses the checkpoint beside it)."""
    return RunningConversion(model_dir, out_path, outtype, extra)


class RunningConversion:
    def __init__(self, model_dir: Path, out_path: Path, outtype: str, extra: tuple[str, ...] = ()):
        check_tokenizer_files(model_dir)
        vendor = ensure_vendor()
        cmd = [sys.executable, "-m", "convert.run_upstream", str(vendor.absolute()), str(Path(model_dir).absolute()),
               "--outtype", outtype, "--outfile", str(Path(out_path).absolute()), *extra]
        # run from the directory holding this `convert` package (the checkout, or site-packages
        # when installed), so that `-m` finds this package and never another `convert` in the
        # caller's directory; hence the absolute paths above
        root = Path(__file__).resolve().parents[1]
        self.model_dir, self.out_path = model_dir, out_path
        self._errlog = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        if threading.current_thread() is threading.main_thread():  # (run_upstream._die_with_parent)
            env[PARENT_ENV] = str(os.getpid())
        try:
            self.proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=self._errlog, text=True,
                                         env=env)
        except BaseException:
            self._errlog.close()
            raise

    def exited(self) -> int:
        """Block until the converter process exits; its exit code (safe from any thread)."""
        return self.proc.wait()

    def done(self) -> bool:
        return self.proc.poll() is not None

    def wait(self) -> Conversion:
        try:
            returncode = self.proc.wait()
            self._errlog.seek(0)
            stderr = self._errlog.read()
        finally:
            self._errlog.close()
        fallback = next((line.split(": ", 1)[1] for line in stderr.splitlines() if line.startswith(FALLBACK_MARK)), None)
        written = self._written()
        if returncode != 0 or written is None:
            lines = [ln for ln in stderr.splitlines() if ln.strip() and "Writing" not in ln]
            reason = lines[-1] if lines else f"exit code {returncode}"
            raise InputError(f"llama.cpp's converter failed on {self.model_dir}: {reason}")
        if fallback:
            log.warning("tokenizer fallback: %s", fallback)
        return Conversion(written, fallback)

    def _written(self) -> Path | None:
        """The file the converter wrote: ``out_path``, or with a split option the first part
        (gguf-py's GGUFWriter names parts OUT-00001-of-0000N.gguf, .gguf stripped from OUT)."""
        if self.out_path.exists():
            return self.out_path
        stem = self.out_path.name.removesuffix(".gguf")
        return next(iter(sorted(self.out_path.parent.glob(f"{glob.escape(stem)}-00001-of-*.gguf"))), None)

    def kill(self) -> None:
        """Stop the converter (if still running) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._errlog.close()
