"""Trim a model into a small draft: drop layers, keep only frequent rows of the LM head.

Works on canonical weights (Hugging Face names, [out, in]) and the architecture's config dataclass,
before quantization and independent of the exporter, so every exporter (ONNX, Core ML, TFLite)
gets the same draft. GGUF blocks are selected row by row (`QTensor.take_rows`): nothing is
re-quantized.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from ondevice.converters import calibrate
from ondevice.converters.canonical import QTensor, Weight

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
DEFAULT_VOCAB = 16384  # SmolLM2: 96% of its answer tokens (8192: 91%, 4096: 81%)
CALIBRATION_WINDOW = 256  # tokens per window of the layer-scoring forward
CALIBRATION_TOKENS = 2048  # tokens the layer scores are measured on


def drop_layers(weights: dict[str, Weight], cfg, keep: list[int]) -> tuple[dict[str, Weight], object]:
    """Keep only the decoder layers `keep` (renumbered 0..len(keep)-1 in that order); the config's
    num_layers follows."""
    if not keep or len(set(keep)) != len(keep) or not all(0 <= i < cfg.num_layers for i in keep):
        raise ValueError(f"layers to keep must be distinct indices in 0..{cfg.num_layers - 1}, got {keep}")
    new_index = {old: new for new, old in enumerate(keep)}
    out: dict[str, Weight] = {}
    for name, w in weights.items():
        m = _LAYER.fullmatch(name)
        if m is None:
            out[name] = w
        elif int(m[1]) in new_index:
            out[f"model.layers.{new_index[int(m[1])]}.{m[2]}"] = w
    return out, dataclasses.replace(cfg, num_layers=len(keep))


def take_rows(w: Weight, rows: np.ndarray) -> Weight:
    return w.take_rows(rows) if isinstance(w, QTensor) else np.ascontiguousarray(np.asarray(w)[rows])


def trim_vocab_head(weights: dict[str, Weight], cfg, keep_ids: np.ndarray) -> tuple[dict[str, Weight], object]:
    """The LM head keeps only rows keep_ids: logit j of the trimmed model is logit keep_ids[j] of the
    full one. A head tied to the embedding becomes a separate `lm_head.weight` of those rows; the
    input embedding stays whole, so any token id can still be fed."""
    keep_ids = np.asarray(keep_ids, np.int64)
    if len(np.unique(keep_ids)) != len(keep_ids) or keep_ids.min() < 0 or keep_ids.max() >= cfg.vocab_size:
        raise ValueError(f"vocabulary rows to keep must be distinct ids in 0..{cfg.vocab_size - 1}")
    head = weights["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
    out = dict(weights, **{"lm_head.weight": take_rows(head, keep_ids)})
    return out, dataclasses.replace(cfg, tie_embeddings=False)


# --- choosing what to keep ------------------------------------------------------------------------

def choose_layers(scores: np.ndarray, n: int, keep_ends: bool = True) -> list[int]:
    """The n layers with the highest scores, in order; the first and last always stay when keep_ends."""
    count = len(scores)
    if not 1 <= n <= count:
        raise ValueError(f"cannot keep {n} of {count} layers")
    forced = {0, count - 1} if keep_ends and n >= 2 else set()
    rest = [int(i) for i in np.argsort(-np.asarray(scores), kind="stable") if i not in forced]
    return sorted(forced | set(rest[:n - len(forced)]))


def always_kept_ids(tokenizer_json: str, special_ids: list[int]) -> list[int]:
    """Token ids a draft head always keeps: the given special ids (bos, eos, end of turn), the
    tokenizer's special added tokens, and every single-character or byte-fallback token (so any
    text stays reachable)."""
    tok = Tokenizer.from_str(tokenizer_json)
    ids = {i for i in special_ids if i is not None}
    ids |= {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    ids |= {i for t, i in tok.get_vocab(with_added_tokens=False).items()
            if len(t) == 1 or _BYTE_FALLBACK.fullmatch(t)}
    return sorted(ids)


def choose_vocab(counts: np.ndarray, size: int, always: list[int]) -> np.ndarray:
    """size token ids: `always`, then the most frequent ones by counts, then (for tokens the text
    never used) the lowest ids, which in a BPE vocabulary are its earliest, most frequent merges."""
    vocab = len(counts)
    if len(always) > size:
        raise ValueError(f"a draft vocabulary of {size} cannot hold the {len(always)} special and byte "
                         f"tokens every draft keeps; use a larger one")
    order = np.lexsort((np.arange(vocab), -counts))  # by count, then by id
    chosen = list(dict.fromkeys([*always, *order.tolist()]))[:min(size, vocab)]
    return np.asarray(sorted(chosen), np.int64)


@dataclass
class Draft:
    """A trimmed model and the record of how it was trimmed (for the manifest)."""

    weights: dict[str, Weight]
    cfg: object
    layers_kept: list[int]
    layer_scores: list[float]
    vocab_map: np.ndarray | None  # draft logit column j -> token id; None when the head is whole
    calibration: dict = field(default_factory=dict)


def make_draft(weights: dict[str, Weight], cfg, tokenizer_json: str, special_ids: list[int],
               layers: int | None = None, vocab: int | None = DEFAULT_VOCAB, text: str | None = None) -> Draft:
    """Measure the model on calibration text, then drop its least useful layers and trim its head.

    layers: how many decoder layers stay (default: all; on SmolLM2-135M every dropped layer costs
    agreement with the target, see benchmarks/draft_quality.py); vocab: how many LM-head rows stay
    (None, or at least the vocabulary size: the whole head)."""
    source = calibrate.CALIBRATION_FILE if text is None else "custom"
    text = calibrate.calibration_text() if text is None else text
    n_layers = cfg.num_layers if layers is None else min(layers, cfg.num_layers)
    ids, counts = calibrate.token_counts(tokenizer_json, text)
    batch = calibrate.windows(ids, CALIBRATION_WINDOW, CALIBRATION_TOKENS)
    scores = calibrate.layer_scores(weights, cfg, batch)
    keep = choose_layers(scores, n_layers)
    weights, cfg = drop_layers(weights, cfg, keep)
    vocab_map = None
    if vocab is not None and vocab < cfg.vocab_size:
        counts = np.pad(counts, (0, max(0, cfg.vocab_size - len(counts))))[:cfg.vocab_size]
        vocab_map = choose_vocab(counts, vocab, always_kept_ids(tokenizer_json, special_ids))
        weights, cfg = trim_vocab_head(weights, cfg, vocab_map)
    used = np.asarray(ids)
    record = {"text": source, "text_tokens": len(ids),
              "scored_tokens": int(batch.size), "criterion": "1 - mean cosine(hidden in, hidden out)"}
    if vocab_map is not None:
        record["text_tokens_in_vocab"] = round(float(np.isin(used, vocab_map).mean()), 4)
    return Draft(weights, cfg, keep, [round(float(s), 6) for s in scores], vocab_map, record)
