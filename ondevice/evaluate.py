"""Measuring a model: perplexity over a text, and the speed figures `ondevice bench` reports."""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

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


# Prompts of the kinds speculative decoding is measured on: summarize a given passage, edit code
# (both copy from the prompt), and a free chat answer (where drafts fail).
SPECULATION_PROMPTS = {p.stem: p.read_text() for p in sorted((Path(__file__).parent / "prompts").glob("*.txt"))}


def perplexity(model: Model, token_ids: list[int], window: int = 512) -> dict:
    """Perplexity over non-overlapping windows of `window` tokens, each scored independently
    (fresh cache; the first token of each window is context only)."""
    if window < 2:
        raise ValueError("the window must hold at least 2 tokens")
    if window > model.max_context:
        raise ValueError(f"window {window} exceeds the model's context of {model.max_context}")
    nll, scored = 0.0, 0
    for chunk, chunk_nll in window_nll(model, token_ids, window):
        nll += chunk_nll
        scored += len(chunk) - 1
    if scored == 0:
        raise ValueError("the text is too short to score (needs at least 2 tokens)")
    return {"perplexity": float(np.exp(nll / scored)), "tokens": scored, "window": window}


def window_nll(model: Model, token_ids: list[int], window: int):
    """(window, summed negative log-likelihood of its tokens after the first) for non-overlapping
    windows of `window` tokens, each on a fresh cache."""
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start:start + window]
        if len(chunk) < 2:
            break
        model.reset()
        logits = model.backend.forward(chunk, 0, all_logits=True).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        yield chunk, float(-logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
    model.reset()


def bench_prompt(model: Model, n_tokens: int) -> list[int]:
    ids = model.tokenizer.encode(BENCH_TEXT)
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def benchmark(model: Model, prompt_lengths=(128, 512, 1024), decode_tokens: int = 128,
              repeats: int = 3, load=None) -> dict:
    """Speed figures, each over `repeats` runs: prefill tok/s per prompt length, decode tok/s,
    TTFT of a 128-token prompt; load time if `load` (a no-argument callable) is given; peak RSS."""
    results: dict = {"repeats": repeats, "providers": list(getattr(model.backend, "providers", [])),
                     "prefill_chunk": getattr(model.backend, "chunk_size", None),
                     "int8_prefill": getattr(model.backend, "int8_session", None) is not None,
                     "provider_fallbacks": list(model.plan.fallbacks) if getattr(model, "plan", None) else []}
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
    speculator, model.speculator = model.speculator, None  # the plain figures first
    flash = getattr(getattr(model.backend, "flash_layers", None), "mlp", None)
    io_wait = flash.weights.io_wait_s if flash is not None else 0.0
    decode_s = 0.0
    for _ in range(repeats):
        model.reset()
        g = model.generate(ids, max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
        ttft.append(g.ttft_s)
        decode.append(g.decode_tok_s)
        decode_s += g.decode_s
    if flash is not None:  # the decode runs' counters (the prompts stream past the window)
        results["flash"] = dict(flash.counters(), io_wait_share=(flash.weights.io_wait_s - io_wait) / decode_s)
    model.reset()
    model.speculator = speculator
    results["ttft_s"] = _summary(ttft)
    results["decode_tok_s"] = _summary(decode)
    results["decode_tokens"] = decode_tokens
    if speculator is not None:
        results["speculative"] = speculation_benchmark(model, decode_tokens, repeats)
    # Peak RSS of this one model through all of the above; the extra loads below would add theirs.
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if hasattr(model.backend, "session"):  # ONNX Runtime: which provider ran which nodes
        from ondevice.runtimes.onnx import node_placement

        results["node_placement"] = node_placement(model.bundle, getattr(model.backend, "requested_providers", None),
                                                   threads=1)
    if load is not None:
        results["load_s"] = _summary([_timed(load) for _ in range(repeats)])
    return results


def speculation_benchmark(model: Model, decode_tokens: int = 128, repeats: int = 3) -> dict:
    """Greedy decode tok/s with the model's speculator on and off, in turn, on each kind of prompt;
    the ratio is taken pair by pair. Also checks that both give the same tokens."""
    speculator = model.speculator
    out = {}
    for kind, text in SPECULATION_PROMPTS.items():
        prompt = model.encode_prompt(text)
        if len(prompt) + decode_tokens > model.max_context:
            continue  # a small-context model: the prompt does not fit
        plain, spec, ratios, stats, identical = [], [], [], [], True
        for _ in range(repeats):
            model.speculator = None
            model.reset()
            a = model.generate(prompt, max_tokens=decode_tokens, temperature=0.0)
            model.speculator = speculator
            speculator.reset_stats()
            model.reset()
            b = model.generate(prompt, max_tokens=decode_tokens, temperature=0.0)
            identical &= a.token_ids == b.token_ids
            plain.append(a.decode_tok_s)
            spec.append(b.decode_tok_s)
            ratios.append(b.decode_tok_s / a.decode_tok_s)
            stats.append(speculator.stats.to_dict())
        model.reset()
        out[kind] = {"plain_tok_s": _summary(plain), "speculative_tok_s": _summary(spec),
                     "speedup": _summary(ratios), "identical": identical, "tokens": len(a.token_ids),
                     **{k: statistics.median(s[k] for s in stats)
                        for k in ("acceptance_rate", "accepted_per_verify", "draft_share", "verify_share")}}
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
