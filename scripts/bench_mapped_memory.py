#!/usr/bin/env python3
"""Memory of the forward stages at real shapes: llama.cpp's malloc'd copy against the memory-mapped
model (alphaq.runtime.mapped), and the mapped model under a memory limit smaller than the model.

    python scripts/bench_mapped_memory.py [--blocks 2] [--limit-fraction 0.5] [--json bench/mapped-memory.json]

Generates a seeded random checkpoint with Qwen3-30B-A3B's block shapes (scripts/make_large_random_moe.py),
converts it to BF16 with llama.cpp's converter, then runs the forward stages' work in a child process
per case: load the model, score 3 windows of 256 tokens (the damage stage's pass), fake-quantise one
expert tensor in place and score a window (one measurement), and decode 32 steps of 16 sequences
(the self-text stage's pass). Each child runs in its own memory cgroup (v1 or v2; needs root), which
gives the group's peak memory (page cache included) and, sampled every 0.2 s, the peak of its
anonymous (private) memory. Cases:

  copy            llama.cpp's malloc'd copy of the model (the forward stages before alphaq.runtime.mapped)
  mapped          the memory-mapped model, no limit
  mapped-limited  mapped, with the group limited to --limit-fraction of the BF16 file: the
                  larger-than-RAM case, emulated (the kernel must drop and re-read the model's pages)
  copy-limited    the copy under the same limit (expected: killed for memory)
  q8copy          the Q8_0 working copy of the model (--working-copy q8_0; written by llama.cpp's
                  quantiser first), memory-mapped, no limit
  q8copy-limited  the Q8_0 copy under the same limit (--working-copy auto's case: the float model
                  does not fit, its copy does); not run unless asked for with --cases

Page cache is written back and dropped before each case (sync; echo 3 > /proc/sys/vm/drop_caches)
so that every case starts cold and the model's pages are charged to the case's group (a page
already cached elsewhere would not count against its limit). Each child also reports the bytes it read from storage (/proc/self/io read_bytes) and
its major page faults: under the limit the model's pages are read again on every pass, and that
volume divided by a disk's read rate is what paging costs there (a VM's disk may be cached by its
host, so the seconds measured here can understate it). Random weights measure memory and time,
never quality.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("copy", "mapped", "mapped-limited", "copy-limited", "q8copy", "q8copy-limited")
DEFAULT_CASES = CASES[:4]


def child(mode: str, gguf: str) -> None:
    """The forward stages' work on one model; prints one JSON line."""
    import numpy as np
    from gguf import GGMLQuantizationType

    from alphaq.damage import Swap
    from alphaq.runtime.forward import Session

    out: dict = {}
    t = time.perf_counter()
    with Session(Path(gguf), 256, n_seq=16, mapped=mode in ("mapped", "q8copy")) as s:
        out["load_s"] = time.perf_counter() - t
        rng = np.random.default_rng(0)
        windows = rng.integers(3, s.n_vocab, size=(4, 256))
        t = time.perf_counter()
        for w in windows[:3]:
            s.logits(w)
        out["window_s"] = (time.perf_counter() - t) / 3
        t = time.perf_counter()
        with Swap(s.weights["blk.0.ffn_up_exps.weight"], GGMLQuantizationType.Q4_K, None):
            s.logits(windows[3])
        out["measurement_s"] = time.perf_counter() - t
        s.clear()
        t = time.perf_counter()
        for pos in range(32):
            s.step(rng.integers(3, s.n_vocab, size=16), pos)
        out["decode_step_s"] = (time.perf_counter() - t) / 32
    # what paging cost: bytes this process had read from storage, and page faults that needed it
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    out["storage_read_bytes"] = int(io["read_bytes"])
    out["major_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    print(json.dumps(out), flush=True)


class Group:
    """A memory cgroup for one child: v2 (memory.max, memory.peak) or v1 (limit_in_bytes, max_usage)."""

    def __init__(self, name: str, limit: int | None):
        v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        self.v2 = v2
        self.path = Path("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/memory") / name
        if self.path.exists():
            self.path.rmdir()
        self.path.mkdir()
        if limit is not None:
            (self.path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))

    def join(self) -> None:  # runs in the child before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def anon(self) -> int:
        stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        return int(stat["anon" if self.v2 else "rss"])

    def peak(self) -> int | None:
        f = self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(f.read_text()) if f.exists() else None

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def run_case(case: str, gguf: Path, limit: int) -> dict:
    os.sync()  # dirty pages (the freshly written model) are not dropped: write them first
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass
    group = Group(f"alphaq-bench-{os.getpid()}", limit if case.endswith("limited") else None)
    peak_anon, done = [0], threading.Event()

    def sample():
        while not done.wait(0.2):
            try:
                peak_anon[0] = max(peak_anon[0], group.anon())
            except (OSError, KeyError):
                pass

    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", case.split("-")[0], str(gguf)],
                            preexec_fn=group.join, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    sampler = threading.Thread(target=sample, daemon=True)  # started after the fork: preexec_fn and threads
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    done.set()
    sampler.join()
    row = {"case": case, "rc": proc.returncode, "wall_s": round(wall, 1), "limit_bytes": limit if case.endswith("limited") else None,
           "group_peak_bytes": group.peak(), "peak_anon_bytes": peak_anon[0]}
    group.remove()
    if proc.returncode == 0:
        row.update({k: round(v, 3) for k, v in json.loads(stdout.strip().splitlines()[-1]).items()})
    else:
        row["stderr_tail"] = stderr[-300:]
    return row


def _q8_copy(gguf: Path, cache: Path) -> dict:
    """The Q8_0 working copy, as --working-copy q8_0 writes it (llama.cpp's quantiser), timed."""
    from alphaq.gguf.quantize import quantize_stock

    path = cache / "q8_0-copy.gguf"
    t = time.perf_counter()
    quantize_stock(gguf, path, "Q8_0")
    return {"path": path, "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - t, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=2, metavar=("MODE", "GGUF"), help=argparse.SUPPRESS)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--limit-fraction", type=float, default=0.5)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES))
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "mapped-memory.json")
    p.add_argument("--keep", action="store_true", help="keep the generated model in .cache/scale/")
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return 0
    from convert.hf_to_gguf import convert_hf

    cache = ROOT / ".cache" / "scale"
    model = cache / f"qwen3moe-{args.blocks}blk"
    gguf = cache / f"qwen3moe-{args.blocks}blk-bf16.gguf"
    try:
        if not gguf.exists():
            subprocess.run([sys.executable, str(ROOT / "scripts" / "make_large_random_moe.py"), str(model),
                            "--arch", "qwen3moe", "--layers", str(args.blocks)], check=True, cwd=ROOT)
            convert_hf(model, gguf)
        size = gguf.stat().st_size
        limit = int(size * args.limit_fraction)
        copy = _q8_copy(gguf, cache) if any(c.startswith("q8copy") for c in args.cases) else None
        rows = []
        for case in args.cases:
            rows.append(run_case(case, copy["path"] if case.startswith("q8copy") else gguf, limit))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
            gguf.unlink(missing_ok=True)
        (cache / "q8_0-copy.gguf").unlink(missing_ok=True)
    extra = {"q8_0_copy": {k: v for k, v in copy.items() if k != "path"}} if copy else {}
    args.json.write_text(json.dumps({"model": f"Qwen3-30B-A3B shapes, {args.blocks} blocks, random weights",
                                     "bf16_bytes": size, "limit_fraction": args.limit_fraction, "cpus": os.cpu_count(),
                                     **extra, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
