"""Run a GGUF through a given llama-cpp-python build in a subprocess.

The stock and the patched runtime (convert/patched.py) are both called ``llama_cpp``, so one
process can load only one of them. Tests and benchmarks that compare them run each in a child
process: ``site`` (a directory holding a ``llama_cpp`` package) goes first on PYTHONPATH; None
means the environment's own llama_cpp.

    python -m alphaq.runtime load MODEL                   # llama.cpp's own log on stderr
    python -m alphaq.runtime logprobs MODEL TEXT N_CTX WINDOWS OUT.npy
    python -m alphaq.runtime generate MODEL PROMPT N_TOKENS
    python -m alphaq.runtime speed MODEL N_PROMPT N_GEN REPEATS THREADS
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parent.parent


def child_env(site: Path | None) -> dict[str, str]:
    """os.environ for a child Python whose llama_cpp comes from ``site`` (None: this environment's)."""
    env = dict(os.environ)
    paths = ([str(site)] if site else []) + [str(_REPO)] + env.get("PYTHONPATH", "").split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def patched_loaded() -> bool:
    """Whether this process's llama_cpp is the patched build (version ``0.3.36+alphaq.<key>``)."""
    import llama_cpp

    return "+alphaq." in llama_cpp.__version__


def run(site: Path | None, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m alphaq.runtime ARGS`` with ``site``'s llama_cpp (and ``env`` added to the environment)."""
    proc = subprocess.run([sys.executable, "-m", "alphaq.runtime", *map(str, args)],
                          env={**child_env(site), **(env or {})}, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"runtime {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def logprobs(site: Path | None, model: Path, text: Path, n_ctx: int, windows: int, out: Path) -> np.ndarray:
    """log-softmax at every position of the first ``windows`` windows: (windows, n_ctx, n_vocab)."""
    run(site, "logprobs", model, text, n_ctx, windows, out)
    return np.load(out)


def generate(site: Path | None, model: Path, prompt: str, n_tokens: int) -> dict:
    return json.loads(run(site, "generate", model, prompt, n_tokens).stdout.strip().splitlines()[-1])


def speed(site: Path | None, model: Path, n_prompt: int, n_gen: int, repeats: int, threads: int,
          env: dict[str, str] | None = None) -> dict:
    out = run(site, "speed", model, n_prompt, n_gen, repeats, threads, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- the child side ------------------------------------------------------------------------------


def _child_load(model: str) -> None:
    import llama_cpp

    llama_cpp.Llama(model_path=model, n_ctx=64, verbose=True)
    print(json.dumps({"loaded": True, "version": llama_cpp.__version__}))


def _child_logprobs(model: str, text: str, n_ctx: str, n_windows: str, out: str) -> None:
    from alphaq.evaluate import load_llama, window_logprobs, windows

    llm = load_llama(Path(model), int(n_ctx), n_threads=2)
    ws = windows(llm, Path(text).read_text(errors="replace"), int(n_ctx), int(n_windows))
    np.save(out, np.stack([window_logprobs(llm, w) for w in ws]).astype(np.float32))


def _child_generate(model: str, prompt: str, n_tokens: str) -> None:
    from alphaq.evaluate import load_llama

    llm = load_llama(Path(model), 256, logits_all=False, n_threads=2)
    res = llm.create_completion(prompt, max_tokens=int(n_tokens), temperature=0.0, seed=0)
    toks = llm.tokenize(res["choices"][0]["text"].encode(), add_bos=False)
    print(json.dumps({"text": res["choices"][0]["text"], "n_tokens": len(toks),
                      "version": __import__("llama_cpp").__version__}))


def _child_speed(model: str, n_prompt: str, n_gen: str, repeats: str, threads: str) -> None:
    """Prefill and greedy-decode tokens/s, best of ``repeats`` (less noise from other processes)."""
    import llama_cpp

    n_p, n_g = int(n_prompt), int(n_gen)
    # logits_all keeps llm.scores indexable by position (the same small cost for every file)
    llm = llama_cpp.Llama(model_path=model, n_ctx=n_p + n_g + 8, n_batch=n_p, seed=0, verbose=False,
                          logits_all=True, n_threads=int(threads), n_threads_batch=int(threads))
    rng = np.random.default_rng(0)
    prompt = [llm.token_bos()] + [int(t) for t in rng.integers(10, llm.n_vocab(), n_p - 1)]
    prefill, decode = [], []
    for _ in range(int(repeats)):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(n_g):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        prefill.append(n_p / (t1 - t0))
        decode.append(n_g / (t2 - t1))
    print(json.dumps({"prefill_tps": max(prefill), "decode_tps": max(decode),
                      "prefill_all": prefill, "decode_all": decode,
                      "version": llama_cpp.__version__}))


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"load": _child_load, "logprobs": _child_logprobs, "generate": _child_generate, "speed": _child_speed}[cmd](*rest)
