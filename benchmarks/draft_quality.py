"""How well trimmed drafts predict their target: greedy top-1 agreement, size, step cost.

For each (layers, vocab) setting the source is converted with --draft-of TARGET; the target answers a
few prompts greedily (summarize, edit code, chat); on the target's own tokens the draft's next-token
argmax (mapped through vocab_map) is compared with the target's at every answer position: the
acceptance rate of greedy speculation. Step times are the fastest of 20 runs at a 256-token past
(the least disturbed by other processes); the speedup
column is the textbook estimate for a chain of k drafted tokens with independent acceptance a
(tokens per round (1 - a^(k+1)) / (1 - a), cost k draft steps + one verification of k + 1 tokens),
best k. It is an estimate to rank settings, not a measurement of the speculative engine.

    python benchmarks/draft_quality.py smollm2-135m TARGET_BUNDLE [MORE_TARGETS...] \
        [--layers 8 10 15] [--vocab 4096 8192 16384]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import ondevice
from ondevice.bundle import read_bundle
from ondevice.runtimes.onnx import OnnxBackend

PROMPTS = [
    "Summarize this passage in two sentences.\n\nThe first public libraries in the modern sense opened in "
    "the nineteenth century, paid for by local taxes and open to anyone. Before that, most collections "
    "belonged to universities, churches or wealthy people, and readers needed permission or a fee. Public "
    "libraries changed who could read widely: workers, children and immigrants could borrow books for free, "
    "attend lectures and find newspapers. Today they also lend laptops, teach computer skills and offer "
    "quiet places to study, and many people still rely on them to get online.",
    "Rewrite this function so it is easier to read, with type hints and a docstring.\n\n"
    "def p(l):\n    o = {}\n    for x in l:\n        if x['age'] >= 18:\n            if x['city'] in o:\n"
    "                o[x['city']].append(x['name'])\n            else:\n                o[x['city']] = [x['name']]\n"
    "    return o",
    "What are some good habits for staying healthy while working from home?",
    "Explain how a bicycle stays upright when it is moving.",
]
PAST = 256


def open_backend(path: Path, threads: int) -> OnnxBackend:
    return OnnxBackend(read_bundle(path, verify=False), threads=threads, capacity=1024)


def target_answers(target: Path, n_tokens: int, threads: int) -> list[tuple[list[int], int]]:
    """(prompt + greedy answer ids, prompt length) for each prompt."""
    model = ondevice.load(target, threads=threads)
    out = []
    for p in PROMPTS:
        model.reset()
        ids = model.encode_prompt(p)
        answer = model.generate(ids, max_tokens=n_tokens, temperature=0).token_ids
        out.append((ids + answer, len(ids)))
    return out


def agreement(draft: Path, sequences: list[tuple[list[int], int]], threads: int) -> tuple[float, float]:
    """(argmax agreement with the target's tokens, share of those tokens the draft vocabulary holds)."""
    vocab_map = read_bundle(draft, verify=False).vocab_map()
    backend = open_backend(draft, threads)
    hits = covered = total = 0
    for ids, n_prompt in sequences:
        guess = backend.forward(ids[:-1], 0, all_logits=True)[n_prompt - 1:].argmax(-1)
        guess = vocab_map[guess] if vocab_map is not None else guess
        truth = np.asarray(ids[n_prompt:])
        hits += int((guess == truth).sum())
        covered += int(np.isin(truth, vocab_map).sum()) if vocab_map is not None else len(truth)
        total += len(truth)
    return hits / total, covered / total


def step_times(bundle: Path, threads: int, max_tokens: int = 9, repeats: int = 20) -> list[float]:
    """Fastest seconds of one graph call over t = 1..max_tokens new tokens after a PAST-token cache."""
    backend = open_backend(bundle, threads)
    backend.forward(list(range(100, 100 + PAST)), 0)
    times = []
    for t in range(1, max_tokens + 1):
        ids = list(range(500, 500 + t))
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            backend.forward(ids, PAST, all_logits=t > 1)
            runs.append(time.perf_counter() - start)
        times.append(min(runs))
    return times


def estimated_speedup(a: float, draft_step: float, verify: list[float]) -> tuple[float, int]:
    """(best estimated speedup, its k) of chain speculation; verify[t-1] = seconds for t tokens."""
    best = (0.0, 0)
    for k in range(1, len(verify)):
        tokens = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
        best = max(best, (tokens * verify[0] / (k * draft_step + verify[k]), k))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("targets", nargs="+", help="target bundles; the first one answers the prompts")
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 10, 15])
    ap.add_argument("--vocab", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--tokens", type=int, default=64, help="answer tokens per prompt")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    targets = [Path(t) for t in args.targets]
    sequences = target_answers(targets[0], args.tokens, args.threads)
    n = sum(len(ids) - p for ids, p in sequences)
    verify = {t: step_times(t, args.threads) for t in targets}
    print(f"{n} answer positions over {len(sequences)} prompts")
    for t, v in verify.items():
        print(f"target {t.name}: decode step {v[0] * 1e3:.1f} ms, verify 5 tokens {v[4] * 1e3:.1f} ms")
    names = " | ".join(f"est. speedup vs {t.name} (k)" for t in targets)
    print(f"\n| layers kept | vocab rows | size MB | convert s | top-1 agreement | answer tokens in vocab "
          f"| draft step ms | {names} |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(targets))
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            for vocab in args.vocab:
                out = Path(tmp) / f"d{layers}-{vocab}.bundle"
                t = time.perf_counter()
                ondevice.convert(args.source, out, draft_of=targets[0], draft_layers=layers, draft_vocab=vocab,
                                 progress=False)
                seconds = time.perf_counter() - t
                size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
                kept = read_bundle(out, verify=False).manifest["draft"]["layers_kept"]
                agree, cover = agreement(out, sequences, args.threads)
                draft_step = step_times(out, args.threads, max_tokens=1)[0]
                est = " | ".join("{:.2f} ({})".format(*estimated_speedup(agree, draft_step, v))
                                 for v in verify.values())
                print(f"| {layers} {kept} | {vocab} | {size:.1f} | {seconds:.1f} | {agree:.3f} | {cover:.3f} "
                      f"| {draft_step * 1e3:.1f} | {est} |", flush=True)


if __name__ == "__main__":
    main()
