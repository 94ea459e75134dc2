"""Trim a model: drop layers, FFN neurons, query heads, vocabulary rows (and make drafts that way).

Works on canonical weights (Hugging Face names, [out, in]) and the architecture's config dataclass,
before quantization and independent of the exporter, so every exporter (ONNX, Core ML, TFLite)
gets the same draft. GGUF blocks are selected row by row (`QTensor.take_rows`): nothing is
re-quantized.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from ondevice.converters import calibrate
from ondevice.converters.canonical import QTensor, Weight
from ondevice.converters.quantize import dequantize
from ondevice.errors import UnsupportedArchitectureError

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


def take_columns(w: Weight, cols: np.ndarray) -> Weight:
    """Columns `cols` of w [out, in]: whole quantization blocks stay quantized (lossless); otherwise
    the float values (a later quantization then re-quantizes them)."""
    cols = np.asarray(cols, np.int64)
    if isinstance(w, QTensor):
        b = w.block_size
        starts = cols[::b]
        if len(cols) % b == 0 and (starts % b == 0).all() and (cols == (starts[:, None] + np.arange(b)).reshape(-1)).all():
            return w.take_column_blocks(starts // b)
        w = w.dequantize()
    return np.ascontiguousarray(np.asarray(w)[:, cols])


def trim_ffn(weights: dict[str, Weight], cfg, keep: list[np.ndarray]) -> tuple[dict[str, Weight], object]:
    """Keep FFN neurons keep[i] (the same count in every layer) of layer i: their gate and up rows
    and down columns. The config's intermediate_size follows."""
    sizes = {len(k) for k in keep}
    if len(keep) != cfg.num_layers or len(sizes) != 1 or not 0 < min(sizes) <= cfg.intermediate_size:
        raise ValueError(f"keep the same number (1..{cfg.intermediate_size}) of FFN neurons in each of the "
                         f"{cfg.num_layers} layers")
    out = dict(weights)
    for i, ids in enumerate(keep):
        ids = np.sort(np.asarray(ids, np.int64))
        if len(np.unique(ids)) != len(ids) or ids.min() < 0 or ids.max() >= cfg.intermediate_size:
            raise ValueError(f"layer {i}: FFN neurons to keep must be distinct ids in 0..{cfg.intermediate_size - 1}")
        p = f"model.layers.{i}.mlp."
        out[p + "gate_proj.weight"] = take_rows(weights[p + "gate_proj.weight"], ids)
        out[p + "up_proj.weight"] = take_rows(weights[p + "up_proj.weight"], ids)
        out[p + "down_proj.weight"] = take_columns(weights[p + "down_proj.weight"], ids)
    return out, dataclasses.replace(cfg, intermediate_size=len(keep[0]))


