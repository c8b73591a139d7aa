#!/usr/bin/env bash
# The GPU checks of issue 19, in one call of a lent CUDA machine (no network there).
#
#   bash scripts/gpu_check.sh prepare   # here, with network: fills .gpu/ (git-ignored, ~21 MB)
#   bash scripts/gpu_check.sh run       # there, from the repository root, .gpu carried; results in $OUT
#
# prepare: the llama-cpp-python sdist trimmed to what a CUDA build reads (no models, docs, tests,
#   other backends; 4 MB instead of 77), the same with ggml-patches/ applied and the version tagged
#   (for a machine without git), and the wheels the GPU image lacks (gguf, diskcache, transformers
#   at this project's pins).
# run, against a deadline (DEADLINE_S, default 570 s after the start), most important first:
#   while the patched llama.cpp builds with CUDA for sm_90 only (python -m convert.patched --cuda;
#     flash-attention kernels off to halve the build; 232 s on 16 cores) on all cores:
#     scripts/bench_gpu.py bandwidth, and a random-weight model with Qwen3-30B-A3B's block shapes
#     (2 blocks) for the speed run;
#   then, with the CUDA build: the masked mul_mat_id op test on CUDA0 (and CPU), expert-granular
#     files' logits on CUDA against the CPU, the Triton kernel tests on the GPU (TRITON_INTERPRET=0),
#     the torch kernel path on CUDA (against the plain path and, greedy, against llama.cpp on
#     CUDA), and scripts/bench_gpu.py runtime.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CUDA_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DLLAVA_BUILD=OFF"

prepare() {
    set -e
    local sdist; sdist=$(python -c "from convert.vendor import fetch_sdist; print(fetch_sdist())")
    local tmp; tmp=$(mktemp -d)
    tar xzf "$sdist" -C "$tmp"
    local src=$tmp/llama_cpp_python-0.3.36 ll=$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp
    rm -rf "$src"/{docs,examples,docker,tests,.git,.github} \
           "$ll"/{models,docs,tests,benches,examples,pocs,tools,app,scripts,media,.github,.devops}
    (cd "$ll/ggml/src" && rm -rf ggml-{opencl,sycl,vulkan,metal,hexagon,et,cann,openvino,virtgpu,webgpu,zdnn,zendnn})
    mkdir -p .gpu/sdist .gpu/whl
    tar czf .gpu/sdist/llama_cpp_python-0.3.36.tar.gz -C "$tmp" llama_cpp_python-0.3.36
    CMAKE_ARGS="$CUDA_CMAKE_ARGS" python - <<'EOF'
import tarfile, tempfile
from pathlib import Path
from convert import patched
key = patched.build_key(patched.cmake_args(True))
with tempfile.TemporaryDirectory() as tmp:
    with tarfile.open(".gpu/sdist/llama_cpp_python-0.3.36.tar.gz") as t:
        t.extractall(tmp, filter="data")
    src = Path(tmp) / "llama_cpp_python-0.3.36"
    patched.apply_series(src)
    patched._set_version(src, key)
    with tarfile.open(".gpu/prepatched.tar.gz", "w:gz") as t:
        t.add(src, arcname=src.name)
EOF
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .gpu/whl \
        transformers==5.24.0 gguf==0.19.0 diskcache==5.6.3
    rm -rf "$tmp"
    du -sh .gpu
}

START=$(date +%s)
DEADLINE=$((START + ${DEADLINE_S:-570}))

# step NAME LIMIT CMD...: run CMD under min(LIMIT, time to the deadline), log its exit status
step() {
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - $(date +%s) - 5))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then echo "=== $name: SKIPPED (deadline)"; echo "$name skipped" >>"$OUT/steps.txt"; return 1; fi
    echo "=== $name (limit ${limit}s, t=$(($(date +%s) - START))s)"
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name rc=$rc (t=$(($(date +%s) - START))s)"
    echo "$name $rc $(($(date +%s) - START))" >>"$OUT/steps.txt"
    return $rc
}

