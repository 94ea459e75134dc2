#!/usr/bin/env python
"""Soak test: one loaded model generates for many minutes; RSS growth and tok/s drift.

    python scripts/soak.py --bundle smollm2.bundle [--minutes 10] [--warmup 60] [--seed 0] [--json]

Calls, mixed at random (seeded): plain generates on prompts of 3-600 words, multi-turn chats (the
messages grow turn by turn until the prompt passes --chat-tokens, then a new chat starts, so the
load is stationary), streams cancelled after 1-12 pieces, prompt-lookup speculative generates, an
occasional reset(); max_tokens 1-96, greedy or sampled.

Warm-up, excluded from the growth figure and reported separately:
1. a prompt as deep as any call reaches: the KV cache's pages and ONNX Runtime's arena at their size;
2. a sweep of the embedding table: the runtime drops the bundle's file pages after load
   (runtimes/memory.py) and the embedding gather faults them back row by row as tokens are seen,
   up to the whole table (~32 MB for SmolLM2); the sweep brings them all back at once;
3. --warmup seconds of the mixed calls (after the sweep).
Then RSS (VmRSS, split into heap RssAnon and file pages RssFile) is read after every call. A greedy
128-token probe runs after load and then every --probe-every seconds (default 60) and at the end:
its decode tok/s is the controlled drift figure (the calls' own tok/s depends on their mix), and
its tokens must never change. Exit status 1 when RSS grew by --max-growth-mb (default 5) or more
over the measured minutes, or a probe's tokens changed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time

WORDS = ("the a of and to in is that it for on with as was by at from this be or are an which one all "
         "time river city light water music garden history science number machine language people "
         "morning winter ocean mountain story letter window market bridge engine forest planet "
         "quickly slowly carefully never always often before after because although while "
         "build write read explain remember travel compare measure discover protect").split()
TOPICS = ["What is the capital of France?", "Give me three tips for writing clear code.",
          "Write a haiku about the sea.", "Explain what a hash table is in two sentences.",
          "List five fruits.", "Why is the sky blue?", "Translate 'good morning' into Spanish and German.",
          "Summarize the plot of Romeo and Juliet."]
FOLLOW_UPS = ["Tell me more.", "Can you make it shorter?", "Why?", "Give an example.", "And then?",
              "Say it differently.", "Thanks! One more, please."]
PROBE = "Write a short story about a lighthouse keeper who finds a message in a bottle."
KINDS = {"generate": 4, "chat": 4, "stream_cancelled": 3, "lookup": 1, "reset": 0.3}
PAGE = 4096


def memory() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile of this process, in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024 / 1e6
    return out


def passage(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def probe(model) -> tuple[list[int], float]:
    model.reset()
    g = model.generate(PROBE, max_tokens=128, temperature=0, ignore_eos=True)
    return g.token_ids, g.decode_tok_s


def sweep_step(bundle) -> int:
    """Every how many token ids the sweep needs to touch each page of the embedding table at least once."""
    kind = str(bundle.manifest.get("quantization", {}).get("tensors", {}).get("embedding", "")).lower()
    width = 1 if ("q8" in kind or "int8" in kind) else 2 if ("16" in kind) else 4  # bytes per weight
    row = int(bundle.config["hidden_size"]) * width
    return max(1, PAGE // row)  # rows `step` apart leave gaps under a page


def sweep_embedding(model, chunk: int = 512) -> int:
    """Run token ids across the whole vocabulary (prefill only); returns the number of calls."""
    ids = list(range(0, int(model.bundle.config["vocab_size"]), sweep_step(model.bundle)))
    chunk = min(chunk, model.max_context - 2)
    for start in range(0, len(ids), chunk):
        model.reset()
        model.generate(ids[start:start + chunk], max_tokens=1, temperature=0)
    model.reset()
    return (len(ids) + chunk - 1) // chunk


class Soak:
    """The mixed calls, with per-minute token counts (bounded state: the soak must not grow by itself)."""

    def __init__(self, model, rng: random.Random, chat_tokens: int):
        self.model, self.rng, self.chat_tokens = model, rng, chat_tokens
        self.lookup, model.speculator = model.speculator, None  # on for "lookup" calls only
        self.messages: list[dict] = []
        self.calls = dict.fromkeys([*KINDS, "overflow"], 0)
        self.minutes: dict[int, list] = {}  # minute -> [tokens, call seconds, decoded tokens, decode seconds]
        self.start = time.perf_counter()
        self.last_minute = 1 << 30  # calls that end after the run's last minute count in it

    def restart(self, minutes: float = 1 << 30) -> None:
        self.calls = dict.fromkeys(self.calls, 0)
        self.minutes = {}
        self.start = time.perf_counter()
        self.last_minute = max(0, math.ceil(minutes) - 1)

    def sampling(self) -> dict:
        r = self.rng
        opts = {"max_tokens": r.choice([1, 2, 8, 16, 32, 64, r.randint(1, 96)])}
        if r.random() < 0.5:
            opts.update(temperature=0.7, top_p=0.9, seed=r.randrange(1 << 30))
        else:
            opts.update(temperature=0)
        return opts

    def prompt(self) -> str:
        r = self.rng
        words = r.choice([3, 10, 30, 100, r.randint(3, min(600, self.chat_tokens // 2))])
        return f"{r.choice(TOPICS)} Context: {passage(r, words)}"

    def step(self) -> None:
        from ondevice import ContextOverflowError

        kind = self.rng.choices(list(KINDS), list(KINDS.values()))[0]
        t0 = time.perf_counter()
        try:
            g, tokens = self.call(kind)
        except ContextOverflowError:
            self.calls["overflow"] += 1
            self.messages = []
            return
        self.calls[kind] += 1
        if tokens:
            minute = min(int((time.perf_counter() - self.start) // 60), self.last_minute)
            acc = self.minutes.setdefault(minute, [0, 0.0, 0, 0.0])
            acc[0] += tokens
            acc[1] += time.perf_counter() - t0
            if g is not None and len(g.token_ids) > 1:
                acc[2] += len(g.token_ids) - 1
                acc[3] += g.decode_s

    def call(self, kind: str):
        """Run one call; returns (the Generation or None, tokens generated)."""
        r, m = self.rng, self.model
        if kind == "reset":
            m.reset()
            return None, 0
        if kind == "generate":
            g = m.generate(self.prompt(), **self.sampling())
            return g, len(g.token_ids)
        if kind == "chat":
            if not self.messages or len(m.encode_prompt(self.messages)) > self.chat_tokens:
                self.messages = [{"role": "user", "content": self.prompt()}]
            else:
                self.messages.append({"role": "user", "content": r.choice(FOLLOW_UPS)})
            g = m.generate(self.messages, **self.sampling())
            self.messages.append({"role": "assistant", "content": g.text})
            return g, len(g.token_ids)
        if kind == "lookup":
            m.speculator = self.lookup
            try:
                text = passage(r, r.randint(20, 120))
                g = m.generate(f"Repeat this text word for word: {text}", max_tokens=r.randint(16, 64),
                               temperature=0)
            finally:
                m.speculator = None
            return g, len(g.token_ids)
        pieces, stop_after = 0, r.randint(1, 12)
        stream = m.stream(self.prompt(), **self.sampling())
        try:
            for _ in stream:
                pieces += 1
                if pieces >= stop_after:
                    break  # the caller walks away mid-answer
        finally:
            stream.close()
        return None, pieces  # about one piece per token

    def rates(self, minute: int) -> tuple[float, float]:
        """(generated tok/s over call time, decode tok/s) of the calls that ended in that minute."""
        tokens, busy, decoded, decode_s = self.minutes.get(minute, [0, 0.0, 0, 0.0])
        return (tokens / busy if busy else 0.0), (decoded / decode_s if decode_s else 0.0)


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt, mr = sum(t for t, _ in points) / n, sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mr) for t, v in points) / var if var else 0.0


def run(args: argparse.Namespace) -> dict:
    import ondevice

    load_avg_start = os.getloadavg()
    model = ondevice.load(args.bundle, threads=args.threads, lookup=True)
    after_load = memory()
    chat_tokens = max(64, min(args.chat_tokens, model.max_context - 240))
    soak = Soak(model, random.Random(args.seed), chat_tokens)
    probe_tokens, probe_after_load = probe(model)

    t_warm = time.perf_counter()
    deepest = min(model.max_context - 4, chat_tokens + 160)  # a chat past the limit by one turn + 96 tokens
    model.generate(list(range(10, 10 + deepest)), max_tokens=4, temperature=0)
    model.reset()
    sweep_calls = sweep_embedding(model) if args.sweep else 0
    after_sweep = memory()
    soak.restart()
    while time.perf_counter() - soak.start < args.warmup:
        soak.step()
    warm_calls = sum(soak.calls.values())
    gc.collect()
    warm_s = time.perf_counter() - t_warm

    start = memory()
    soak.restart(args.minutes)
    peak, samples = dict(start), [{"t": 0.0, **{k: round(v, 2) for k, v in start.items()}}]
    probes: list[dict] = []
    next_sample, next_probe, duration = args.sample_every, 0.0, 60 * args.minutes
    while (elapsed := time.perf_counter() - soak.start) < duration:
        if elapsed >= next_probe:
            tokens, tok_s = probe(model)
            probes.append({"t": round(elapsed, 1), "decode_tok_s": round(tok_s, 1), "same": tokens == probe_tokens})
            next_probe += args.probe_every
        soak.step()
        now = memory()
        peak = {k: max(peak[k], now[k]) for k in peak}
        if elapsed >= next_sample:
            samples.append({"t": round(elapsed, 1), **{k: round(v, 2) for k, v in now.items()}})
            tok_s = soak.rates(int(elapsed // 60))[0]
            print(f"[{elapsed:6.0f} s] RSS {now['VmRSS']:7.2f} MB (heap {now['RssAnon']:.2f}, file "
                  f"{now['RssFile']:.2f})  {tok_s:5.1f} tok/s  {sum(soak.calls.values())} calls",
                  file=sys.stderr, flush=True)
            next_sample += args.sample_every
    measured_s = time.perf_counter() - soak.start
    gc.collect()
    end = memory()
    tokens, tok_s = probe(model)
    probes.append({"t": round(measured_s, 1), "decode_tok_s": round(tok_s, 1), "same": tokens == probe_tokens})
    probe_start, probe_end = probes[0]["decode_tok_s"], probes[-1]["decode_tok_s"]

    last = max(soak.minutes) if soak.minutes else 0
    first_tok_s, first_decode = soak.rates(0)
    last_tok_s, last_decode = soak.rates(last)
    report = {
        "bundle": str(args.bundle), "seed": args.seed, "threads": args.threads,
        "minutes": round(measured_s / 60, 2), "calls": sum(soak.calls.values()), "calls_by_kind": soak.calls,
        "warmup": {"seconds": round(warm_s, 1), "calls": warm_calls,
                   "sweep_calls": sweep_calls, "rss_after_load_mb": round(after_load["VmRSS"], 2),
                   "rss_after_sweep_mb": round(after_sweep["VmRSS"], 2),
                   "rss_growth_mb": round(start["VmRSS"] - after_load["VmRSS"], 2)},
        "rss_start_mb": round(start["VmRSS"], 2), "rss_end_mb": round(end["VmRSS"], 2),
        "rss_growth_mb": round(end["VmRSS"] - start["VmRSS"], 2), "rss_peak_mb": round(peak["VmRSS"], 2),
        "heap_growth_mb": round(end["RssAnon"] - start["RssAnon"], 2),
        "file_growth_mb": round(end["RssFile"] - start["RssFile"], 2),
        "rss_slope_mb_per_min": round(slope_mb_per_min([(s["t"], s["VmRSS"]) for s in samples]), 3),
        "tok_s_first_minute": round(first_tok_s, 1), "tok_s_last_minute": round(last_tok_s, 1),
        "decode_tok_s_first_minute": round(first_decode, 1), "decode_tok_s_last_minute": round(last_decode, 1),
        "probe_decode_tok_s_start": probe_start, "probe_decode_tok_s_end": probe_end,
        "probe_decode_tok_s_after_load": round(probe_after_load, 1),
        "probe_unchanged": all(p["same"] for p in probes), "probes": probes,
        "per_minute": [{"minute": k, "tok_s": round(soak.rates(k)[0], 1), "decode_tok_s": round(soak.rates(k)[1], 1)}
                       for k in sorted(soak.minutes)],
        "load_avg_start": [round(x, 2) for x in load_avg_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "max_growth_mb": args.max_growth_mb, "samples": samples,
    }
    report["tok_s_drift_pct"] = _drift(first_tok_s, last_tok_s)
    report["decode_drift_pct"] = _drift(first_decode, last_decode)
    report["probe_drift_pct"] = _drift(probe_start, probe_end)
    report["ok"] = report["rss_growth_mb"] < args.max_growth_mb and report["probe_unchanged"]
    return report


def _drift(first: float, last: float) -> float | None:
    return round(100 * (last - first) / first, 1) if first else None


def summary(r: dict) -> str:
    w = r["warmup"]
    return "\n".join([
        f"{r['calls']} calls in {r['minutes']} min: {r['calls_by_kind']}",
        f"warm-up {w['seconds']} s ({w['sweep_calls']} sweep + {w['calls']} mixed calls): RSS after load "
        f"{w['rss_after_load_mb']} MB -> {r['rss_start_mb']} MB ({w['rss_growth_mb']:+} MB; after the deep prompt"
        f"{' and the sweep' if w['sweep_calls'] else ''} {w['rss_after_sweep_mb']} MB)",
        f"RSS start {r['rss_start_mb']} MB, end {r['rss_end_mb']} MB, growth {r['rss_growth_mb']:+} MB "
        f"(heap {r['heap_growth_mb']:+}, file pages {r['file_growth_mb']:+}), peak {r['rss_peak_mb']} MB, "
        f"trend {r['rss_slope_mb_per_min']:+} MB/min",
        f"tok/s first minute {r['tok_s_first_minute']}, last minute {r['tok_s_last_minute']} "
        f"(drift {r['tok_s_drift_pct']}%); decode tok/s {r['decode_tok_s_first_minute']} -> "
        f"{r['decode_tok_s_last_minute']} ({r['decode_drift_pct']}%)",
        f"probe (greedy, 128 tokens, {len(r['probes'])} runs) decode tok/s {r['probe_decode_tok_s_start']} -> "
        f"{r['probe_decode_tok_s_end']} ({r['probe_drift_pct']}%; range "
        f"{min(p['decode_tok_s'] for p in r['probes'])}-{max(p['decode_tok_s'] for p in r['probes'])}), "
        f"tokens unchanged: {r['probe_unchanged']}",
        f"load average start {r['load_avg_start']}, end {r['load_avg_end']}",
        ("OK" if r["ok"] else "FAIL") + f" (growth limit {r['max_growth_mb']} MB)",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--minutes", type=float, default=10, help="measured minutes after the warm-up (default 10)")
    ap.add_argument("--warmup", type=float, default=60, help="seconds of warm-up, excluded from the growth (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    ap.add_argument("--chat-tokens", type=int, default=1024, help="a chat starts over past this many prompt tokens")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false",
                    help="skip the embedding-table sweep (its pages then come back during the run)")
    ap.add_argument("--sample-every", type=float, default=10, help="seconds between progress lines / samples")
    ap.add_argument("--probe-every", type=float, default=60, help="seconds between greedy probes (default 60)")
    ap.add_argument("--max-growth-mb", type=float, default=5.0, help="fail at this RSS growth or more (MB)")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = ap.parse_args(argv)
    report = run(args)
    print(json.dumps(report) if args.json else summary(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
