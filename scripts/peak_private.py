#!/usr/bin/env python3
"""Run a command; print its wall time and the peak private memory (RssAnon + RssShmem) of its
largest process and of its process tree, sampled every 50 ms (bench_convert.measure, the
benchmarks' own sampler).

    python scripts/peak_private.py CMD [ARGS...]

Used for bench/converter-chunked.txt (llama.cpp's converter with and without our chunked expert stacks).
"""

import sys

from bench_convert import measure

if __name__ == "__main__":
    m = measure(sys.argv[1:])
    print(f"wall {m['wall']:.1f} s peak private largest {m['peak_private_kib'] / 2**20:.2f} GiB "
          f"tree {m['peak_tree_private_kib'] / 2**20:.2f} GiB")
