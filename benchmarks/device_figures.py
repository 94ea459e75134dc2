"""Measure the figures a device profile records for the machine this runs on (profiles/README.md).

storage seq_read_mb_s      one pass over a file larger than the page cache can help with, read with
                           O_DIRECT in 8 MiB blocks (nothing comes from the page cache)
storage rand_4k_read_mb_s  O_DIRECT 4 KiB reads at random 4 KiB-aligned offsets of the same file,
                           8 threads (8 reads in flight); queue depth 1 is printed alongside
memory_bandwidth_gb_s      a 1 GiB numpy copy, counting the bytes read and the bytes written

    python benchmarks/device_figures.py --file /var/tmp/ondevice-read-test.bin [--size-gb 4] [--json]

The test file is written once with random bytes (so no layer can skip zeros) and kept for reruns;
delete it afterwards. Linux only (O_DIRECT).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import threading
import time

import numpy as np

BLOCK = 8 << 20
PAGE = 4096


def write_test_file(path: str, size: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return
    chunk = os.urandom(BLOCK)
    with open(path, "wb") as f:
        for _ in range(size // BLOCK):
            f.write(chunk[:1] + os.urandom(64) + chunk[65:])  # blocks differ: no deduplication
        f.flush()
        os.fsync(f.fileno())


def sequential_read_mb_s(path: str) -> float:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT requires
    total, start = 0, time.perf_counter()
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    return total / (time.perf_counter() - start) / 1e6


def random_4k_read_mb_s(path: str, threads: int, seconds: float) -> float:
    pages = os.path.getsize(path) // PAGE
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def worker(i: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        buf, rng, n = mmap.mmap(-1, PAGE), random.Random(i), 0
        try:
            while time.perf_counter() < deadline:
                for _ in range(64):
                    os.preadv(fd, [buf], rng.randrange(pages) * PAGE)
                n += 64
        finally:
            os.close(fd)
        counts[i] = n

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) * PAGE / (time.perf_counter() - start) / 1e6


def memory_copy_gb_s(size: int = 1 << 30, repeats: int = 10) -> float:
    src = np.ones(size // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best / 1e9  # read src + write dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", required=True, help="test file (created if missing; delete it afterwards)")
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=8, help="reads in flight for the random-read figure")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each random-read run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    write_test_file(args.file, int(args.size_gb * (1 << 30)) // BLOCK * BLOCK)
    figures = {
        "seq_read_mb_s": round(sequential_read_mb_s(args.file)),
        "rand_4k_read_mb_s": round(random_4k_read_mb_s(args.file, args.threads, args.seconds)),
        "rand_4k_read_qd1_mb_s": round(random_4k_read_mb_s(args.file, 1, args.seconds)),
        "memory_bandwidth_gb_s": round(memory_copy_gb_s(), 1),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:24s} {value}")


if __name__ == "__main__":
    main()
