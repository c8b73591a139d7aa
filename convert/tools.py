"""llama.cpp's own command-line tools, built from the sources llama-cpp-python 0.3.36 vendors.

Only for the tests that check a file this project writes against the real tool (the importance
matrix against ``llama-quantize --imatrix``, split output against ``llama-gguf-split``). Built once
with cmake (about 6 minutes on 2 cores, CPU only) into ``~/.cache/alphaq/tools/llama.cpp-<version>/``;
``ALPHAQ_LLAMA_QUANTIZE`` / ``ALPHAQ_LLAMA_GGUF_SPLIT`` name existing binaries instead.

    python -m convert.tools           # build (idempotent); prints the tools' paths
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from alphaq.errors import AlphaQError
from convert.vendor import LLAMA_CPP_PYTHON_VERSION, default_cache_root, fetch_sdist


def tools_dir(cache_root: Path | None = None) -> Path:
    return (cache_root or default_cache_root()) / "tools" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


# the tools the tests check files against; built together (one cmake configure, shared libraries)
TOOLS = {"llama-quantize": "ALPHAQ_LLAMA_QUANTIZE", "llama-gguf-split": "ALPHAQ_LLAMA_GGUF_SPLIT"}


def llama_quantize(cache_root: Path | None = None) -> Path:
    """Path of a ``llama-quantize`` binary built from the vendored llama.cpp (built if missing)."""
    return llama_tool("llama-quantize", cache_root)


def llama_gguf_split(cache_root: Path | None = None) -> Path:
    """Path of a ``llama-gguf-split`` binary built from the vendored llama.cpp (built if missing)."""
    return llama_tool("llama-gguf-split", cache_root)


def llama_tool(name: str, cache_root: Path | None = None) -> Path:
    """Path of llama.cpp's tool ``name`` (a key of TOOLS): $ALPHAQ_LLAMA_... when set, else the
    cached build; a missing one is built together with every other missing tool."""
    given = os.environ.get(TOOLS[name])
    if given:
        if not Path(given).is_file():
            raise AlphaQError(f"{TOOLS[name]}={given} is not a file")
        return Path(given)
    out = tools_dir(cache_root) / name
    if not out.is_file():
        _build([t for t in TOOLS if not (tools_dir(cache_root) / t).is_file()], cache_root)
    return out


def _build(targets: list[str], cache_root: Path | None) -> None:
    if shutil.which("cmake") is None:
        raise AlphaQError(f"building {', '.join(targets)} needs cmake (apt-get install cmake)")
    sdist = fetch_sdist(cache_root)
    out_dir = tools_dir(cache_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = Path(tmp) / "build"
        cmake = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
        for cmd in (cmake, ["cmake", "--build", str(build), "--target", *targets, "-j", str(os.cpu_count() or 2)]):
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise AlphaQError(f"building {', '.join(targets)} failed: {res.stderr.strip()[-500:]}")
        for target in targets:
            tmp_bin = out_dir / f"{target}.tmp"
            shutil.copy2(build / "bin" / target, tmp_bin)
            os.replace(tmp_bin, out_dir / target)


def main() -> int:
    for name in TOOLS:
        print(llama_tool(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
