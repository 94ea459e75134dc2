"""Direct-I/O read behaviour of the flash store (ffn_flash.bin) on this machine.

For each encoding (q4: 1 KiB records, fp16: 4 KiB records) and each read pattern, reads the neurons
of every layer that a token would need (a random fraction of each layer's neurons: the worst case
for coalescing, no window reuse) through ondevice.flash.FlashReader, and reports bytes/s, reads/s,
bytes read per token (pages read, including the gaps read along) and ms per token:

- "one record per read": every neuron record its own read (no coalescing; 2 records in one page
  are two reads of that page);
- "coalesced, gap G": records at most G bytes apart in one read of up to 256 KiB (the gap is read
  along: worth it while reading G bytes takes less than issuing another read);
- "whole layer": every record of each layer in reads of up to 256 KiB (the naive baseline's I/O).

with 1, 4 and 16 reads in flight. O_DIRECT bypasses the page cache: every byte comes from storage
(no cache to drop). The buffered baseline ("mmap cold") maps the file and touches the records after
posix_fadvise(DONTNEED) (and /proc/sys/vm/drop_caches when writable) before every token.

    python benchmarks/flash_io.py [--bundle-q4 B] [--bundle-fp16 B] [--tokens 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ondevice.bundle import read_bundle
from ondevice.flash import FlashReader


def bundle_for(encoding: str, given: str | None) -> Path:
    if given:
        return Path(given)
    from ondevice.converters.convert import convert

    out = Path(tempfile.gettempdir()) / f"flash_io_{encoding}.bundle"
    return convert("smollm2-135m", out, force=True, progress=False, flash=encoding)


def drop_cache(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "fadvise DONTNEED + drop_caches"
    except OSError:
        return "fadvise DONTNEED"


def run_direct(path, entry, fraction, tokens, inflight, max_read, max_gap, rng) -> dict:
    layers, n_ff = entry["num_layers"], entry["intermediate_size"]
    with FlashReader(path, entry, inflight=inflight, max_read=max_read, max_gap=max_gap, direct=True) as r:
        r.read(0, [0])  # threads and buffers up
        r.stats.start_token()
        t = time.perf_counter()
        for _ in range(tokens):
            futures = []
            for layer in range(layers):
                ids = np.arange(n_ff) if fraction >= 1 else rng.choice(n_ff, int(fraction * n_ff), replace=False)
                futures.append(r.submit(layer, np.sort(ids)))
                if len(futures) > 2:  # keep about two layers in flight, as a decode loop with prefetch would
                    futures.pop(0).result()
            for f in futures:
                f.result()
            r.stats.end_token()
        dt = time.perf_counter() - t
        toks = r.stats.per_token
    b = sum(x["bytes_read"] for x in toks)
    n = sum(x["reads"] for x in toks)
    return {"ms_per_token": 1e3 * dt / tokens, "MB_per_s": b / dt / 1e6, "reads_per_s": n / dt,
            "MB_per_token": b / tokens / 1e6, "reads_per_token": n / tokens,
            "useful_MB_per_token": sum(x["records"] for x in toks) * entry["record_payload"] / tokens / 1e6}


def read_bytes() -> int:
    """Bytes this process made the kernel fetch from storage (/proc/self/io read_bytes)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes")).split()[1])


def run_mmap_cold(path, entry, fraction, tokens, rng) -> dict:
    """A fresh mapping per token after dropping the file's pages (a page still mapped is not dropped)."""
    layers, n_ff, rec = entry["num_layers"], entry["intermediate_size"], entry["record_size"]
    total, how, fetched = 0.0, "", 0
    with open(path, "rb") as f:
        for _ in range(tokens):
            how = drop_cache(path)
            before = read_bytes()
            t = time.perf_counter()
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            raw = np.frombuffer(m, np.uint8)
            for layer in range(layers):
                ids = np.arange(n_ff)
                if fraction < 1:
                    ids = np.sort(rng.choice(n_ff, int(fraction * n_ff), replace=False))
                start = entry["layers"][layer]["records_offset"]
                idx = (start + ids * rec)[:, None] + np.arange(rec)
                raw[idx].sum()  # touch every byte of the records
            del raw
            m.close()
            total += time.perf_counter() - t
            fetched += read_bytes() - before
    return {"ms_per_token": 1e3 * total / tokens, "MB_per_token": fetched / tokens / 1e6, "cache": how}


