"""The patched runtime: llama-cpp-python 0.3.36 with ggml-patches/ applied, built as a wheel.

Expert-granular GGUF files (docs/FORMAT.md) need a llama.cpp that reads type groups and runs
masked mul_mat_id. This module applies the numbered patch series in ggml-patches/ to the
llama.cpp vendored in the llama-cpp-python sdist and builds a wheel, cached under
~/.cache/alphaq/patched/<key>/ where <key> hashes the sdist version, the patch series and the
build flags, so a changed patch always rebuilds and an unchanged one never does.

    python -m convert.patched                 # build (or reuse) the CPU wheel, print its path
    python -m convert.patched --install       # ... and pip install it into this environment
    python -m convert.patched --cuda          # CUDA build (-DGGML_CUDA=on; needs nvcc)
    CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" python -m convert.patched --cuda --no-build-isolation --site
                                              # extra CMake flags as llama-cpp-python takes them;
                                              # an offline machine builds with its own
                                              # scikit-build-core; print the private site
    python -m convert.patched --cuda-compile-check [--arch 90]
                                              # nvcc-compile just the CUDA files the series
                                              # touches (minutes, not the hours of a full build)

The wheel's version is 0.3.36+alphaq.<key>, so `pip show llama-cpp-python` tells which runtime is
installed. It runs stock files exactly like the stock wheel does.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from alphaq.errors import AlphaQError
from convert.vendor import LLAMA_CPP_PYTHON_VERSION, NO_AMX_FLAGS, default_cache_root, fetch_sdist, no_amx_env

# Where the patch series is: inside the installed package (a wheel carries it as package data,
# see setup.py), else at the top of the checkout this module runs from (source tree, editable).
PATCH_DIRS = (Path(__file__).resolve().parent / "ggml-patches", Path(__file__).resolve().parent.parent / "ggml-patches")
CUDA_ARGS = "-DGGML_CUDA=on"

log = logging.getLogger(__name__)


def patch_dir() -> Path:
    """The directory holding the ggml-patches series this installation carries."""
    for d in PATCH_DIRS:
        if any(d.glob("*.patch")):
            return d
    raise AlphaQError(f"no ggml-patches series found (looked in {', '.join(map(str, PATCH_DIRS))}); "
                      "reinstall alphaq from a complete source tree")


def patch_files() -> list[Path]:
    """The patch series, in the order it applies."""
    return sorted(patch_dir().glob("*.patch"))


def build_key(cmake_args: str = "") -> str:
    """Hash of everything the wheel depends on: sdist version, patch series, build flags."""
    h = hashlib.sha256(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}\n{cmake_args}\n{NO_AMX_FLAGS}\n".encode())
    for p in patch_files():
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def build_dir(cmake_args: str = "", cache_root: Path | None = None) -> Path:
    return (cache_root or default_cache_root()) / "patched" / build_key(cmake_args)


def apply_series(src: Path) -> None:
    """Apply the ggml-patches series (patch_files()), in order, to src/vendor/llama.cpp."""
    llama = src / "vendor" / "llama.cpp"
    # The sdist ships its own .git (and a submodule pointer in vendor/llama.cpp). Inside a git
    # work tree, `git apply` silently *skips* files outside the current directory, so both go:
    # the patches must apply to plain files.
    (llama / ".git").unlink(missing_ok=True)
    shutil.rmtree(src / ".git", ignore_errors=True)
    for p in patch_files():
        proc = subprocess.run(["git", "apply", "--verbose", "--whitespace=nowarn", str(p)], cwd=llama,
                              capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or "Skipped patch" in out:
            raise AlphaQError(f"{p.name} does not apply to llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}: "
                              + (out.strip().splitlines() or ["no output"])[-1])


def _set_version(src: Path, key: str) -> None:
    init = src / "llama_cpp" / "__init__.py"
    text = init.read_text()
    old = f'__version__ = "{LLAMA_CPP_PYTHON_VERSION}"'
    if old not in text:
        raise AlphaQError(f"{init}: no {old} line to tag")
    init.write_text(text.replace(old, f'__version__ = "{LLAMA_CPP_PYTHON_VERSION}+alphaq.{key}"'))


def cmake_args(cuda: bool) -> str:
    """The build's CMake flags: CUDA's, then the user's CMAKE_ARGS (llama-cpp-python's own way to
    pass flags, e.g. -DCMAKE_CUDA_ARCHITECTURES=90), so a build differing in either is its own wheel."""
    return " ".join(a for a in (CUDA_ARGS if cuda else "", os.environ.get("CMAKE_ARGS", "").strip()) if a)


def ensure_wheel(cuda: bool = False, cache_root: Path | None = None, build_isolation: bool = True) -> Path:
    """The patched wheel, built once per (sdist, patch series, flags). ``build_isolation=False``
    builds with this environment's scikit-build-core (pip's --no-build-isolation; for machines
    without access to PyPI)."""
    flags = cmake_args(cuda)
    out = build_dir(flags, cache_root)
    wheels = sorted(out.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[0]
    key = build_key(flags)
    sdist = fetch_sdist(cache_root)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_path = Path(tmp)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp_path, filter="data")
        src = tmp_path / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
        apply_series(src)
        _set_version(src, key)
        staging = tmp_path / "wheel"
        env = {**no_amx_env(), "CMAKE_ARGS": flags}
        log.info("building the patched llama-cpp-python wheel (%s); this takes minutes", flags or "CPU")
        isolation = [] if build_isolation else ["--no-build-isolation"]
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, str(src),
                               "-w", str(staging)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            (out.parent / f"{key}.build.log").write_text(proc.stdout + proc.stderr)
            raise AlphaQError(f"building the patched wheel failed; log: {out.parent / f'{key}.build.log'}")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)  # atomic: a half-built wheel never looks cached
    return sorted(out.glob("llama_cpp_python-*.whl"))[0]


def ensure_site(cuda: bool = False, cache_root: Path | None = None, build_isolation: bool = True) -> Path:
    """A private site-packages holding only the patched llama_cpp (for side-by-side use with the
    stock one: put it first on PYTHONPATH in a subprocess)."""
    wheel = ensure_wheel(cuda, cache_root, build_isolation)
    site = wheel.parent / "site"
    if (site / "llama_cpp").is_dir():
        return site
    tmp = Path(tempfile.mkdtemp(dir=wheel.parent))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
                    str(wheel)], check=True)
    tmp.rename(site)
    return site


def patched_site() -> Path:
    """The patched llama_cpp's site: $ALPHAQ_PATCHED_SITE when set (e.g. an installed build), else
    `ensure_site()` (the cached CPU wheel, built on first use)."""
    override = os.environ.get("ALPHAQ_PATCHED_SITE")
    if override:
        if not (Path(override) / "llama_cpp").is_dir():
            raise AlphaQError(f"ALPHAQ_PATCHED_SITE={override} holds no llama_cpp package")
        return Path(override)
    return ensure_site()


def has_cuda(site: Path) -> bool:
    """Whether the llama_cpp in ``site`` (ensure_site, ALPHAQ_PATCHED_SITE) was built with CUDA."""
    return any((site / "llama_cpp" / "lib").glob("libggml-cuda*"))


def _cublas_include(cache_root: Path | None = None) -> Path:
    """cublas_v2.h: from the CUDA toolkit if it has it, else from the nvidia-cublas-cu12 wheel."""
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cublas_v2.h").exists():
            return Path(root) / "include"
    dest = (cache_root or default_cache_root()) / "cuda-headers"
    if not (dest / "nvidia" / "cublas" / "include" / "cublas_v2.h").exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "nvidia-cublas-cu12",
                            "-d", tmp], check=True)
            import zipfile

            with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as whl:
                whl.extractall(dest, [m for m in whl.namelist() if m.startswith("nvidia/cublas/include/")])
    return dest / "nvidia" / "cublas" / "include"


def cuda_compile_check(arch: str = "90", cache_root: Path | None = None) -> list[tuple[str, bool, str]]:
    """Compile every CUDA source the series changes, patched, with nvcc: (file, ok, log tail)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise AlphaQError("nvcc not found: install a CUDA toolkit or `pip install nvidia-cuda-nvcc-cu12`")
    touched = sorted({line[len("+++ b/"):].strip() for p in patch_files() for line in p.read_text().splitlines()
                      if line.startswith("+++ b/ggml/src/ggml-cuda/") and line.rstrip().endswith(".cu")})
    cublas = _cublas_include(cache_root)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fetch_sdist(cache_root)) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
        apply_series(src)
        llama = src / "vendor" / "llama.cpp"
        for rel in touched:
            log.info("nvcc %s (sm_%s)", rel, arch)
            proc = subprocess.run(
                [nvcc, "-std=c++17", f"-arch=sm_{arch}", "-O1", "-c", rel, "-o", str(Path(tmp) / "out.o"),
                 "-Iggml/include", "-Iggml/src", "-Iggml/src/ggml-cuda", f"-I{cublas}"],
                cwd=llama, capture_output=True, text=True)
            results.append((rel, proc.returncode == 0, (proc.stdout + proc.stderr).strip()[-2000:]))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda", action="store_true", help="build with -DGGML_CUDA=on (needs nvcc)")
    ap.add_argument("--install", action="store_true", help="pip install the wheel into this environment")
    ap.add_argument("--site", action="store_true",
                    help="print the private site holding the patched llama_cpp (ALPHAQ_PATCHED_SITE), not the wheel")
    ap.add_argument("--no-build-isolation", dest="build_isolation", action="store_false",
                    help="build with this environment's scikit-build-core (pip's flag; for offline machines)")
    ap.add_argument("--cuda-compile-check", action="store_true",
                    help="compile only the CUDA sources the series changes, with nvcc")
    ap.add_argument("--arch", default="90", help="CUDA arch for --cuda-compile-check (default: %(default)s)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cuda_compile_check:
        try:
            results = cuda_compile_check(args.arch)
        except AlphaQError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for rel, ok, tail in results:
            print(f"{'ok  ' if ok else 'FAIL'} {rel}" + ("" if ok else "\n" + tail))
        return 0 if all(ok for _, ok, _ in results) else 1
    try:
        wheel = ensure_wheel(args.cuda, build_isolation=args.build_isolation)
        site = ensure_site(args.cuda, build_isolation=args.build_isolation) if args.site else None
    except AlphaQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.install:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)],
                       check=True)
    print(site or wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
