#!/usr/bin/env python3
"""A conversion killed inside the damage stage, resumed, against one that ran through.

    python scripts/bench_resume.py MODEL.gguf [--like Q3_K_M] [--kill-at 0.5] [--json bench/resume-damage.json]

Three runs of ``convert_alphaq.py MODEL --like MIX`` (the default mode), each with a cache of its
own (XDG_CACHE_HOME), one after the other on an otherwise idle machine:

  1. through: uninterrupted, from an empty cache;
  2. killed:  from another empty cache, SIGKILLed once the damage stage's journal
              (``damage/KEY.partial.jsonl``, alphaq.damage.journal) holds ``--kill-at`` of the
              tensors the uninterrupted run measured;
  3. resumed: the same command again, on the killed run's cache.

It records each run's wall time and the summary's stage seconds and damage line, and checks that
the resumed run's files (model, plan JSON, tensor types, importance matrix) are byte-identical
to the uninterrupted run's. Random-weight models measure time only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDE = (".gguf", ".plan.json", ".tensor-types.txt", ".imatrix.gguf")


def command(model: Path, out: Path, like: str) -> list[str]:
    return [sys.executable, str(ROOT / "convert_alphaq.py"), str(model), "--like", like, "-o", str(out),
            "--no-progress", "--no-stock-compare"]


def summary_fields(stdout: str) -> dict:
    """The summary's time and damage lines."""
    lines = {ln.split()[0]: ln.strip() for ln in stdout.splitlines() if ln.startswith("  ") and ln.split()}
    return {"time": lines.get("time"), "damage": lines.get("damage"), "reused": lines.get("reused")}


def run(model: Path, out: Path, like: str, cache: Path) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.run(command(model, out, like), env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {"wall_s": round(wall, 1), **summary_fields(proc.stdout)}


def journal_records(cache: Path) -> int:
    """Tensor records in the damage journal(s) under ``cache`` (the header line not counted)."""
    n = 0
    for p in (cache / "alphaq" / "damage").glob("*.partial.jsonl"):
        n += max(0, sum(1 for line in p.read_text().splitlines() if line.endswith("}")) - 1)
    return n


def run_killed(model: Path, out: Path, like: str, cache: Path, after: int) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(command(model, out, like), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    while proc.poll() is None and journal_records(cache) < after:
        time.sleep(0.5)
    if proc.poll() is not None:
        sys.exit(f"the run ended ({proc.returncode}) before {after} tensors were recorded")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"wall_s": round(time.perf_counter() - t0, 1), "recorded_tensors": journal_records(cache)}


def tensors_in(damage_line: str) -> int:
    """Measured + interpolated tensors of the summary's damage line."""
    measured = re.search(r"damage\s+(\d+) tensor\(s\) measured", damage_line)
    interpolated = re.search(r"; (\d+) interpolated", damage_line)
    return int(measured.group(1)) + (int(interpolated.group(1)) if interpolated else 0)


def outputs(out: Path) -> dict[str, bytes]:
    stem = out.name.removesuffix(".gguf")
    return {suffix: out.with_name(stem + suffix).read_bytes() for suffix in SIDE}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--like", default="Q3_K_M")
    p.add_argument("--kill-at", type=float, default=0.5, help="fraction of the damage stage's tensors recorded")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-resume-", dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        (tmp / "through").mkdir()
        through = run(args.model, tmp / "through" / "o.gguf", args.like, tmp / "cache-through")
        n_tensors = tensors_in(through["damage"])
        (tmp / "killed").mkdir()
        after = max(1, round(args.kill_at * n_tensors))
        killed = run_killed(args.model, tmp / "killed" / "o.gguf", args.like, tmp / "cache-killed", after)
        resumed = run(args.model, tmp / "killed" / "o.gguf", args.like, tmp / "cache-killed")
        same = outputs(tmp / "through" / "o.gguf") == outputs(tmp / "killed" / "o.gguf")
    result = {"model": str(args.model), "like": args.like, "cpus": os.cpu_count(), "tensors": n_tensors,
              "kill_after_records": after, "through": through, "killed": killed, "resumed": resumed,
              "resumed_outputs_identical": same,
              "killed_plus_resumed_over_through": round((killed["wall_s"] + resumed["wall_s"]) / through["wall_s"], 3),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
