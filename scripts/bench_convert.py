#!/usr/bin/env python3
"""Benchmark convert_alphaq.py against the stock llama.cpp pipeline, side by side, same run.

    python scripts/bench_convert.py [MODEL_DIR ...] [--repeats 3] [--baseline-root DIR]

For each HF checkpoint (default: the cached benchmark zoo, .cache/zoo/*-bench) it times
  * stock:  llama.cpp's convert_hf_to_gguf.py (BF16) + llama_model_quantize to Q3_K_M
  * alphaq: convert_alphaq.py MODEL --like Q3_K_M, the default path (no caches: self text,
    importance and damage measurements are all paid), at the stock file's size
  * fast:   convert_alphaq.py MODEL --fast --budget 3 (no alpha cache, so the spectral stage is paid)
  * baseline (with --baseline-root): the convert_alphaq.py of another checkout, e.g. an export of
    an earlier commit (``git archive HEAD | tar -x -C /tmp/base``), same arguments
alternating them in every repeat (the machine is shared: load drifts), and reports the median
wall time of each, the ratio of the medians alphaq/stock, the load average before and after, and
the median CPU time (user + sys of every process) of each pipeline: work that no overlap hides,
so CPU time / number of cores is a floor under the wall time.

Memory: each command runs in a fresh process; "peak RSS" is the largest peak of any one process
of its tree (RUSAGE_CHILDREN), divided by the BF16 model size (streaming target <= 0.5 on models
with >= 8 blocks). "peak tree RSS" is the largest sum of the RSS of all processes of the tree at
one moment (sampled every 50 ms), which counts processes that run at the same time (alphaq runs
llama.cpp's converter beside its own spectral stage) together. RSS counts the file-backed pages of
memory-mapped files (the model), which the OS may drop and read again; "peak private" counts only
the anonymous and shared-memory pages (RssAnon + RssShmem of /proc/PID/status, sampled the same
way), of the largest process and summed over the tree; the RssFile peaks are kept beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs one command; prints its wall time, the peak RSS of its largest process (RUSAGE_CHILDREN),
# and, sampled from /proc every 50 ms: the peak summed RSS of its process tree, the peak private
# memory (RssAnon + RssShmem) of its largest process and of the tree, and the same for RssFile.
_MEASURE = r"""
import json, os, resource, subprocess, sys, threading, time

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")

def children():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids

def tree_pids(root):
    kids, todo, out = children(), [root], []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out

def memory_kib(pid):  # {"VmRSS": ..., "RssAnon": ..., "RssFile": ..., "RssShmem": ...} of one process
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) for k, v in (l.split(":", 1) for l in f) if k in FIELDS}
    except (OSError, ValueError):
        return {}

def private_kib(m):  # memory the process needs: anonymous + shared-memory pages, not the file-backed ones
    return m.get("RssAnon", 0) + m.get("RssShmem", 0)

peaks = dict.fromkeys(("tree_rss", "private", "tree_private", "file", "tree_file"), 0)

def sample_once(root):
    mems = [m for m in map(memory_kib, tree_pids(root)) if m]
    now = {"tree_rss": sum(m.get("VmRSS", 0) for m in mems),
           "private": max(map(private_kib, mems), default=0), "tree_private": sum(map(private_kib, mems)),
           "file": max((m.get("RssFile", 0) for m in mems), default=0),
           "tree_file": sum(m.get("RssFile", 0) for m in mems)}
    for k, v in now.items():
        peaks[k] = max(peaks[k], v)

t = time.perf_counter()
out_path = os.environ.get("BENCH_STDOUT")
proc = subprocess.Popen(sys.argv[1:], stdout=open(out_path, "w") if out_path else subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
def sample():
    while proc.poll() is None:
        sample_once(proc.pid)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
stderr = proc.communicate()[1]
wall = time.perf_counter() - t
if proc.returncode:
    sys.stderr.write(stderr[-3000:]); sys.exit(proc.returncode)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
def per_stage(values):  # "float model 5.7 s, damage 1.2 s" -> {"float model": 5.7, "damage": 1.2} (any unit)
    return {" ".join(w[:-2]): float(w[-2]) for w in (part.split() for part in values.split(","))}
stages, stage_private = {}, {}
for line in open(out_path) if out_path else ():
    text = line.strip()
    if text.startswith("time ") and " about " not in text:  # the summary's stage times, not the pre-flight estimate
        stages = per_stage(text[5:])
    elif text.startswith("private ") and ":" in text:  # "private  peak memory ... per stage: float model 0.61 GiB, ..."
        stage_private = per_stage(text.split(":", 1)[1])
damage = {}
if out_path:  # the default mode's "damage  N tensor(s) measured ... on T tokens ...; weighted error 1.0 s, ..."
    import re
    for line in open(out_path):
        if line.strip().startswith("damage "):
            text = line.strip()
            damage = {k.replace(" ", "_"): float(v) for k, v in
                      re.findall(r"(weighted error|fake quantise|forward|reference) ([0-9.]+) s", text)}
            damage["measured"] = int(re.search(r"(\d+) tensor\(s\) measured", text)[1])
            damage["tokens"] = int(re.search(r"on ([0-9,]+) tokens", text)[1].replace(",", ""))
            m = re.search(r"(\d+) interpolated", text)
            damage["interpolated"] = int(m[1]) if m else 0
print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "peak_rss_kib": ru.ru_maxrss,
                  "peak_tree_rss_kib": peaks["tree_rss"], "peak_private_kib": peaks["private"],
                  "peak_tree_private_kib": peaks["tree_private"], "peak_file_kib": peaks["file"],
                  "peak_tree_file_kib": peaks["tree_file"], "stages": stages, "damage": damage,
                  "stage_private_gib": stage_private}))
