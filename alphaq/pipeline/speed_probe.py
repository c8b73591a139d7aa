"""How fast this machine is against the one the pre-flight's stage rates were measured on.

The pre-flight's time estimate (alphaq.pipeline.preflight) scales per-block rates that
scripts/bench_scale.py measured on this project's 2-core benchmark machine. On a 16-core desktop
those rates overstate the time several-fold, on a laptop core they understate it. A probe of about
0.4 s ties them to the machine a conversion runs on: ggml's quantiser (Q4_K with an
importance vector) on one thread, and on as many threads as the stages use at once. That is
compute-bound SIMD work of the kind llama.cpp's forward passes and quantiser do; it does not see
memory bandwidth or disk speed, so the estimate stays an estimate ("about").

The stages scale in two ways: llama.cpp's converter runs in one Python thread (the one-thread
ratio); the forward passes, the weighted errors, the spectral engine and the quantiser use every
thread (the all-thread ratio).
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

# The probe on the benchmark machine (2 cores, nothing else running), ns per weight: the median of
# six probes (each the best of PROBE_REPEATS), which ranged 110.4-127.3 and 56.7-72.6 on 2026-12-04.
# scripts/bench_scale.py's stage rates were measured on that machine.
REFERENCE_ONE_THREAD_NS = 112.5
REFERENCE_ALL_THREADS_NS = 57.6
REFERENCE_THREADS = 2
PROBE_ROWS, PROBE_COLS, PROBE_REPEATS = 64, 4096, 3
# stages of the pre-flight that run in one thread; every other stage uses all of them
ONE_THREAD_STAGES = ("float model",)


@dataclass(frozen=True)
class MachineSpeed:
    threads: int  # threads the stages use here
    one_thread: float  # this machine's one-thread speed over the benchmark machine's (2.0: twice as fast)
    all_threads: float  # the same with every thread busy

    def factor(self, stage: str) -> float:
        """How many times faster ``stage`` runs here than on the benchmark machine."""
        return self.one_thread if stage in ONE_THREAD_STAGES else self.all_threads

    def describe(self) -> str:
        return (f"this machine's speed probed against the benchmark's {REFERENCE_THREADS}-core CPU: {self.one_thread:.2f}x on one "
                f"thread, {self.all_threads:.2f}x on {self.threads} thread{'s' if self.threads > 1 else ''}")


def _probe_matrix() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((PROBE_ROWS, PROBE_COLS), dtype=np.float32),
            rng.uniform(0.5, 2.0, PROBE_COLS).astype(np.float32))


def _best_ns(jobs: int, threads: int) -> float:
    """Best wall ns per weight of ``jobs`` probe quantisations run on ``threads`` threads."""
    from gguf import GGMLQuantizationType

    from alphaq.gguf.ggml import quantize

    w, imat = _probe_matrix()
    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(PROBE_REPEATS):
            t0 = time.perf_counter()
            list(pool.map(lambda _: quantize(w, GGMLQuantizationType.Q4_K, imat), range(jobs)))
            best = min(best, (time.perf_counter() - t0) * 1e9 / (jobs * w.size))
    return best


def probe(threads: int) -> tuple[float, float]:
    """(one-thread, all-thread) ns per weight of the probe on this machine."""
    return _best_ns(1, 1), _best_ns(threads, threads)


@functools.cache
def machine_speed() -> MachineSpeed:
    """This machine against the benchmark machine (probed once per process)."""
    from alphaq.runtime.forward import _default_threads

    threads = _default_threads()
    one, every = probe(threads)
    return MachineSpeed(threads, REFERENCE_ONE_THREAD_NS / one, REFERENCE_ALL_THREADS_NS / every)
