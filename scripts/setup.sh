#!/usr/bin/env bash
# Idempotent set-up of everything alphaq-gguf needs, into a project-local virtualenv (.venv).
#   * Debian packages: python3.11-doc (the prose corpus), cmake (llama-quantize for the tests)
#   * .venv with the package (editable), its test extras and triton (for the kernel tests in
#     interpreter mode); torch is pinned to the CPU wheel
#     on disk, llama-cpp-python==0.3.36 builds from source once (~6 min) and pip's wheel cache
#     makes every later install instant
#   * the llama.cpp sources that llama-cpp-python vendors (converter, gguf-py) unpacked to
#     ~/.cache/alphaq (see convert/vendor.py); that gguf-py is installed into .venv
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
STAMP=.venv/.alphaq-setup

need_apt=()
dpkg -s python3.11-doc >/dev/null 2>&1 || need_apt+=(python3.11-doc)
# cmake builds llama.cpp's llama-quantize and llama-gguf-split for the tests (convert/tools.py)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
if ((${#need_apt[@]})); then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian packages: ${need_apt[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "setup: please install Debian packages: ${need_apt[*]} (sudo apt-get install ...)" >&2
    fi
fi

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: Python >= 3.11 required, found $("$PY" --version)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv

# llama.cpp's AMX kernels crash on Intel CPUs with AMX (convert/vendor.py, NO_AMX_FLAGS): the
# llama-cpp-python built here leaves them out (the flags read from that file: no .venv to import it yet)
no_amx=$(sed -n 's/^NO_AMX_FLAGS = "\(.*\)"$/\1/p' convert/vendor.py)
if [ -n "$no_amx" ] && case "$(uname -m)" in x86_64|amd64) true;; *) false;; esac; then
    export CFLAGS="${CFLAGS:-} $no_amx" CXXFLAGS="${CXXFLAGS:-} $no_amx"
fi

# Reinstall only when the dependency list changed.
want=$(sha1sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    echo "setup: installing alphaq and its dependencies into .venv (first time: builds llama-cpp-python, ~6 min)"
    # the gpu extra (triton) lets the Triton kernel tests run in interpreter mode on the CPU;
    # without it they skip, so a machine without the wheel still sets up
    .venv/bin/python -m pip install --quiet -e ".[test,gpu]" || {
        echo "setup: triton unavailable; kernel tests will skip" >&2
        .venv/bin/python -m pip install --quiet -e ".[test]"; }
    echo "$want" > "$STAMP"
fi

# a llama-cpp-python built before (or taken from pip's wheel cache) with the AMX kernels is rebuilt,
# and the cached wheel replaced, so that the next .venv takes the rebuilt one
if .venv/bin/python -m convert.vendor --installed-has-amx; then
    echo "setup: rebuilding llama-cpp-python without llama.cpp's AMX kernels, which crash on this CPU (~6 min)"
    .venv/bin/python -m pip cache remove llama_cpp_python >/dev/null 2>&1 || true
    .venv/bin/python -m pip install --quiet --force-reinstall --no-deps \
        "llama-cpp-python==$(.venv/bin/python -c 'from convert.vendor import LLAMA_CPP_PYTHON_VERSION as v; print(v)')"
fi

vendor=$(.venv/bin/python -m convert.vendor)
# alphaq names GGUF tensors and types with the gguf-py this llama.cpp ships, as its converter does.
# PyPI's gguf 0.19.0 has the same version string but predates that copy (no Cohere2-MoE, no
# DeepSeek-V3.2, no Q2_0), so the copy replaces it whenever they differ
installed=$(.venv/bin/python -c 'import gguf.constants as c; print(c.__file__)')
if ! cmp -s "$vendor/gguf-py/gguf/constants.py" "$installed"; then
    echo "setup: installing the gguf-py of llama.cpp ($vendor/gguf-py)"
    .venv/bin/python -m pip install --quiet --no-deps --force-reinstall "$vendor/gguf-py"
fi
echo "setup: ready (.venv)"