"""

# The stock pipeline (llama.cpp's converter as it is, then llama-quantize's Q3_K_M), each step timed; it
# prints a summary-style "time" line that measure() reads as stages. bench_scale runs it too.
_STOCK = r"""
import sys, subprocess, time
from pathlib import Path
from convert.vendor import ensure_vendor
from alphaq.gguf.quantize import quantize_stock
model, work = Path(sys.argv[1]), Path(sys.argv[2])
t0 = time.perf_counter()
subprocess.run([sys.executable, "-m", "convert.run_upstream", "--as-upstream", str(ensure_vendor()), str(model),
                "--outtype", "bf16", "--outfile", str(work / "stock-bf16.gguf")], check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
t1 = time.perf_counter()
quantize_stock(work / "stock-bf16.gguf", work / "stock.gguf", "Q3_K_M")
print(f"  time        convert {t1 - t0:.1f} s, quantize {time.perf_counter() - t1:.1f} s")
"""


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4], sum(v)  # idle + iowait, total


def wait_idle(limit_s: float, idle_frac: float = 0.9) -> bool:
    """Wait until the CPUs were >= idle_frac idle for 2 s in a row (other people's jobs on a
    shared machine), at most limit_s; True if that happened."""
    t_end, calm = time.monotonic() + limit_s, 0
    while time.monotonic() < t_end:
        i0, t0 = _cpu_times()
        time.sleep(1.0)
        i1, t1 = _cpu_times()
        calm = calm + 1 if t1 > t0 and (i1 - i0) / (t1 - t0) >= idle_frac else 0
        if calm >= 2:
            return True
    return False


IDLE = {"wait_s": 0.0, "timeouts": 0, "runs": 0}


def measure(cmd: list[str], cwd: Path = ROOT) -> dict:
    if IDLE["wait_s"] > 0 and os.path.exists("/proc/stat"):
        IDLE["runs"] += 1
        IDLE["timeouts"] += not wait_idle(IDLE["wait_s"])
    with tempfile.NamedTemporaryFile(suffix=".txt") as summary:
        out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, cwd=cwd,
                             env={**os.environ, "BENCH_STDOUT": summary.name})
    if out.returncode:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def alphaq_cmd(root: Path, model: Path, work: str, tag: str, mode: tuple[str, ...] = ("--fast", "--budget", "3")) -> list[str]:
    return [sys.executable, str(root / "convert_alphaq.py"), str(model), *mode,
            "-o", f"{work}/{tag}.gguf", "--no-cache", "--no-progress", "--no-stock-compare"]


DEFAULT_MODE = ("--like", "Q3_K_M")


def bench(model: Path, repeats: int, baseline: Path | None, default: bool = True) -> dict:
    """``default=False``: stock and --fast only (the default's rows are then None)."""
    model = model.resolve()
    bf16_bytes = sum(p.stat().st_size for p in model.glob("model*.safetensors"))
    cfg = json.loads((model / "config.json").read_text())
    rows: dict[str, list[dict]] = {"stock": [], "alphaq": [], "fast": []}
    if baseline:
        rows["baseline"] = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as work:
            rows["stock"].append(measure([sys.executable, "-c", _STOCK, str(model), work]))
            if default:
                rows["alphaq"].append(measure(alphaq_cmd(ROOT, model, work, "alphaq", DEFAULT_MODE)))
            rows["fast"].append(measure(alphaq_cmd(ROOT, model, work, "fast")))
            if baseline:
                rows["baseline"].append(measure(alphaq_cmd(baseline, model, work, "baseline"), cwd=baseline))
    if not default:
        del rows["alphaq"]
    med = {k: statistics.median(r["wall"] for r in v) for k, v in rows.items()}
    cpu = {k: statistics.median(r["cpu"] for r in v) for k, v in rows.items()}

    def peak(pipeline: str, key: str) -> int | None:
        return max(r[key] for r in rows[pipeline]) * 1024 if pipeline in rows else None

    out = {
        "model": model.name, "blocks": cfg["num_hidden_layers"], "bf16_bytes": bf16_bytes,
        "walls": {k: [round(r["wall"], 2) for r in v] for k, v in rows.items()},
        "cpu_s": {k: round(v, 1) for k, v in cpu.items()},
        "stock_s": med["stock"], "alphaq_s": med.get("alphaq"),
        "ratio": med["alphaq"] / med["stock"] if default else None,
        "fast_s": med["fast"], "fast_ratio": med["fast"] / med["stock"],
        "stages": {k: [r.get("stages", {}) for r in v] for k, v in rows.items() if k != "stock"},
        "alphaq_peak_rss": peak("alphaq", "peak_rss_kib"),
        "rss_over_bf16": peak("alphaq", "peak_rss_kib") / bf16_bytes if default else None,
        "alphaq_peak_tree_rss": peak("alphaq", "peak_tree_rss_kib"),
        "stock_peak_rss": peak("stock", "peak_rss_kib"),
        "stock_peak_tree_rss": peak("stock", "peak_tree_rss_kib"),
        "alphaq_peak_private": peak("alphaq", "peak_private_kib"),
        "stock_peak_private": peak("stock", "peak_private_kib"),
    }
    if baseline:
        out["baseline_s"] = med["baseline"]
        out["baseline_ratio"] = med["baseline"] / med["stock"]
    return out


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else spec.format(value * scale)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", type=Path)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per pipeline; medians reported (default: %(default)s)")
    p.add_argument("--baseline-root", type=Path, help="another checkout whose convert_alphaq.py is timed alongside")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each run wait up to S seconds for the CPUs to be idle (shared machine)")
    p.add_argument("--no-default", action="store_true", help="time stock and --fast only (the default is slow)")
    args = p.parse_args()
    IDLE["wait_s"] = args.wait_idle
    models = args.models or sorted((ROOT / ".cache" / "zoo").glob("*-bench"))
    if not models:
        raise SystemExit("no models: pass HF checkpoint dirs or train the zoo "
                         "(python scripts/train_tiny_moe.py --zoo bench --out .cache/zoo)")
    baseline = args.baseline_root.resolve() if args.baseline_root else None
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"{args.repeats} alternating runs each, medians", flush=True)
    head = ("| model | blocks | BF16 size | stock (convert + Q3_K_M) | default (--like Q3_K_M) | ratio |"
            " --fast --budget 3 | ratio |")
    sep = "|---|---|---|---|---|---|---|---|"
    if baseline:
        head += f" baseline ({baseline.name}) | baseline ratio |"
        sep += "---|---|"
    head += " alphaq peak RSS | RSS / BF16 size | alphaq peak tree RSS | stock peak tree RSS |"
    sep += "---|---|---|---|"
    print(head)
    print(sep, flush=True)
    results = []
    for m in models:
        r = bench(m, args.repeats, baseline, default=not args.no_default)
        results.append(r)
        line = (f"| {r['model']} | {r['blocks']} | {r['bf16_bytes'] / 2**20:.1f} MiB | {r['stock_s']:.1f} s | "
                f"{_fmt(r['alphaq_s'], '{:.1f} s')} | {_fmt(r['ratio'], '{:.2f}x')} | {r['fast_s']:.1f} s | "
                f"{r['fast_ratio']:.2f}x |")
        if baseline:
            line += f" {r['baseline_s']:.1f} s | {r['baseline_ratio']:.2f}x |"
        line += (f" {_fmt(r['alphaq_peak_rss'], '{:.0f} MiB', 2**-20)} | {_fmt(r['rss_over_bf16'], '{:.2f}')} | "
                 f"{_fmt(r['alphaq_peak_tree_rss'], '{:.0f} MiB', 2**-20)} | {r['stock_peak_tree_rss'] / 2**20:.0f} MiB |")
        print(line, flush=True)
        print(f"#   wall times (s): {json.dumps(r['walls'])}; median CPU time, user+sys of all processes (s): "
              f"{json.dumps(r['cpu_s'])}", flush=True)
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if IDLE["runs"]:
        print(f"# waited for idle CPUs before each of {IDLE['runs']} runs (up to {IDLE['wait_s']:g} s); "
              f"{IDLE['timeouts']} started without it")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
