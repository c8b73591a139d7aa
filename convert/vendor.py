"""The llama.cpp sources alphaq-gguf targets: the copy vendored in llama-cpp-python's sdist.

llama-cpp-python==0.3.36 pins the llama.cpp whose runtime we load and whose converter, gguf-py and
quantiser we reuse. Its wheel ships only the shared libraries, so the converter
(``convert_hf_to_gguf.py`` + ``conversion/`` + ``gguf-py/``) is unpacked from the sdist, which pip
fetches from PyPI, into a cache directory. Nothing from it is committed to this repository.

    python -m convert.vendor          # fetch + unpack once (idempotent); prints the path
"""

from __future__ import annotations

import functools
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
# llama.cpp's AMX kernels (ggml-cpu/amx), which -march=native compiles in on Intel CPUs with AMX
# (Sapphire Rapids and later), crash in ggml_backend_amx_mul_mat on the first forward pass over a
# quantised model: seen 2026-12-06 on this project's 2-core Xeon with AMX, every quantised model of
# tests/test_weights.py (ggml-org/llama.cpp#20824, closed as stale without a fix). Every llama.cpp
# that alphaq builds for running models (llama-cpp-python in scripts/setup.sh, the patched wheel)
# leaves them out with these flags; the AVX-512 kernels run instead. Explicit -mno-* flags win over
# -march=native whatever their order (GCC and clang), so CFLAGS/CXXFLAGS carry them.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
AMX_SYMBOL = "ggml_backend_amx_mul_mat"  # in libggml-cpu only when the AMX kernels were compiled in

log = logging.getLogger(__name__)


def default_cache_root() -> Path:
    return Path.home() / ".cache" / "alphaq"


def vendor_dir(cache_root: Path | None = None) -> Path:
    return (cache_root or default_cache_root()) / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def no_amx_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with NO_AMX_FLAGS added to CFLAGS and CXXFLAGS on x86-64
    (other CPUs have no AMX, and their compilers no such flags)."""
    import os
    import platform

    env = dict(os.environ if env is None else env)
    if platform.machine().lower() in ("x86_64", "amd64"):
        for var in ("CFLAGS", "CXXFLAGS"):
            env[var] = f"{env.get(var, '')} {NO_AMX_FLAGS}".strip()
    return env


def has_amx_kernels(lib_dir: Path) -> bool:
    """Whether the llama.cpp libraries in ``lib_dir`` hold the AMX kernels (NO_AMX_FLAGS)."""
    return any(AMX_SYMBOL.encode() in p.read_bytes() for p in lib_dir.glob("libggml-cpu*.so*") if p.is_file())


@functools.cache
def warn_if_amx() -> None:
    """amx_warning's line as a WARNING, once a process (the CLI and the Python front door say it
    before llama.cpp can crash without a word)."""
    if (warning := amx_warning()) is not None:
        logging.getLogger("alphaq").warning(warning)


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


def installed_lib_dir() -> Path | None:
    """The installed llama-cpp-python's library directory (found without loading it)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "lib"


def amx_warning(cpuinfo: Path = Path("/proc/cpuinfo"), lib_dir: Path | None = None) -> str | None:
    """One line when this CPU has AMX and the installed llama.cpp holds the AMX kernels (as a
    plain `pip install` of llama-cpp-python builds it there), else None."""
    try:
        if " amx_int8" not in cpuinfo.read_text():
            return None
    except OSError:
        return None
    lib_dir = lib_dir or installed_lib_dir()
    if lib_dir is None or not has_amx_kernels(lib_dir):
        return None
    return ("the installed llama-cpp-python holds llama.cpp's AMX kernels, which crash on this CPU when it runs a "
            "quantised model (ggml-org/llama.cpp#20824); rebuild it without them (make setup does): "
            f'CFLAGS="{NO_AMX_FLAGS}" CXXFLAGS="{NO_AMX_FLAGS}" pip install --force-reinstall --no-cache-dir '
            f"--no-deps llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--installed-has-amx"]:  # exit status 0: it has them (scripts/setup.sh)
        lib = installed_lib_dir()
        sys.exit(0 if lib is not None and has_amx_kernels(lib) else 1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_vendor())