def window_probe(bundle, tokens: int = 20, fraction: float = 0.25, reuse: float = 0.8, seed: int = 0) -> dict:
    """FlashWeights under a budget of resident + reader buffers + half the store, 16 reads in flight:
    each token selects `fraction` of each layer's neurons, `reuse` of them active the token before
    (synthetic activity; real selections come from converters/sparsity.py)."""
    from ondevice.flash import FlashWeights

    e = bundle.manifest["flash"]
    budget = e["resident_bytes"] + 2 * 16 * 256 * 1024 + e["file_bytes"] // 2
    rng = np.random.default_rng(seed)
    n_ff, k = e["intermediate_size"], int(fraction * e["intermediate_size"])
    with FlashWeights(bundle, budget, window_tokens=5, inflight=16, direct=True) as fw:
        prev = [rng.choice(n_ff, k, replace=False) for _ in range(fw.layers)]
        t = time.perf_counter()
        for _ in range(tokens):
            active = []
            for p in prev:
                keep = rng.choice(p, int(reuse * k), replace=False)
                active.append(np.concatenate([keep, rng.choice(np.setdiff1d(np.arange(n_ff), keep),
                                                               k - len(keep), replace=False)]))
            prev = active
            fut = fw.prefetch(0, active[0])
            for layer in range(fw.layers):
                fw.load(layer, active[layer], fut)
                fut = fw.prefetch(layer + 1, active[layer + 1]) if layer + 1 < fw.layers else None
            fw.end_token()
        ms = 1e3 * (time.perf_counter() - t) / tokens
        return {"budget_MB": budget / 1e6, "ms_per_token": ms, **fw.counters()}


def raw_qd1_4k(path, n=4000) -> float:
    """Plain os.preadv of random 4 KiB pages one at a time (no pool): the device's qd1 IOPS."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    pages = os.stat(path).st_size // 4096
    rng = np.random.default_rng(0)
    offs = rng.integers(0, pages, n) * 4096
    t = time.perf_counter()
    for o in offs:
        os.preadv(fd, [buf], int(o))
    dt = time.perf_counter() - t
    os.close(fd)
    buf.close()
    return n / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle-q4")
    ap.add_argument("--bundle-fp16")
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--inflight", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--gaps", type=int, nargs="+", default=[8192, 32768, 131072],
                    help="max_gap values for the coalesced pattern (bytes read along between records)")
    ap.add_argument("--mmap-only", action="store_true", help="only the buffered mmap baseline")
    ap.add_argument("--window-probe", action="store_true",
                    help="only the DRAM window under a budget of resident + half the store (q4 bundle)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    if args.window_probe:
        print(json.dumps(window_probe(read_bundle(bundle_for("q4", args.bundle_q4), verify=False)), indent=1))
        return 0
    rows = []
    for encoding, given in (("q4", args.bundle_q4), ("fp16", args.bundle_fp16)):
        bundle = read_bundle(bundle_for(encoding, given), verify=False)
        entry = bundle.manifest["flash"]
        path = bundle.file(entry["file"])
        if encoding == "q4" and not args.mmap_only:
            iops = raw_qd1_4k(path)
            print(f"raw O_DIRECT 4 KiB random reads, one at a time, no pool: {iops:,.0f} reads/s", file=sys.stderr)
            rows.append({"encoding": "raw", "pattern": "4 KiB random qd1", "reads_per_s": iops})
        patterns = {} if args.mmap_only else {"one record per read": dict(max_read=256 * 1024, max_gap=-1),
                    **{f"coalesced, gap {g // 1024} KiB": dict(max_read=256 * 1024, max_gap=g) for g in args.gaps},
                    "whole layer": dict(max_read=256 * 1024, max_gap=1 << 30)}
        for name, opts in patterns.items():
            for fraction in (args.fractions if name != "whole layer" else [1.0]):
                for inflight in args.inflight:
                    tokens = max(2, args.tokens // 2) if name == "one record per read" else args.tokens
                    r = run_direct(path, entry, fraction, tokens, inflight, rng=rng, **opts)
                    row = {"encoding": encoding, "record_bytes": entry["record_size"], "pattern": name,
                           "ffn_fraction": fraction, "inflight": inflight, **{k: round(v, 2) for k, v in r.items()}}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
        for fraction in args.fractions:
            r = run_mmap_cold(path, entry, fraction, max(2, args.tokens // 2), rng)
            row = {"encoding": encoding, "pattern": "mmap cold", "ffn_fraction": fraction,
                   "ms_per_token": round(r["ms_per_token"], 2), "MB_per_token": round(r["MB_per_token"], 2),
                   "cache": r["cache"]}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print("| encoding | pattern | FFN/token | in flight | ms/token | MB read/token | reads/token | MB/s | reads/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["encoding"] == "raw":
            continue
        print(f"| {r['encoding']} | {r['pattern']} | {r['ffn_fraction']:.0%} | {r.get('inflight', '-')} | "
              f"{r['ms_per_token']:.1f} | {r.get('MB_per_token', float('nan')):.1f} | "
              f"{r.get('reads_per_token', 0):.0f} | "
              f"{r.get('MB_per_s', float('nan')):.0f} | {r.get('reads_per_s', 0):,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
