#!/usr/bin/env python3
"""Run a command; print its wall time and the peak private memory (RssAnon + RssShmem, Linux) of its
largest process and of its process tree, polled every 50 ms.

    python scripts/peak_private.py CMD [ARGS...]

Used for bench/converter-chunked.txt (llama.cpp's converter with and without our chunked expert stacks).
"""
import os, subprocess, sys, time
def private(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            d = {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("RssAnon", "RssShmem"))}
        return d.get("RssAnon", 0) + d.get("RssShmem", 0)
    except OSError:
        return 0
def tree(root):
    out, stack = [], [root]
    while stack:
        p = stack.pop(); out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    stack += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out
t0 = time.time()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
peak = peak_tree = 0
while proc.poll() is None:
    vals = [private(p) for p in tree(proc.pid)]
    peak, peak_tree = max(peak, max(vals)), max(peak_tree, sum(vals))
    time.sleep(0.05)
err = proc.stderr.read().decode()[-300:]
print(f"rc {proc.returncode} wall {time.time()-t0:.1f} s peak private largest {peak/2**20:.2f} GiB tree {peak_tree/2**20:.2f} GiB", err if proc.returncode else "")