build_cuda() {  # writes the site holding the CUDA llama_cpp to $OUT/site.txt
    export CMAKE_ARGS="$CUDA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
    # without llama.cpp's AMX kernels, which crash on CPUs with AMX (convert/vendor.py NO_AMX_FLAGS;
    # convert.patched adds them itself, the CMake route below takes them from here)
    local no_amx; no_amx=$(sed -n 's/^NO_AMX_FLAGS = "\(.*\)"$/\1/p' convert/vendor.py)
    export CFLAGS="${CFLAGS:-} $no_amx" CXXFLAGS="${CXXFLAGS:-} $no_amx"
    if command -v git >/dev/null; then  # the user's route; convert.patched applies the series with git apply
        mkdir -p ~/.cache/alphaq/sdist && cp .gpu/sdist/*.tar.gz ~/.cache/alphaq/sdist/
        python3 -m convert.patched --cuda --no-build-isolation --site | tail -1 >"$OUT/site.txt"
        [ -d "$(cat "$OUT/site.txt")/llama_cpp" ] && return 0
        cp ~/.cache/alphaq/patched/*.build.log "$OUT/build.log" 2>/dev/null
    fi
    # no git, or pip could not build: CMake directly on the pre-patched source (what the wheel holds)
    echo "building .gpu/prepatched.tar.gz with CMake"
    local src=/tmp/prepatched/llama_cpp_python-0.3.36 site=/tmp/cmake-site
    mkdir -p /tmp/prepatched && tar xzf .gpu/prepatched.tar.gz -C /tmp/prepatched
    # shellcheck disable=SC2086
    cmake -S $src -B /tmp/cmake-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=on $CUDA_CMAKE_ARGS \
        -DCMAKE_INSTALL_PREFIX=$site -DSKBUILD_PLATLIB_DIR=$site >/tmp/cmake.log 2>&1 &&
        cmake --build /tmp/cmake-build >>/tmp/cmake.log 2>&1 && cmake --install /tmp/cmake-build >>/tmp/cmake.log 2>&1 &&
        cp -rn $src/llama_cpp/. $site/llama_cpp/ && echo $site >"$OUT/site.txt"
    tail -c 30000 /tmp/cmake.log >"$OUT/cmake.log"
}
export -f build_cuda

run() {
    export OUT=${OUT:-/tmp/gpu-out} CUDA_CMAKE_ARGS
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/log.txt") 2>&1
    export PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1
    { nvidia-smi; nvcc --version; git --version; cmake --version; python3 -m pip show scikit-build-core; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; nproc; } >"$OUT/env.txt" 2>&1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site

    if [ -n "${GPU_CHECK_SITE:-}" ]; then  # an existing build (a rerun, or a smoke test of this script)
        echo "$GPU_CHECK_SITE" >"$OUT/site.txt"; ( true ) &
    else
        ( step build 420 bash -c build_cuda ) &
    fi
    local build_pid=$!
    ( step bandwidth 150 python3 scripts/bench_gpu.py bandwidth --json "$OUT/gpu-bandwidth.json"
      step random-model 120 python3 scripts/make_large_random_moe.py /tmp/qwen3-2blk --arch qwen3moe --layers 2
    ) >"$OUT/gpu-parallel.log" 2>&1 &
    local gpu_pid=$!
    wait $build_pid
    local site; site=$(tail -1 "$OUT/site.txt" 2>/dev/null)
    if [ ! -d "$site/llama_cpp" ]; then
        echo "CUDA build failed: site.txt = '$site'"
        tail -c 20000 ~/.cache/alphaq/patched/*.build.log >"$OUT/build.log" 2>/dev/null
        wait $gpu_pid; return 1
    fi
    ls "$site/llama_cpp/lib"
    export ALPHAQ_PATCHED_SITE=$site PYTHONPATH=$site:/tmp/site
    # the crash of 2026-12-04 (bench/GPU.md): loading a model with numpy imported first, then llama_cpp first
    local load="l = llama_cpp.Llama('/tmp/order.gguf', n_gpu_layers=-1, verbose=False)"
    step order-model 60 python3 -c "from pathlib import Path; from convert.hf_to_gguf import convert_hf
convert_hf(Path('tests/fixtures/mixtral'), Path('/tmp/order.gguf'))"
    step numpy-first 30 python3 -c "import numpy, llama_cpp; $load"
    step llama-first 30 python3 -c "import llama_cpp, numpy; $load"
    step op-cuda 120 python3 -m pytest -q -p no:cacheprovider tests/test_patched_runtime.py -k masked_mul_mat_id -rs
    step logits-cuda 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_patched_runtime.py -k cuda_match
    wait $gpu_pid
    # after the build: the kernel tests quantise their weights with llama.cpp's quantiser
    step triton-tests 180 env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -rs
    step torch-run-cuda 200 env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_torch_run.py \
        -k "kernel_path or on_cuda" -rs
    step bench-runtime 240 python3 scripts/bench_gpu.py runtime /tmp/qwen3-2blk --work /tmp/qwen3-work \
        --budget 2.5 --json "$OUT/gpu-runtime.json"
    cat "$OUT/steps.txt"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
