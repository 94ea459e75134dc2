"""Measuring a model: perplexity over a text, and the speed figures `ondevice bench` reports."""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np

from ondevice.engine import Model

# Prompt text for benchmarks: ordinary prose, repeated until long enough.
BENCH_TEXT = (
    "The history of computing is a story of machines becoming smaller, faster and more personal. "
    "Early computers filled whole rooms and were operated by specialists, while today a phone in a "
    "pocket holds more memory than those machines could address. Running a language model on such a "
    "device keeps private text on the device, works without a network, and answers without waiting "
    "for a server. The cost is that memory, storage bandwidth and power are scarce, so every byte "
    "of weights and every pass over them counts. "
)


def perplexity(model: Model, token_ids: list[int], window: int = 512) -> dict:
    """Perplexity over non-overlapping windows of `window` tokens, each scored independently
    (fresh cache; the first token of each window is context only)."""
    if window < 2:
        raise ValueError("the window must hold at least 2 tokens")
    if window > model.max_context:
        raise ValueError(f"window {window} exceeds the model's context of {model.max_context}")
    nll, scored = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start:start + window]
        if len(chunk) < 2:
            break
        model.reset()
        logits = model.backend.forward(chunk, 0, all_logits=True).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        targets = np.asarray(chunk[1:])
        nll -= logp[np.arange(len(targets)), targets].sum()
        scored += len(targets)
    model.reset()
    if scored == 0:
        raise ValueError("the text is too short to score (needs at least 2 tokens)")
    return {"perplexity": float(np.exp(nll / scored)), "tokens": scored, "window": window}


def bench_prompt(model: Model, n_tokens: int) -> list[int]:
    ids = model.tokenizer.encode(BENCH_TEXT)
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def benchmark(model: Model, prompt_lengths=(128, 512, 1024), decode_tokens: int = 128,
              repeats: int = 3, load=None) -> dict:
    """Speed figures, each over `repeats` runs: prefill tok/s per prompt length, decode tok/s,
    TTFT of a 128-token prompt; load time if `load` (a no-argument callable) is given; peak RSS."""
    results: dict = {"repeats": repeats}
    prompt_lengths = [n for n in prompt_lengths if n + 1 <= model.max_context]
    model.backend.ensure_capacity(max(prompt_lengths + [128]) + decode_tokens)
    results["prefill_tok_s"] = {}
    for n in prompt_lengths:
        ids = bench_prompt(model, n)
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            model.backend.forward(ids, 0)
            runs.append(n / (time.perf_counter() - t))
        results["prefill_tok_s"][str(n)] = _summary(runs)
    ttft, decode = [], []
    ids = bench_prompt(model, min(128, model.max_context - decode_tokens - 1))
    for _ in range(repeats):
        model.reset()
        g = model.generate(ids, max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
        ttft.append(g.ttft_s)
        decode.append(g.decode_tok_s)
    model.reset()
    results["ttft_s"] = _summary(ttft)
    results["decode_tok_s"] = _summary(decode)
    results["decode_tokens"] = decode_tokens
    # Peak RSS of this one model through all of the above; the extra loads below would add theirs.
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if load is not None:
        results["load_s"] = _summary([_timed(load) for _ in range(repeats)])
    return results


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