def trim_heads(weights: dict[str, Weight], cfg, keep: list[np.ndarray]) -> tuple[dict[str, Weight], object]:
    """Keep query heads keep[i] of layer i (the same count in every layer and in every KV group, so
    grouped-query attention stays regular): their q_proj rows and o_proj columns. Keys and values
    stay whole; the config's num_heads follows."""
    d, group = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    sizes = {len(k) for k in keep}
    if len(keep) != cfg.num_layers or len(sizes) != 1 or min(sizes) % cfg.num_kv_heads or not 0 < min(sizes):
        raise ValueError(f"keep the same number of query heads (a multiple of the {cfg.num_kv_heads} KV heads) "
                         f"in each of the {cfg.num_layers} layers")
    out = dict(weights)
    for i, heads in enumerate(keep):
        heads = np.sort(np.asarray(heads, np.int64))
        per_group = np.bincount(heads // group, minlength=cfg.num_kv_heads) if heads.max() < cfg.num_heads else None
        if len(np.unique(heads)) != len(heads) or heads.min() < 0 or per_group is None or len(set(per_group)) != 1:
            raise ValueError(f"layer {i}: query heads to keep must be distinct ids in 0..{cfg.num_heads - 1}, "
                             f"as many from each KV group of {group}")
        rows = (heads[:, None] * d + np.arange(d)).reshape(-1)
        p = f"model.layers.{i}.self_attn."
        out[p + "q_proj.weight"] = take_rows(weights[p + "q_proj.weight"], rows)
        out[p + "o_proj.weight"] = take_columns(weights[p + "o_proj.weight"], rows)
    return out, dataclasses.replace(cfg, num_heads=len(keep[0]))


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


def ffn_importance(weights: dict[str, Weight], cfg, ids: np.ndarray) -> list[np.ndarray]:
    """Per layer, each FFN neuron's mean contribution on the calibration windows ids [B, T]:
    mean |h_j| times the norm of its down column (what leaving it out removes from the output)."""
    from ondevice.converters import sparsity

    scores = []
    for i, x in enumerate(sparsity.ffn_inputs(weights, cfg, ids)):
        gate, up, down = sparsity.ffn_weights(weights, i)
        scores.append(np.abs(sparsity.gated_activation(x, gate, up)).mean(0) * np.linalg.norm(down, axis=0))
    return scores


def choose_ffn(scores: list[np.ndarray], n: int, group: int = 32) -> list[np.ndarray]:
    """Per layer, the n neurons (rounded up to whole groups of `group`, so that 4-bit blocks of the down
    projection stay whole) in the groups with the highest total score, in id order."""
    inter = len(scores[0])
    groups = min(inter // group, -(-n // group)) if inter % group == 0 else None
    if groups is None:
        return [np.sort(np.argsort(-s, kind="stable")[:n]) for s in scores]
    best = [np.sort(np.argsort(-s.reshape(-1, group).sum(1), kind="stable")[:groups]) for s in scores]
    return [(b[:, None] * group + np.arange(group)).reshape(-1) for b in best]


def head_importance(weights: dict[str, Weight], cfg, ids: np.ndarray) -> list[np.ndarray]:
    """Per layer, each query head's mean contribution on the calibration windows ids [B, T]: mean
    norm of its attention output times the norm of its o_proj columns."""
    h, d = cfg.num_heads, cfg.head_dim
    outputs: dict[str, np.ndarray] = {}

    def observe(name: str, x: np.ndarray) -> None:
        if name.endswith("self_attn.o_proj"):
            outputs[name] = np.linalg.norm(x.reshape(-1, h, d), axis=-1).mean(0)

    x = calibrate.embed(weights, ids)
    scores = []
    for i in range(cfg.num_layers):
        x = calibrate.layer_forward(x, weights, cfg, i, observe=observe)
        o = dequantize(weights[f"model.layers.{i}.self_attn.o_proj.weight"]).reshape(-1, h, d)
        scores.append(outputs[f"model.layers.{i}.self_attn.o_proj"] * np.linalg.norm(o, axis=(0, 2)))
    return scores


def choose_heads(scores: list[np.ndarray], n: int, kv_heads: int) -> list[np.ndarray]:
    """Per layer, the n query heads with the highest scores, n / kv_heads from each KV group, in id order."""
    heads = len(scores[0])
    if n % kv_heads or not 0 < n <= heads:
        raise ValueError(f"keep a multiple of the {kv_heads} KV heads, at most {heads} query heads, not {n}")
    group, per_group = heads // kv_heads, n // kv_heads
    return [np.sort(np.concatenate([g * group + np.argsort(-s[g * group:(g + 1) * group], kind="stable")[:per_group]
                                    for g in range(kv_heads)])) for s in scores]


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


def trim_model(weights: dict[str, Weight], cfg, tokenizer_json: str, layers: int | None = None,
               ffn: int | None = None, heads: int | None = None,
               text: str | None = None) -> tuple[dict[str, Weight], object, dict]:
    """The converter's trimming pass, before any exporter: keep `layers` decoder layers (the ones that
    change the hidden state most on calibration text, first and last always), `ffn` neurons per
    layer (the largest mean contributions, in whole 32-neuron groups) and `heads` query heads per
    layer (the largest mean contributions, as many per KV group). Returns the trimmed weights,
    config and the manifest's record of what was kept. (Vocabulary trimming changes the tokenizer
    too: `trim_vocab`.)"""
    text = calibrate.calibration_text() if text is None else text
    ids, _ = calibrate.token_counts(tokenizer_json, text)
    batch = calibrate.windows(ids, CALIBRATION_WINDOW, CALIBRATION_TOKENS)
    record: dict = {"calibration_tokens": int(batch.size)}
    if layers is not None and layers < cfg.num_layers:
        scores = calibrate.layer_scores(weights, cfg, batch)
        keep = choose_layers(scores, layers)
        weights, cfg = drop_layers(weights, cfg, keep)
        record.update(layers_kept=keep, layer_scores=[round(float(s), 6) for s in scores])
    if ffn is not None and ffn < cfg.intermediate_size:
        keep_ffn = choose_ffn(ffn_importance(weights, cfg, batch), ffn)
        weights, cfg = trim_ffn(weights, cfg, keep_ffn)
        record.update(ffn_neurons=cfg.intermediate_size, ffn_criterion="mean |h| x |down column|, 32-neuron groups",
                      ffn_kept=[k.tolist() for k in keep_ffn])
    if heads is not None and heads < cfg.num_heads:
        keep_heads = choose_heads(head_importance(weights, cfg, batch), heads, cfg.num_kv_heads)
        weights, cfg = trim_heads(weights, cfg, keep_heads)
        record.update(query_heads=cfg.num_heads, head_criterion="mean |head output| x |o_proj columns|, "
                      "as many per KV group", heads_kept=[k.tolist() for k in keep_heads])
    return weights, cfg, record


# --- vocabulary trimming of a regular conversion: tokenizer, embedding and head together -------------

def closed_vocab(tokenizer_json: str, priority: list[int], size: int, always: list[int]) -> np.ndarray:
    """`size` token ids (sorted): `always`, then tokens in `priority` order, each with the tokens its
    BPE merges are built from (a kept token whose parts were dropped could never be produced)."""
    model = json.loads(tokenizer_json)["model"]
    if model.get("type") != "BPE":
        raise UnsupportedArchitectureError(f"vocabulary trimming needs a BPE tokenizer, not {model.get('type')}")
    vocab = model["vocab"]
    parts: dict[int, tuple[int, int]] = {}
    for m in model["merges"]:
        a, b = _pair(m)
        if a in vocab and b in vocab and a + b in vocab:
            parts.setdefault(vocab[a + b], (vocab[a], vocab[b]))
    kept: set[int] = set()

    def closure(i: int) -> set[int]:
        todo, out = [i], set()
        while todo:
            j = todo.pop()
            if j not in kept and j not in out:
                out.add(j)
                todo.extend(parts.get(j, ()))
        return out

    for i in always:
        kept |= closure(i)
    if len(kept) > size:
        raise ValueError(f"a vocabulary of {size} cannot hold the {len(kept)} special, byte and single-character "
                         "tokens every trimmed model keeps; use a larger one")
    for i in priority:
        new = closure(i)
        if len(kept) + len(new) <= size:
            kept |= new
        if len(kept) == size:
            break
    return np.asarray(sorted(kept), np.int64)


def _pair(merge) -> list[str]:
    """A BPE merge as [left, right]: tokenizers writes "a b" strings or [a, b] pairs."""
    return merge.split(" ", 1) if isinstance(merge, str) else list(merge)


def trim_tokenizer(tokenizer_json: str, keep_ids: np.ndarray) -> str:
    """The tokenizer with only tokens keep_ids, renumbered 0.. in that order: merges producing or
    using a dropped token go, so encoding never yields one; special-token ids in the post-processor
    follow."""
    data = json.loads(tokenizer_json)
    new_id = {int(old): new for new, old in enumerate(keep_ids)}
    model = data["model"]
    model["vocab"] = {t: new_id[i] for t, i in model["vocab"].items() if i in new_id}
    kept = model["vocab"]
    model["merges"] = [m for m in model["merges"] if all(t in kept for t in (*_pair(m), "".join(_pair(m))))]
    data["added_tokens"] = [dict(t, id=new_id[t["id"]]) for t in data.get("added_tokens", []) if t["id"] in new_id]

    def remap(node):
        if isinstance(node, dict):
            return {k: ([new_id[i] for i in v] if k == "ids" and isinstance(v, list) else remap(v))
                    for k, v in node.items()}
        return [remap(v) for v in node] if isinstance(node, list) else node

    data["post_processor"] = remap(data.get("post_processor"))
    return json.dumps(data, ensure_ascii=False)


def trim_vocab(weights: dict[str, Weight], cfg, tokenizer_json: str, special_ids: list[int], size: int,
               text: str | None = None) -> tuple[dict[str, Weight], object, str, np.ndarray]:
    """Keep `size` tokens: the specials, every byte and single-character token, then the most frequent
    on calibration text, then the earliest merges (lowest ids), closed under their BPE parts. The
    embedding (and a tied or separate LM head) keeps those rows, the tokenizer only those tokens,
    renumbered. Returns weights, config, tokenizer JSON and new id -> original id."""
    _, counts = calibrate.token_counts(tokenizer_json, calibrate.calibration_text() if text is None else text)
    counts = np.pad(counts, (0, max(0, cfg.vocab_size - len(counts))))[:cfg.vocab_size]
    priority = np.lexsort((np.arange(len(counts)), -counts)).tolist()
    keep = closed_vocab(tokenizer_json, priority, min(size, cfg.vocab_size),
                        always_kept_ids(tokenizer_json, special_ids))
    out = dict(weights, **{"model.embed_tokens.weight": take_rows(weights["model.embed_tokens.weight"], keep)})
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take_rows(weights["lm_head.weight"], keep)
    return out, dataclasses.replace(cfg, vocab_size=len(keep)), trim_tokenizer(tokenizer_json, keep), keep
