"""The int8 prefill graph (convert --int8-prefill) against the float graph, on real text and in speed.

agreement: converts the source once per setting (no outliers / shadow outliers / 16-bit halves ...),
runs the held-out half of the converter's calibration text through the int8 graph in chunks and
through the float graph in one shot, and reports how often the top-1 token agrees (plus the first
16 greedy tokens, prefilled by each graph and decoded by the float graph, on a few prompts).

speed: prefill tok/s at 512 / 1024 tokens and TTFT for ~700 tokens, int8 chunks vs the plain one-shot
float prefill; every measurement in a fresh process, settings interleaved, medians of the rounds.

    python benchmarks/int8_prefill.py agreement [SOURCE] [--settings a8w8-none a8w8 ...]
    python benchmarks/int8_prefill.py speed BUNDLE [--rounds 3] [--chunk 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import ondevice
from ondevice.converters.int8_prefill import held_out_ids

# name -> make_plan options
SETTINGS = {
    "a8w8-none": {"ratio": 0},  # plain per-tensor static int8 everywhere, no outlier channels
    "a8w8": "a8w8",  # + shadow outliers (channels over 6x the median range, in float)
    "a8w8-r3": {"ratio": 3},  # more outlier channels
    "a16w8": "a16w8",  # 16-bit activations (two int8 halves, 4x headroom), int8 weights
    "a16w8-migrate": {"act_bits": 16, "headroom": 4.0, "migrate": 0.5},  # weight range moved into activations
    "a16w16-h1": {"act_bits": 16, "weight_bits": 16},  # no headroom: held-out values beyond the range saturate
    "a16w16-none": {"act_bits": 16, "weight_bits": 16, "headroom": 4.0, "ratio": 0},  # no outlier channels
    "a16w16": "a16w16",  # the default: 16-bit activations and weights, 4x headroom, shadow outliers
}
# per kind of linear: a16w16 with one kind's activations (a8-KIND) or weights (w8-KIND) in plain int8
KINDS = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
for _kind in KINDS:
    _short = _kind.split(".")[1].removesuffix("_proj")
    SETTINGS[f"a8-{_short}"] = {"act_bits": {k: 8 if k == _kind else 16 for k in KINDS}, "weight_bits": 16,
                                "headroom": 4.0}
    SETTINGS[f"w8-{_short}"] = {"act_bits": 16, "weight_bits": {k: 8 if k == _kind else 16 for k in KINDS},
                                "headroom": 4.0}
PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
           "Explain photosynthesis in one sentence.", "Give me three tips for writing clear code."]
WINDOW = 256


def agreement(float_model: ondevice.Model, int8_model: ondevice.Model, ids: list[int]) -> tuple[float, int]:
    """Top-1 agreement of the int8 chunked prefill with the float one-shot prefill over windows of ids."""
    same = total = 0
    for start in range(0, len(ids) - WINDOW + 1, WINDOW):
        window = ids[start:start + WINDOW]
        ref = float_model.backend.run(np.array(window), 0).argmax(-1)
        got = int8_model.backend.forward(window, 0, all_logits=True).argmax(-1)
        same += int((ref == got).sum())
        total += len(window)
    return same / total, total


def greedy_matches(float_model: ondevice.Model, int8_model: ondevice.Model, n: int = 16) -> list[int]:
    """For each prompt, how many of the first n greedy tokens the int8-prefilled run shares with float."""
    out = []
    for p in PROMPTS:
        ref = float_model.generate(p, max_tokens=n, temperature=0, ignore_eos=True).token_ids
        got = int8_model.generate(p, max_tokens=n, temperature=0, ignore_eos=True).token_ids
        float_model.reset(), int8_model.reset()
        out.append(next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), n))
    return out


def cmd_agreement(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            bundle = ondevice.convert(args.source, Path(tmp) / name, int8_prefill=SETTINGS[name], force=True,
                                      progress=False)
            f = ondevice.load(bundle, threads=args.threads)
            q = ondevice.load(bundle, threads=args.threads, int8_prefill=True)
            # chunks of one token for the greedy check: every prompt token runs on the int8 graph
            # (a partial chunk of a short prompt would run on the float graph)
            q1 = ondevice.load(bundle, threads=args.threads, int8_prefill=True, prefill_chunk=1)
            ids = held_out_ids((bundle / "tokenizer.json").read_text())
            agree, n = agreement(f, q, ids)
            summary = json.loads((bundle / "manifest.json").read_text())["backends"]["onnx"]["prefill_int8"]
            outliers = summary["quantization"]["outlier_channels_total"]
            print(f"{name:12s} top-1 agreement {100 * agree:6.2f}% over {n} held-out positions; "
                  f"outlier channels {outliers}; first-16 greedy tokens equal on "
                  f"{greedy_matches(f, q1)} (of 16) for {len(PROMPTS)} prompts", flush=True)
            del f, q, q1


def measure(bundle: str, mode: str, n: int, chunk: int, threads: int) -> float:
    """One figure in this process: prefill tok/s (n tokens) or, for n < 0, TTFT of -n tokens."""
    from ondevice.evaluate import bench_prompt

    model = ondevice.load(bundle, threads=threads, int8_prefill=mode == "int8",
                          prefill_chunk=chunk if mode == "int8" else None)
    length = abs(n)
    model.backend.ensure_capacity(length + 8)
    ids = bench_prompt(model, length)
    model.backend.forward(ids[:64], 0)  # warm-up (first-run allocations)
    if n < 0:
        model.reset()
        return model.generate(ids, max_tokens=1, temperature=0).ttft_s
    t = time.perf_counter()
    model.backend.forward(ids, 0)
    return length / (time.perf_counter() - t)


def cmd_speed(args) -> None:
    figures: dict[tuple[str, int], list[float]] = {}
    points = [*args.lengths, -args.ttft_tokens]
    for _ in range(args.rounds):
        for n in points:
            for mode in ("float", "int8"):  # interleaved, each in a fresh process
                out = subprocess.run([sys.executable, __file__, "_one", args.bundle, mode, str(n), str(args.chunk),
                                      str(args.threads)], capture_output=True, text=True, check=True).stdout
                figures.setdefault((mode, n), []).append(float(out.strip().splitlines()[-1]))
    for n in points:
        f, q = (statistics.median(figures[(m, n)]) for m in ("float", "int8"))
        what = f"prefill {n} tok/s" if n > 0 else f"TTFT {-n} s"
        ratio = q / f if n > 0 else f / q
        print(f"{what:18s} float one-shot {f:8.3f} {figures[('float', n)]}  int8 chunks of {args.chunk} "
              f"{q:8.3f} {figures[('int8', n)]}  -> {ratio:.2f}x")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        bundle, mode, n, chunk, threads = sys.argv[2:7]
        print(measure(bundle, mode, int(n), int(chunk), int(threads)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("agreement")
    a.add_argument("source", nargs="?", default="smollm2-135m")
    a.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    a.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("speed")
    s.add_argument("bundle")
    s.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    s.add_argument("--ttft-tokens", type=int, default=700)
    s.add_argument("--chunk", type=int, default=256)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cmd_agreement(args) if args.cmd == "agreement" else cmd_speed(args)


if __name__ == "__main__":
    main()
