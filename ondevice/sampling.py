"""Next-token sampling over one logits row: greedy, temperature, top-k, top-p, min-p, repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style: positive logits of seen tokens divided by the penalty, negative ones multiplied."""
    if penalty == 1.0 or len(seen) == 0:
        return logits
    logits = logits.copy()
    vals = logits[seen]
    logits[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           seen: np.ndarray | None = None) -> int:
    """One token id from a logits row [vocab]."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return int(np.argmax(logits))
    cand, probs = _candidates(logits, params)
    return int(cand[rng.choice(len(probs), p=probs)])


def distribution(logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None = None) -> np.ndarray:
    """The distribution sample() draws from, dense over the vocabulary (float64; one-hot when greedy)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    p = np.zeros(logits.shape[-1], np.float64)
    if params.temperature == 0:
        p[int(np.argmax(logits))] = 1.0
    else:
        cand, probs = _candidates(logits, params)
        p[cand] = probs
    return p


def _candidates(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) after temperature, top-k, top-p and min-p; sorted by probability."""
    if 0 < params.top_k < logits.shape[-1]:
        cand = np.argpartition(logits, -params.top_k)[-params.top_k:]
    else:
        cand = np.arange(logits.shape[-1])
    cand = cand[np.argsort(-logits[cand], kind="stable")]
    scaled = logits[cand].astype(np.float64) / params.temperature
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    keep = len(probs)
    if params.top_p < 1.0:
        keep = min(keep, int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1)
    if params.min_p > 0:
        keep = min(keep, max(1, int(np.sum(probs >= params.min_p * probs[0]))))
    return cand[:keep], probs[:keep] / probs[:keep].sum()
