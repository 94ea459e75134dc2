"""ondevice side by side with llama.cpp and onnxruntime-genai on the same weights and prompt ids.

Each measurement runs in a fresh process, engines interleaved round by round (A B C A B C ...),
so drift on a noisy machine hits every engine alike; ratios are taken round by round.

    python benchmarks/compare.py [--rounds 5] [--prompt-len 512] [--n-decode 128] [--threads 2]
                                 [--engines ondevice llama.cpp ortgenai] [--json out.json]

Needs the optional peers: `pip install 'ondevice[bench]'` (llama-cpp-python builds from source,
~9 min) and a one-time build of the genai model (benchmarks/peers.py does it from the GGUF).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUNDLE_CACHE = Path.home() / ".cache" / "ondevice" / "bench"


def ondevice_run(bundle: str, prompt_ids: list[int], n_decode: int, threads: int) -> dict:
    """Same contract as the peers' functions: greedy, exactly n_decode tokens."""
    import time

    import ondevice

    t = time.perf_counter()
    model = ondevice.load(bundle, threads=threads)
    load_s = time.perf_counter() - t
    model.generate(prompt_ids[:16], max_tokens=8, temperature=0, ignore_eos=True)  # warm-up
    model.reset()
    g = model.generate(prompt_ids, max_tokens=n_decode, temperature=0, ignore_eos=True)
    return {"load_s": load_s, "ttft_s": g.ttft_s, "prefill_tok_s": g.prefill_tok_s,
            "decode_tok_s": g.decode_tok_s, "token_ids": g.token_ids}


def bundle_for(gguf: str, compute: str) -> str:
    import ondevice

    out = BUNDLE_CACHE / f"smollm2-{compute}.bundle"
    if not out.exists():
        ondevice.convert(gguf, out, compute=compute, progress=False)
    return str(out)


def one(engine: str, args) -> dict:
    sys.path.insert(0, str(HERE))
    import peers

    prompt = peers.synthetic_prompt_ids(args.gguf, args.prompt_len)
    if engine == "ondevice":
        return ondevice_run(bundle_for(args.gguf, "float"), prompt, args.n_decode, args.threads)
    if engine == "ondevice-int8":
        return ondevice_run(bundle_for(args.gguf, "int8"), prompt, args.n_decode, args.threads)
    if engine == "llama.cpp":
        return peers.llama_cpp_decode(args.gguf, prompt, args.n_decode, args.threads)
    if engine == "ortgenai":
        return peers.ortgenai_decode(str(peers.prepare_peers(args.gguf)), prompt, args.n_decode, args.threads)
    raise ValueError(f"unknown engine {engine}")


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    import peers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=peers.DEFAULT_GGUF)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--n-decode", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["ondevice", "llama.cpp", "ortgenai"])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write all figures to this file")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args)))
        return 0

    for e in args.engines:  # build bundles / genai model once, outside the timed runs
        if e.startswith("ondevice"):
            bundle_for(args.gguf, "int8" if e == "ondevice-int8" else "float")
    if "ortgenai" in args.engines:
        peers.prepare_peers(args.gguf)

    runs: dict[str, list[dict]] = {e: [] for e in args.engines}
    for r in range(args.rounds):
        for e in args.engines:
            cmd = [sys.executable, __file__, "--one", e, "--gguf", args.gguf, "--prompt-len", str(args.prompt_len),
                   "--n-decode", str(args.n_decode), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[e].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {e:>14}: decode {runs[e][-1]['decode_tok_s']:7.1f} tok/s  "
                  f"prefill {runs[e][-1]['prefill_tok_s']:7.1f} tok/s", file=sys.stderr)

    base = args.engines[0]
    report = {"prompt_len": args.prompt_len, "n_decode": args.n_decode, "threads": args.threads,
              "rounds": args.rounds, "engines": {}}
    for e, rs in runs.items():
        entry = {k: statistics.median(x[k] for x in rs) for k in ("decode_tok_s", "prefill_tok_s", "ttft_s", "load_s")}
        if e != base:
            for k in ("decode_tok_s", "prefill_tok_s"):
                entry[f"{base}/{e} {k}"] = statistics.median(
                    a[k] / b[k] for a, b in zip(runs[base], rs))
            same = sum(x == y for x, y in zip(runs[base][0]["token_ids"][:32], rs[0]["token_ids"][:32]))
            entry["greedy ids equal to " + base + " (of first 32)"] = same
        report["engines"][e] = entry
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"report": report, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
