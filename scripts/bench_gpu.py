#!/usr/bin/env python3
"""GPU benchmarks (a CUDA machine only; every figure names the GPU it was measured on).

    python scripts/bench_gpu.py bandwidth --json OUT.json
        The GPU's copy bandwidth (a device-to-device copy, bytes read + written), then the Triton
        decode GEMV (alphaq/runtime/kernels/matmul.gemv, one token) on every quantised type the
        kernels read, as achieved bandwidth (weight bytes + x + out over the median time) and as a
        percentage of that copy bandwidth. Weights are random bytes (the kernels' time does not
        depend on the values) of about 512 MB per type, several times the L2 cache.

    python scripts/bench_gpu.py runtime MODEL_DIR --work DIR --json OUT.json [--budget 3]
        MODEL_DIR is an HF checkpoint (scripts/make_large_random_moe.py for real shapes). It is
        converted twice with --fast: at expert granularity (--budget), then at tensor granularity
        to the expert file's size (--target-size). Where the expert file has no mixed-type
        projection (random weights can give all experts of a tensor one type), the expert file
        is the tensor file with every expert tensor split into 2 groups of its own type (same
        bytes: what the groups alone cost). Then, on the GPU:
        * llama.cpp (the patched build of this environment, every layer offloaded): prefill and
          decode tok/s of both files loaded in one process, timed in alternating rounds
          (alphaq.runtime.isolated.interleaved_speed); the expert/tensor ratio per round;
        * `alphaq run` (torch + the Triton kernels on the raw blocks): prefill and decode tok/s on
          the expert file;
        * torch on the BF16 weights (the same HF model in bfloat16, no kernels): the same.
        The torch figures come from alphaq.runtime.torch_run.generate (greedy, KV cache), timed
        with the GPU synchronised: prefill = one prompt pass, decode = the following steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    import torch
    from triton.testing import do_bench

    src = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    return 2 * n_bytes / (ms * 1e-3)


def gemv_row(qtype, copy_bps: float, n_cols: int = 8192, weight_bytes: int = 512 << 20) -> dict:
    import torch
    from triton.testing import do_bench

    from alphaq.runtime.kernels import layouts, matmul

    row = layouts.row_bytes(qtype, n_cols)
    n_rows = max(16, weight_bytes // row // 16 * 16)
    data = torch.randint(0, 256, (n_rows, row), dtype=torch.uint8, device="cuda")
    x = torch.randn(n_cols, dtype=torch.bfloat16, device="cuda")
    matmul.gemv(x, data, qtype)  # compile outside the timing
    ms = do_bench(lambda: matmul.gemv(x, data, qtype), warmup=100, rep=500, return_mode="median")
    moved = data.numel() + 2 * n_cols + 2 * n_rows
    bps = moved / (ms * 1e-3)
    return {"type": qtype.name, "rows": n_rows, "cols": n_cols, "weight_bytes": data.numel(), "ms": ms,
            "gb_per_s": bps / 1e9, "pct_of_copy": 100 * bps / copy_bps}


def bandwidth(args: argparse.Namespace) -> dict:
    from gguf import GGMLQuantizationType as Q

    from alphaq.runtime.kernels import layouts

    copy_bps = copy_bandwidth()
    print(f"{gpu_name()}: device-to-device copy {copy_bps / 1e9:.0f} GB/s", flush=True)
    rows = []
    for qtype in layouts.SUPPORTED_TYPES:
        if qtype in (Q.F32, Q.F16, Q.BF16):
            continue
        rows.append(gemv_row(qtype, copy_bps))
        r = rows[-1]
        print(f"  {r['type']:7s} {r['ms']:.3f} ms  {r['gb_per_s']:.0f} GB/s  {r['pct_of_copy']:.0f} % of copy", flush=True)
    return {"gpu": gpu_name(), "copy_gb_per_s": copy_bps / 1e9, "gemv": rows}


def convert(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "convert_alphaq.py"), *args, "--no-progress", "--force"], check=True)
    return time.perf_counter() - t0


def torch_speed(model, vocab_size: int, n_prompt: int, n_gen: int, rounds: int) -> dict:
    """Prefill and decode tok/s of torch_run.generate's two phases, GPU synchronised, median of rounds."""
    import torch

    from alphaq.runtime import torch_run

    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(10, vocab_size, n_prompt)]
    greedy = torch_run.Sampling(greedy=True)

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            torch_run.generate(model, prompt, n, greedy)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(2)  # warm-up: kernel compilation, allocator
    prefill, decode = [], []
    for _ in range(rounds):
        t1, tn = timed(1), timed(n_gen + 1)
        prefill.append(n_prompt / t1)
        decode.append(n_gen / (tn - t1))
    return {"prefill_tps": float(np.median(prefill)), "decode_tps": float(np.median(decode)),
            "prefill_rounds": prefill, "decode_rounds": decode}


