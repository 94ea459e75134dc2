"""Decode with the FFN weights in storage under a DRAM budget (flash windowing), against the baselines.

Every configuration runs in its own process (peak RSS is the process's own), on a flash bundle of
SmolLM2 (`ondevice convert smollm2-135m B --flash`):

- in-memory:   the one-graph engine, the whole FFN in DRAM (no budget);
- window:      the budget holds the resident weights and a window of `dram` x the FFN's neurons
               (decoded to fp16); each token keeps its top `select` x neurons by |silu(gate)|; a
               token reads from storage, with direct I/O, only the neurons its window lacks;
- naive:       same selection, no window: every FFN weight of every layer read with direct I/O for
               every token (the issue's naive loading);
- mmap cold:   the window, but records read through a memory map of the store, its pages dropped
               from the page cache (posix_fadvise DONTNEED, and drop_caches when writable) before.

Per configuration: decode tok/s (greedy, after a chat prompt), bytes and reads per decoded token,
window hit rate, I/O wait share of decode time, peak RSS, and perplexity on held-out text (the second
half of the shipped calibration text, windows of 256, computed by the same engine: the prompt path
keeps each token's own top neurons too). Then a cost model with a device profile's figures:

    t_compute = (the host's decode time per token - its I/O wait) * host memory GB/s / device memory GB/s
    t_io      = max(bytes / device seq read, reads * 4 KiB / device random 4K read)
    t_token   = max(t_compute, t_io)      (reads run ahead of compute: whole sections, one layer early)

checked against the host's own profile (laptop-x86-2core: the first column) before it is applied to
phones. The naive baseline has no read-ahead across layers: t_token = t_compute + t_io there.

    python benchmarks/flash_decode.py BUNDLE [--tokens 64] [--dram 0.1 0.25 0.5 0.75 1]
        [--methods top-k threshold predictor] [--json out.json]

The table's rows keep the same share of neurons per token as the window holds (select = dram);
methods: top-k |silu(gate)|, per-layer calibrated thresholds on it, the low-rank predictor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from flash_io import drop_cache  # benchmarks/flash_io.py: fadvise DONTNEED (+ drop_caches when writable)

HERE = Path(__file__).resolve()
PROMPT = "Explain how a bicycle stays upright when it is moving."


def run_one(bundle: str, mode: str, budget: int | None, select: float, method: str, tokens: int,
            ppl_tokens: int) -> dict:
    """In this process: load, perplexity, then decode; the figures as a dict."""
    import resource
    import time

    import ondevice
    from ondevice.bundle import read_bundle
    from ondevice.converters import calibrate
    from ondevice.evaluate import perplexity
    from ondevice.runtimes.flash_mlp import FlashMlp

    started = time.perf_counter()
    model = ondevice.load(bundle, threads=1 if mode != "in-memory" else None,
                          **({} if mode == "in-memory" else {"dram_budget": budget, "ffn_fraction": select,
                                                              "ffn_select": method}))
    if mode in ("naive", "mmap cold"):
        layers = model.backend.flash_layers
        layers.mlp.close()
        layers.mlp = FlashMlp(read_bundle(bundle, verify=False), budget, fraction=select, select=method,
                              naive=mode == "naive", use_mmap=mode == "mmap cold",
                              prefetch=mode != "mmap cold")  # faults read a map in place: nothing to get ahead of
    load_s = time.perf_counter() - started
    out = {"mode": mode, "select": select, "method": method, "budget_mb": budget / 1e6 if budget else None, "load_s": load_s}
    model.generate(PROMPT, max_tokens=4, temperature=0)  # warm up the sessions
    model.reset()
    mlp = getattr(model.backend.flash_layers, "mlp", None) if model.backend.flash_layers else None
    wait0 = mlp.weights.io_wait_s if mlp else 0.0
    g = model.generate(PROMPT, max_tokens=tokens, temperature=0, ignore_eos=True)
    out.update(decode_tok_s=g.decode_tok_s, decode_s=g.decode_s, ttft_s=g.ttft_s, text=g.text[:120])
    if mlp is not None:
        c = mlp.counters()
        steps = [t for t, s in zip(mlp.weights.reader.stats.per_token, mlp.streamed) if not s][-(tokens - 1):]
        n = max(1, len(steps))
        out.update(bytes_per_token=sum(t["bytes_read"] for t in steps) / n,
                   reads_per_token=sum(t["reads"] for t in steps) / n,
                   records_per_token=sum(t["records"] for t in steps) / n,
                   hit_rate=c["window_hit_rate"], io_wait_share=(mlp.weights.io_wait_s - wait0) / g.decode_s,
                   slots=c["slots_per_layer"], dram_mb=c["dram_bytes"] / 1e6, direct_io=c["direct_io"])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids = model.encode_prompt(calibrate.calibration_text(), raw=True)
    held_out = ids[len(ids) // 2:][:ppl_tokens]
    out["perplexity"] = perplexity(model, held_out, window=256)["perplexity"]
    return out


def child(args) -> dict:
    cmd = [sys.executable, str(HERE), args.bundle, "--child", args.mode_, "--budget", str(args.budget_ or 0),
           "--select", str(args.select_), "--method", args.method_, "--tokens", str(args.tokens),
           "--ppl-tokens", str(args.ppl_tokens)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"mode": args.mode_, "select": args.select_, "error": res.stderr.strip().splitlines()[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def cost_model(row: dict, host: dict, device: dict) -> float | None:
    """Predicted decode tok/s of a configuration on `device`, from its host figures."""
    if not row.get("decode_tok_s"):
        return None
    per_token = 1.0 / row["decode_tok_s"]
    io = per_token * row.get("io_wait_share", 0.0)
    compute = (per_token - io) * host["memory_bandwidth_gb_s"] / (device.get("memory_bandwidth_gb_s")
                                                                   or host["memory_bandwidth_gb_s"])
    st = device["storage"]
    io_dev = max(row.get("bytes_per_token", 0.0) / (st["seq_read_mb_s"] * 1e6),
                 row.get("reads_per_token", 0.0) * 4096 / (st["rand_4k_read_mb_s"] * 1e6))
    return 1.0 / (compute + io_dev if row["mode"] == "naive" else max(compute, io_dev))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--dram", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 1.0],
                   help="FFN fractions the window holds, for the table")
    p.add_argument("--reference", type=float, default=0.5, help="the DRAM fraction of the baselines' comparison")
    p.add_argument("--profiles", nargs="+", default=["laptop-x86-2core", "snapdragon-8gen3-phone",
                                                     "apple-a17pro-iphone", "generic-arm64-cpu"])
    p.add_argument("--json")
    p.add_argument("--child", dest="mode_", help=argparse.SUPPRESS)
    p.add_argument("--budget", dest="budget_", type=int, help=argparse.SUPPRESS)
    p.add_argument("--select", dest="select_", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--method", dest="method_", default="top-k", help=argparse.SUPPRESS)
    p.add_argument("--methods", nargs="+", default=["top-k", "threshold", "predictor"],
                   help="neuron selections for the table (predictor: convert with --flash-predictor)")
    args = p.parse_args()
    if args.mode_:
        print(json.dumps(run_one(args.bundle, args.mode_, args.budget_ or None, args.select_, args.method_,
                                 args.tokens, args.ppl_tokens)))
        return

    from ondevice.bundle import read_bundle
    from ondevice.profiles import load_profile
    from ondevice.runtimes.flash_mlp import budget_for

    bundle = read_bundle(args.bundle, verify=False)
    entry = bundle.manifest["flash"]
    store = bundle.file(entry["file"])
    ref_budget = budget_for(entry, args.reference)

    def run(mode: str, budget: int | None, select: float, method: str = "top-k") -> dict:
        args.mode_, args.budget_, args.select_, args.method_ = mode, budget, select, method
        if mode == "mmap cold":
            drop_cache(store)
        row = child(args)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        return row

    print(f"reference budget: resident {entry['resident_bytes'] / 1e6:.1f} MB + window of {args.reference:.0%} "
          f"of the FFN neurons = {ref_budget / 1e6:.1f} MB", flush=True)
    rows = {"in-memory": run("in-memory", None, 1.0)}
    for mode in ("window", "naive", "mmap cold"):
        rows[mode] = run(mode, ref_budget, args.reference)
    methods = [m for m in args.methods if m != "predictor" or isinstance(entry.get("predictor"), dict)]
    table = [run("window", budget_for(entry, f, select=m), f, m) for f in args.dram for m in methods
             if f < 1.0 or m == methods[0]]  # every neuron: the methods agree
    host = load_profile("laptop-x86-2core")
    phones = {name: load_profile(name) for name in args.profiles}
    for row in [*rows.values(), *table]:
        row["predicted_tok_s"] = {name: cost_model(row, host, prof) for name, prof in phones.items()}
    report = {"reference": rows, "table": table, "reference_budget_mb": ref_budget / 1e6,
              "resident_mb": entry["resident_bytes"] / 1e6, "ffn_store_mb": entry["file_bytes"] / 1e6}
    mem = rows["in-memory"]
    print("\n| config | decode tok/s | vs in-memory | MB read/token | reads/token | hit rate | I/O wait "
          "| peak RSS MB | perplexity |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in [*rows.items(), *((f"window {r['select']:.0%} {r['method']}", r) for r in table)]:
        if "error" in r:
            print(f"| {name} | {r['error']} |")
            continue
        print(f"| {name} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / mem['decode_tok_s']:.2f}x "
              f"| {r.get('bytes_per_token', 0) / 1e6:.2f} | {r.get('reads_per_token', 0):.0f} "
              f"| {100 * r.get('hit_rate', 1):.0f}% | {100 * r.get('io_wait_share', 0):.0f}% "
              f"| {r['peak_rss_mb']:.0f} | {r['perplexity']:.3f} |")
    print("\npredicted decode tok/s (cost model):")
    print("| config | " + " | ".join(phones) + " |")
    print("|---|" + "---|" * len(phones))
    for name, r in [*rows.items(), *((f"window {r['select']:.0%} {r['method']}", r) for r in table)]:
        if "error" not in r:
            print(f"| {name} | " + " | ".join(f"{v:.1f}" if v else "-" for v in r["predicted_tok_s"].values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
