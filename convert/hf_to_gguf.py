"""HF checkpoint -> float GGUF with llama.cpp's own converter (see convert/run_upstream.py).

Architecture quirks, tokenizers and tensor layout all come from upstream; this module only runs
it in a subprocess, reports its documented tokenizer fallback, and turns its failures into one
clear line.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from alphaq.errors import AlphaQError
from convert.run_upstream import FALLBACK_MARK
from convert.vendor import ensure_vendor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conversion:
    path: Path  # the written float GGUF
    tokenizer_fallback: str | None  # the converter's warning when the SentencePiece fallback ran


def convert_hf(model_dir: Path, out_path: Path, *, outtype: str = "bf16") -> Conversion:
    """Run convert_hf_to_gguf.py on ``model_dir``; write ``out_path`` (float ``outtype``)."""
    vendor = ensure_vendor()
    cmd = [sys.executable, "-m", "convert.run_upstream", str(vendor), str(model_dir),
           "--outtype", outtype, "--outfile", str(out_path)]
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryFile(mode="w+") as errlog:
        proc = subprocess.run(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=errlog, text=True)
        errlog.seek(0)
        stderr = errlog.read()
    fallback = next((line.split(": ", 1)[1] for line in stderr.splitlines() if line.startswith(FALLBACK_MARK)), None)
    if proc.returncode != 0 or not out_path.exists():
        lines = [ln for ln in stderr.splitlines() if ln.strip() and "Writing" not in ln]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise AlphaQError(f"llama.cpp's converter failed on {model_dir}: {reason}")
    if fallback:
        log.warning("tokenizer fallback: %s", fallback)
    return Conversion(out_path, fallback)
