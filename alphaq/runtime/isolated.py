"""Run a GGUF through a given llama-cpp-python build in a subprocess.

The stock and the patched runtime (convert/patched.py) are both called ``llama_cpp``, so one
process can load only one of them. Tests and benchmarks that compare them run each in a child
process: ``site`` (a directory holding a ``llama_cpp`` package) goes first on PYTHONPATH; None
means the environment's own llama_cpp. ``gpu_layers`` (llama.cpp's -ngl; -1: all) offloads layers in
a GPU build; the child reads it from ALPHAQ_GPU_LAYERS.

    python -m alphaq.runtime.isolated load MODEL                   # llama.cpp's own log on stderr
    python -m alphaq.runtime.isolated logprobs MODEL TEXT N_CTX WINDOWS OUT.npy
    python -m alphaq.runtime.isolated generate MODEL PROMPT N_TOKENS
    python -m alphaq.runtime.isolated interleaved N_PROMPT N_GEN ROUNDS THREADS MODEL [MODEL ...]
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    # A child imports llama_cpp before numpy: on a GPU machine (H200, CUDA 13.0, Python 3.12,
    # numpy 2.5, 2026-12-04) the CUDA build crashed inside llama_model_load_from_file (in
    # llama_model::print_info) whenever numpy had been imported first, and ran when llama_cpp came first.
    import llama_cpp  # noqa: F401

import numpy as np

# the directory holding this alphaq package (the checkout, or site-packages when installed): a
# child finds the same alphaq as its parent
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding alphaq/


def child_env(site: Path | None) -> dict[str, str]:
    """os.environ for a child Python whose llama_cpp comes from ``site`` (None: this environment's)."""
    env = dict(os.environ)
    paths = ([str(site)] if site else []) + [str(_PACKAGE_ROOT)] + env.get("PYTHONPATH", "").split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def patched_loaded() -> bool:
    """Whether this process's llama_cpp is the patched build (version ``0.3.36+alphaq.<key>``)."""
    import llama_cpp

    return "+alphaq." in llama_cpp.__version__


def run(site: Path | None, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m alphaq.runtime.isolated ARGS`` with ``site``'s llama_cpp (and ``env`` added to the environment)."""
    proc = subprocess.run([sys.executable, "-m", "alphaq.runtime.isolated", *map(str, args)],
                          env={**child_env(site), **(env or {})}, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"runtime {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def _gpu_env(gpu_layers: int) -> dict[str, str]:
    return {"ALPHAQ_GPU_LAYERS": str(gpu_layers)}


def _gpu_layers() -> int:
    return int(os.environ.get("ALPHAQ_GPU_LAYERS", "0"))


def logprobs(site: Path | None, model: Path, text: Path, n_ctx: int, windows: int, out: Path,
             gpu_layers: int = 0) -> np.ndarray:
    """log-softmax at every position of the first ``windows`` windows: (windows, n_ctx, n_vocab)."""
    run(site, "logprobs", model, text, n_ctx, windows, out, env=_gpu_env(gpu_layers))
    return np.load(out)


def generate(site: Path | None, model: Path, prompt: str, n_tokens: int, gpu_layers: int = 0) -> dict:
    out = run(site, "generate", model, prompt, n_tokens, env=_gpu_env(gpu_layers)).stdout
    return json.loads(out.strip().splitlines()[-1])


def interleaved_speed(site: Path | None, models: list[Path], n_prompt: int, n_gen: int, rounds: int,
                      threads: int, env: dict[str, str] | None = None, gpu_layers: int = 0) -> dict:
    """Prefill and decode tokens/s of several files loaded in *one* process, timed in alternating
    rounds: ``{"prefill": [[tps per round] per model], "decode": [...]}``. Machine load and the
    per-process speed swings of this VM then hit every file alike, so per-round ratios are paired."""
    out = run(site, "interleaved", n_prompt, n_gen, rounds, threads, *models,
              env={**(env or {}), **_gpu_env(gpu_layers)}).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- the child side ------------------------------------------------------------------------------


def _child_load(model: str) -> None:
    import llama_cpp

    llama_cpp.Llama(model_path=model, n_ctx=64, verbose=True)
    print(json.dumps({"loaded": True, "version": llama_cpp.__version__}))


def _child_logprobs(model: str, text: str, n_ctx: str, n_windows: str, out: str) -> None:
    from alphaq.evaluate.perplexity import load_llama, window_logprobs, windows

    llm = load_llama(Path(model), int(n_ctx), n_threads=2, n_gpu_layers=_gpu_layers())
    ws = windows(llm, Path(text).read_text(errors="replace"), int(n_ctx), int(n_windows))
    np.save(out, np.stack([window_logprobs(llm, w) for w in ws]).astype(np.float32))


def _child_generate(model: str, prompt: str, n_tokens: str) -> None:
    from alphaq.evaluate.perplexity import load_llama

    llm = load_llama(Path(model), 256, logits_all=False, n_threads=2, n_gpu_layers=_gpu_layers())
    res = llm.create_completion(prompt, max_tokens=int(n_tokens), temperature=0.0, seed=0)
    toks = llm.tokenize(res["choices"][0]["text"].encode(), add_bos=False)
    print(json.dumps({"text": res["choices"][0]["text"], "n_tokens": len(toks),
                      "version": __import__("llama_cpp").__version__}))


def _child_interleaved(n_prompt: str, n_gen: str, rounds: str, threads: str, *models: str) -> None:
    """Raw llama_decode calls (no sampling, no logits copies) on a fixed random token sequence, so
    every file routes the same tokens and the Python around each step is a few microseconds."""
    import llama_cpp as lc

    n_p, n_g, t = int(n_prompt), int(n_gen), int(threads)
    lc.llama_backend_init()
    loaded = []
    for m in models:
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = _gpu_layers()
        model = lc.llama_model_load_from_file(m.encode(), mp)
        if not model:
            raise SystemExit(f"cannot load {m}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_p + n_g + 16, n_p, n_p
        cp.n_threads, cp.n_threads_batch = t, t
        ctx = lc.llama_init_from_model(model, cp)
        if not ctx:
            raise SystemExit(f"cannot create a context for {m}")
        loaded.append((model, ctx))
    n_vocab = min(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model)) for model, _ in loaded)
    rng = np.random.default_rng(0)
    tokens = (lc.llama_token * (n_p + n_g))(*(int(x) for x in rng.integers(10, n_vocab, n_p + n_g)))

    def decode(ctx, first: int, n: int) -> None:
        ptr = ctypes.cast(ctypes.byref(tokens, first * ctypes.sizeof(lc.llama_token)), ctypes.POINTER(lc.llama_token))
        if lc.llama_decode(ctx, lc.llama_batch_get_one(ptr, n)) != 0:
            raise SystemExit("llama_decode failed")

    def one_round(ctx) -> tuple[float, float]:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        decode(ctx, 0, n_p)
        lc.llama_synchronize(ctx)
        t1 = time.perf_counter()
        for i in range(n_g):
            decode(ctx, n_p + i, 1)
        lc.llama_synchronize(ctx)
        t2 = time.perf_counter()
        return n_p / (t1 - t0), n_g / (t2 - t1)

    for _, ctx in loaded:  # warm-up: page in the weights, build the graphs once
        one_round(ctx)
    prefill = [[] for _ in loaded]
    decode_tps = [[] for _ in loaded]
    for r in range(int(rounds)):
        order = range(len(loaded)) if r % 2 == 0 else reversed(range(len(loaded)))
        for k in order:
            p, d = one_round(loaded[k][1])
            prefill[k].append(p)
            decode_tps[k].append(d)
    for model, ctx in loaded:
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    print(json.dumps({"prefill": prefill, "decode": decode_tps, "version": lc.__version__}))


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"load": _child_load, "logprobs": _child_logprobs, "generate": _child_generate,
     "interleaved": _child_interleaved}[cmd](*rest)
