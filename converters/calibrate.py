"""Measurements on calibration text that decide how a model is trimmed into a draft.

- `layer_scores`: how much each layer changes the hidden state, 1 - mean cosine similarity between
  the residual stream entering and leaving it, from a plain numpy forward over the canonical weights
  (no torch). Layers that change it least are dropped first.
- `token_counts`: how often each token id occurs in the calibration text, under the checkpoint's own
  tokenizer; the draft's LM head keeps the most frequent rows.

The forward is the llama family's (RMSNorm, rotary attention with grouped KV heads, SiLU-gated MLP)
over canonical (Hugging Face) names. It runs one layer at a time over all calibration windows, so
only one layer is ever dequantized to float.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
from tokenizers import Tokenizer

from ondevice.converters.canonical import QTensor, Weight

OUTLIER_RATIO = 6.0  # an input channel whose |max| exceeds this many times the layer's median is an outlier

CALIBRATION_FILE = "calibration.txt"


def calibration_text() -> str:
    """The text shipped with the converter: prose, summaries, chat answers and Python code."""
    return (resources.files("ondevice.converters") / "calibration" / CALIBRATION_FILE).read_text(encoding="utf-8")


def token_counts(tokenizer_json: str, text: str) -> tuple[list[int], np.ndarray]:
    """(the text's token ids, how often each id occurs [vocab]) under the given tokenizer."""
    tok = Tokenizer.from_str(tokenizer_json)
    ids = tok.encode(text, add_special_tokens=False).ids
    counts = np.bincount(np.asarray(ids, np.int64), minlength=tok.get_vocab_size(with_added_tokens=True))
    return ids, counts


def windows(ids: list[int], length: int, max_tokens: int) -> np.ndarray:
    """Consecutive windows [n, length] of ids, at most max_tokens ids in all, spread over the text."""
    n_all = len(ids) // length
    if n_all == 0:
        return np.asarray(ids, np.int64)[None, :]
    n = max(1, min(n_all, max_tokens // length))
    starts = np.linspace(0, n_all - 1, n).round().astype(int) * length
    return np.stack([np.asarray(ids[s:s + length], np.int64) for s in starts])


# --- the numpy forward ------------------------------------------------------------------------------

def _float(w: Weight) -> np.ndarray:
    return w.dequantize() if isinstance(w, QTensor) else np.asarray(w, np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the two halves of each head (Hugging Face's rotate_half); x [B, heads, T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def embed(weights: dict[str, Weight], ids: np.ndarray) -> np.ndarray:
    """Hidden states [B, T, hidden] entering the first layer."""
    table = weights["model.embed_tokens.weight"]
    rows = np.unique(ids)
    picked = _float(table.take_rows(rows) if isinstance(table, QTensor) else np.asarray(table)[rows])
    return picked[np.searchsorted(rows, ids)]


def layer_forward(x: np.ndarray, weights: dict[str, Weight], cfg, i: int, observe=None,
                  transform=None) -> np.ndarray:
    """The residual stream [B, T, hidden] after layer i (causal attention within each window).
    observe(name, h), if given, sees the input of every linear layer (for activation statistics);
    transform(name, h) replaces it (to simulate quantized activations)."""
    def w(name: str) -> np.ndarray:
        return _float(weights[f"model.layers.{i}.{name}.weight"])

    def linear(h: np.ndarray, name: str) -> np.ndarray:  # one matrix product over all windows
        if observe is not None:
            observe(f"model.layers.{i}.{name}", h)
        if transform is not None:
            h = transform(f"model.layers.{i}.{name}", h)
        return (h.reshape(-1, h.shape[-1]) @ w(name).T).reshape(*h.shape[:-1], -1)

    b, t, _ = x.shape
    nh, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    h = rms_norm(x, w("input_layernorm"), cfg.rms_norm_eps)
    q = linear(h, "self_attn.q_proj").reshape(b, t, nh, hd).transpose(0, 2, 1, 3)
    k = linear(h, "self_attn.k_proj").reshape(b, t, kv, hd).transpose(0, 2, 1, 3)
    v = linear(h, "self_attn.v_proj").reshape(b, t, kv, hd).transpose(0, 2, 1, 3)
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    angles = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = np.cos(np.concatenate([angles, angles], -1)).astype(np.float32)
    sin = np.sin(np.concatenate([angles, angles], -1)).astype(np.float32)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    k, v = np.repeat(k, nh // kv, axis=1), np.repeat(v, nh // kv, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(hd ** -0.5)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, np.float32(-np.inf))
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    attn = (scores / scores.sum(-1, keepdims=True)) @ v
    x = x + linear(attn.transpose(0, 2, 1, 3).reshape(b, t, nh * hd), "self_attn.o_proj")
    h = rms_norm(x, w("post_attention_layernorm"), cfg.rms_norm_eps)
    gate, up = linear(h, "mlp.gate_proj"), linear(h, "mlp.up_proj")
    return x + linear(gate / (1.0 + np.exp(-gate)) * up, "mlp.down_proj")


def hidden_states(weights: dict[str, Weight], cfg, ids: np.ndarray) -> list[np.ndarray]:
    """Residual streams [B, T, hidden]: the embeddings, then after each layer (num_layers + 1 arrays)."""
    states = [embed(weights, np.atleast_2d(ids))]
    for i in range(cfg.num_layers):
        states.append(layer_forward(states[-1], weights, cfg, i))
    return states


def logits(weights: dict[str, Weight], cfg, ids: np.ndarray) -> np.ndarray:
    """Logits [B, T, head rows] of the numpy forward (the head is lm_head, or the tied embedding)."""
    x = hidden_states(weights, cfg, ids)[-1]
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    return rms_norm(x, _float(weights["model.norm.weight"]), cfg.rms_norm_eps) @ _float(head).T


def layer_scores(weights: dict[str, Weight], cfg, ids: np.ndarray) -> np.ndarray:
    """For each layer, 1 - the mean cosine similarity of the hidden state entering and leaving it,
    over every position of the windows ids [B, T]: near 0 for a layer that barely changes it."""
    x = embed(weights, np.atleast_2d(ids))
    scores = np.zeros(cfg.num_layers)
    for i in range(cfg.num_layers):
        y = layer_forward(x, weights, cfg, i)
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-12)
        scores[i] = 1.0 - float(cos.mean())
        x = y
    return scores


def activation_ranges(weights: dict[str, Weight], cfg, ids: np.ndarray) -> dict[str, np.ndarray]:
    """For every linear layer (canonical name without .weight), the largest |value| each of its input
    channels takes over the calibration windows ids [B, T]: what a static per-tensor int8 scale and
    the choice of outlier channels (mllm-NPU's shadow execution) are computed from."""
    ranges: dict[str, np.ndarray] = {}

    def observe(name: str, h: np.ndarray) -> None:
        amax = np.abs(h).reshape(-1, h.shape[-1]).max(0)
        ranges[name] = np.maximum(ranges[name], amax) if name in ranges else amax

    x = embed(weights, np.atleast_2d(ids))
    for i in range(cfg.num_layers):
        x = layer_forward(x, weights, cfg, i, observe)
    return ranges


def outlier_channels(ranges: dict[str, np.ndarray], ratio: float = OUTLIER_RATIO) -> dict[str, np.ndarray]:
    """Per linear layer, the input channels whose range exceeds `ratio` times the median channel's:
    quantizing them with the rest would spend most of the int8 range on a few channels."""
    return {name: np.flatnonzero(r > ratio * np.median(r)) for name, r in ranges.items()}
