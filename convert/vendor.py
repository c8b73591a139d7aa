"""The llama.cpp sources alphaq-gguf targets: the copy vendored in llama-cpp-python's sdist.

llama-cpp-python==0.3.36 pins the llama.cpp whose runtime we load and whose converter, gguf-py and
quantiser we reuse. Its wheel ships only the shared libraries, so the converter
(``convert_hf_to_gguf.py`` + ``conversion/`` + ``gguf-py/``) is unpacked from the sdist, which pip
fetches from PyPI, into a cache directory. Nothing from it is committed to this repository.

    python -m convert.vendor          # fetch + unpack once (idempotent); prints the path
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from alphaq.errors import AlphaQError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# Sub-trees of vendor/llama.cpp that we need: the converter and its package, gguf-py, and the
# quantiser/runtime sources that ggml-patches/ applies to.
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "src/", "ggml/", "include/", "LICENSE")
_STAMP = ".alphaq-complete"

log = logging.getLogger(__name__)


def default_cache_root() -> Path:
    return Path.home() / ".cache" / "alphaq"


def vendor_dir(cache_root: Path | None = None) -> Path:
    return (cache_root or default_cache_root()) / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def fetch_sdist(cache_root: Path | None = None) -> Path:
    """The llama-cpp-python sdist, fetched by pip from PyPI once and kept in the cache."""
    dest = (cache_root or default_cache_root()) / "sdist"
    sdist = dest / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if sdist.exists():
        return sdist
    dest.mkdir(parents=True, exist_ok=True)
    log.info("fetching llama-cpp-python==%s sdist for its vendored llama.cpp", LLAMA_CPP_PYTHON_VERSION)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if not sdist.exists():
        raise AlphaQError(
            f"could not fetch llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist with pip: "
            + (proc.stderr.strip().splitlines() or ["no output"])[-1]
        )
    return sdist


def ensure_vendor(cache_root: Path | None = None) -> Path:
    """Return the unpacked vendor/llama.cpp directory, fetching the sdist with pip if needed."""
    dest = vendor_dir(cache_root)
    if (dest / _STAMP).exists():
        return dest
    sdist = fetch_sdist(cache_root)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(_MEMBERS)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        (staging / _STAMP).write_text(sdist.name + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    return dest


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_vendor())