def runtime_speed(args: argparse.Namespace) -> dict:
    import torch

    from alphaq.gguf.expert import read_layouts
    from alphaq.runtime import isolated, torch_run
    from convert.patched import patched_site

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    bf16, expert, tensor = work / "bf16.gguf", work / "expert.gguf", work / "tensor.gguf"
    secs = {"expert": convert([str(args.model), "--fast", "--budget", str(args.budget), "--granularity", "expert",
                               "-o", str(expert), "--keep-bf16", str(bf16)])}
    secs["tensor"] = convert([str(bf16), "--fast", "--target-size", f"{expert.stat().st_size}B", "-o", str(tensor)])
    sizes = {k: p.stat().st_size for k, p in (("expert", expert), ("tensor", tensor), ("bf16", bf16))}
    grouped = len(read_layouts(expert))
    if not grouped:  # random weights can give every expert of a tensor one type: split them instead
        from bench_expert import write_split

        expert, grouped = write_split(tensor, bf16, 2)
        sizes["expert"] = expert.stat().st_size
    print(f"converted in {secs}; sizes {sizes}; {grouped} grouped expert tensors ({expert.name})", flush=True)

    r = isolated.interleaved_speed(patched_site(), [tensor, expert], args.n_prompt, args.n_gen, args.rounds, 16, gpu_layers=-1)
    llama = {}
    for phase in ("prefill", "decode"):
        tps = np.array(r[phase])  # (file, round): tensor, expert
        llama[phase] = {"tensor_tps": float(np.median(tps[0])), "expert_tps": float(np.median(tps[1])),
                        "expert/tensor": float(np.median(tps[1] / tps[0])),
                        "expert/tensor_range": [float((tps[1] / tps[0]).min()), float((tps[1] / tps[0]).max())]}
    print(f"llama.cpp CUDA: {json.dumps(llama)}", flush=True)

    kernel = torch_run.load(expert, args.model, device="cuda", use_kernels=True, llama_cpp_routing=True)
    n_vocab = kernel.config.vocab_size
    ours = torch_speed(kernel, n_vocab, args.n_prompt, args.n_gen, args.torch_rounds)
    del kernel
    torch.cuda.empty_cache()
    dense = torch_run.load(bf16, args.model, device="cpu", use_kernels=False, llama_cpp_routing=True)
    dense = dense.to(dtype=torch.bfloat16, device="cuda")
    bf16_torch = torch_speed(dense, n_vocab, args.n_prompt, args.n_gen, args.torch_rounds)
    print(f"alphaq run (Triton): {ours['prefill_tps']:.0f} / {ours['decode_tps']:.1f} tok/s; "
          f"torch BF16: {bf16_torch['prefill_tps']:.0f} / {bf16_torch['decode_tps']:.1f}", flush=True)
    return {"gpu": gpu_name(), "model": str(args.model), "budget": args.budget, "convert_s": secs, "bytes": sizes,
            "grouped_tensors": grouped,
            "n_prompt": args.n_prompt, "n_gen": args.n_gen, "rounds": args.rounds, "llama_cpp_cuda": llama,
            "llama_cpp_version": r["version"], "alphaq_run_triton": ours, "torch_bf16": bf16_torch,
            "torch": torch.__version__, "triton": __import__("triton").__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bandwidth")
    b.add_argument("--json", type=Path, required=True)
    r = sub.add_parser("runtime")
    r.add_argument("model", type=Path)
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--json", type=Path, required=True)
    r.add_argument("--budget", type=float, default=3.0)
    r.add_argument("--n-prompt", type=int, default=256)
    r.add_argument("--n-gen", type=int, default=64)
    r.add_argument("--rounds", type=int, default=10, help="llama.cpp paired rounds")
    r.add_argument("--torch-rounds", type=int, default=3)
    args = ap.parse_args()
    result = bandwidth(args) if args.cmd == "bandwidth" else runtime_speed(args)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
