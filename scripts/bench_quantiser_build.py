#!/usr/bin/env python3
"""llama.cpp's quantisers built for this CPU against the build llama-cpp-python ships: same bytes?
how much faster?

    python scripts/bench_quantiser_build.py [--rounds 5] [--out bench/quantiser-build.json]

Why: the default's quantise stage is the largest part of a conversion at real shapes (README,
"Conversion"). ggml's quantisers (ggml-quants.c) live in libggml-base, which llama.cpp's CMake
compiles without any instruction-set flag (only the ggml-cpu backend gets -march=native), so they
run as baseline x86-64 code. This builds libggml-base twice from the vendored llama.cpp of the
cached llama-cpp-python sdist: as shipped (Release) and with ``-march=native -ffp-contract=off``
(vector instructions; no fused multiply-add contraction, which would change the rounding and so
the bytes). Both quantise the same heavy-tailed 256 x 2048 matrix with one importance vector, one
thread, every type of the damage ladder, in alternating rounds (separate processes), and the
outputs are compared byte for byte.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SDIST = Path.home() / ".cache" / "alphaq" / "sdist" / "llama_cpp_python-0.3.36.tar.gz"
BUILDS = {"shipped": "", "native": "-march=native -ffp-contract=off"}
TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K",
         "Q6_K")

# one process: every type once on the same matrix; prints JSON {type: [ns per weight, sha1]}
_TIMER = r"""
import ctypes, hashlib, json, sys, time
import numpy as np
from gguf import GGMLQuantizationType as T
lib = ctypes.CDLL(sys.argv[1])
lib.ggml_quantize_chunk.restype = ctypes.c_size_t
lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_void_p]
lib.ggml_quantize_init.argtypes = [ctypes.c_int]
lib.ggml_row_size.restype = ctypes.c_size_t
lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
rng = np.random.default_rng(0)
rows, cols = 256, 2048
w = (rng.standard_t(5, size=(rows, cols)) * 0.02).astype(np.float32)
imatrix = rng.gamma(2.0, 1.0, size=cols).astype(np.float32)
out = {}
for name in sys.argv[2:]:
    t = int(T[name])
    lib.ggml_quantize_init(t)
    dst = np.zeros(lib.ggml_row_size(t, cols) * rows, np.uint8)
    t0 = time.perf_counter()
    lib.ggml_quantize_chunk(t, w.ctypes.data, dst.ctypes.data, 0, rows, cols, imatrix.ctypes.data)
    out[name] = [(time.perf_counter() - t0) / (rows * cols) * 1e9, hashlib.sha1(dst.tobytes()).hexdigest()]
print(json.dumps(out))
"""


def build(src: Path, flags: str, where: Path) -> Path:
    """libggml-base.so of the vendored llama.cpp at ``src``, compiled with C/C++ ``flags``."""
    common = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF",
              f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]
    subprocess.run(["cmake", "-S", str(src), "-B", str(where), *common], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(where), "--target", "ggml-base", "-j2"], check=True, capture_output=True)
    return where / "bin" / "libggml-base.so"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (one process per build each)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "quantiser-build.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(SDIST) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        libs = {name: build(src, flags, Path(tmp) / f"build-{name}") for name, flags in BUILDS.items()}
        runs: dict[str, list[dict]] = {name: [] for name in libs}
        for _ in range(args.rounds):
            for name, lib in libs.items():
                done = subprocess.run([sys.executable, "-c", _TIMER, str(lib), *TYPES], check=True,
                                      capture_output=True, text=True)
                runs[name].append(json.loads(done.stdout))
    rows = {}
    for t in TYPES:
        best = {name: min(r[t][0] for r in rs) for name, rs in runs.items()}
        same = len({r[t][1] for rs in runs.values() for r in rs}) == 1
        rows[t] = {"shipped_ns": best["shipped"], "native_ns": best["native"],
                   "native/shipped": best["native"] / best["shipped"], "same_bytes": same}
        print(f"| {t} | {best['shipped']:.1f} | {best['native']:.1f} | {best['native'] / best['shipped']:.3f} | "
              f"{'yes' if same else 'NO'} |")
    args.out.write_text(json.dumps({"builds": BUILDS, "rounds": args.rounds, "shape": [256, 2048], "threads": 1,
                                    "types": rows}, indent=1) + "\n")
    return 0 if all(r["same_bytes"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
