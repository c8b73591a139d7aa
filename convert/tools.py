"""llama.cpp's own command-line tools, built from the sources llama-cpp-python 0.3.36 vendors.

Only for the tests that check a file this project writes against the real tool (the importance
matrix against ``llama-quantize --imatrix``). Built once with cmake (about 6 minutes on 2 cores,
CPU only) into ``~/.cache/alphaq/tools/llama.cpp-<version>/``; ``ALPHAQ_LLAMA_QUANTIZE`` names an
existing binary instead.

    python -m convert.tools           # build (idempotent); prints the llama-quantize path
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


def llama_quantize(cache_root: Path | None = None) -> Path:
    """Path of a ``llama-quantize`` binary built from the vendored llama.cpp (built if missing)."""
    given = os.environ.get("ALPHAQ_LLAMA_QUANTIZE")
    if given:
        if not Path(given).is_file():
            raise AlphaQError(f"ALPHAQ_LLAMA_QUANTIZE={given} is not a file")
        return Path(given)
    out = tools_dir(cache_root) / "llama-quantize"
    if out.is_file():
        return out
    if shutil.which("cmake") is None:
        raise AlphaQError("building llama-quantize needs cmake (apt-get install cmake)")
    sdist = fetch_sdist(cache_root)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = Path(tmp) / "build"
        cmake = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
        for cmd in (cmake, ["cmake", "--build", str(build), "--target", "llama-quantize", "-j", str(os.cpu_count() or 2)]):
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise AlphaQError(f"building llama-quantize failed: {res.stderr.strip()[-500:]}")
        tmp_bin = out.with_suffix(".tmp")
        shutil.copy2(build / "bin" / "llama-quantize", tmp_bin)
        os.replace(tmp_bin, out)
    return out


def main() -> int:
    print(llama_quantize())
    return 0


if __name__ == "__main__":
    sys.exit(main())
