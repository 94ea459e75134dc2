"""Prefill side by side: one-shot, fixed-size chunks (the NPU path's static shapes), llama.cpp.

Prefill tok/s at each prompt length and TTFT (template + tokenizer + prefill + first token) for a
~700-token prompt; ondevice variants alternate in one process (A B A B ...), llama-cpp-python runs
on the same GGUF and the same prompt ids.

    python benchmarks/prefill.py BUNDLE [--chunks 128 256] [--lengths 512 1024] [--ttft-tokens 700]
        [--rounds 3] [--threads 2] [--llama-cpp [GGUF]]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ondevice
from ondevice.evaluate import bench_prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--chunks", type=int, nargs="*", default=[128, 256])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--ttft-tokens", type=int, default=700)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp", nargs="?", const="default", help="also llama-cpp-python on this GGUF")
    args = ap.parse_args()
    model = ondevice.load(args.bundle, threads=args.threads)
    backend = model.backend
    variants = {"one-shot": None, **{f"chunks of {c}": c for c in args.chunks}}
    rows: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    backend.ensure_capacity(max(args.lengths + [args.ttft_tokens]) + 8)
    for _ in range(args.rounds):
        for name, chunk in variants.items():
            backend.chunk_size = chunk
            for n in args.lengths:
                ids = bench_prompt(model, n)
                t = time.perf_counter()
                backend.forward(ids, 0)
                rows[name].setdefault(f"prefill {n} tok/s", []).append(n / (time.perf_counter() - t))
            ids = bench_prompt(model, args.ttft_tokens)
            model.reset()
            g = model.generate(ids, max_tokens=1, temperature=0)
            rows[name].setdefault(f"TTFT {args.ttft_tokens} s", []).append(g.ttft_s)
    backend.chunk_size = None
    if args.llama_cpp:
        import peers

        gguf = peers.DEFAULT_GGUF if args.llama_cpp == "default" else args.llama_cpp
        for n in args.lengths + [args.ttft_tokens]:
            ids = bench_prompt(model, n)
            runs = [peers.llama_cpp_decode(gguf, ids, n_decode=2, threads=args.threads) for _ in range(args.rounds)]
            key = f"prefill {n} tok/s" if n in args.lengths else f"TTFT {n} s"
            rows.setdefault("llama.cpp", {})[key] = [r["prefill_tok_s"] if "prefill" in key else r["ttft_s"]
                                                     for r in runs]
    keys = list(rows["one-shot"])
    print(f"{'':16s}" + "".join(f"{k:>20s}" for k in keys))
    base = {k: statistics.median(rows["one-shot"][k]) for k in keys}
    for name, figures in rows.items():
        cells = []
        for k in keys:
            v = statistics.median(figures[k])
            ratio = v / base[k] if "tok/s" in k else base[k] / v
            cells.append(f"{v:10.3g} ({ratio:4.2f}x)")
        print(f"{name:16s}" + "".join(f"{c:>20s}" for c in cells))


if __name__ == "__main__":
    main()
