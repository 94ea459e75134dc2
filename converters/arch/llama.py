"""Llama family (Llama 2/3, SmolLM, TinyLlama, ...): config, checkpoint name mapping, ONNX graph.

The graph serves prefill, decode and (later) token-tree verification alike: T new tokens attend to
a shared past/present KV buffer of the engine's capacity; `logits_from` picks the first position
whose logits are computed (T-1 for generation, 0 for scoring).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ondevice.converters.canonical import QTensor, Weight, check_attention, gguf_number
from ondevice.converters.export_onnx import MS_DOMAIN, GraphBuilder
from ondevice.converters.quantize import QuantSpec, concat_rows, quantize_linear
from ondevice.errors import SourceFormatError, UnsupportedArchitectureError


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_context: int
    tie_embeddings: bool

    def to_dict(self) -> dict:
        return asdict(self)


# --- from each source format -----------------------------------------------------------------

def config_from_gguf(meta: dict, weights: dict[str, Weight]) -> LlamaConfig:
    def get(key, kind=int, default=None):
        return gguf_number(meta, f"llama.{key}", kind, default)

    if meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise UnsupportedArchitectureError("llama with rope scaling is not supported yet")
    if "token_embd.weight" not in weights:
        raise SourceFormatError("GGUF lacks token_embd.weight")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    cfg = LlamaConfig(
        vocab_size=get("vocab_size", default=weights["token_embd.weight"].shape[0]),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", default=heads),
        head_dim=get("rope.dimension_count", default=hidden // heads),
        rope_theta=get("rope.freq_base", float, 10000.0),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", float),
        max_context=get("context_length"),
        tie_embeddings="output.weight" not in weights,
    )
    check_attention(cfg)
    return cfg


def gguf_shapes(cfg: LlamaConfig):
    """(GGUF tensor name, [rows, cols] or [size]) of every tensor the config implies, layer by layer."""
    h, q, kv, ff = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
        cfg.intermediate_size
    yield "token_embd.weight", (cfg.vocab_size, h)
    yield "output_norm.weight", (h,)
    if not cfg.tie_embeddings:
        yield "output.weight", (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        for kind, shape in (("attn_norm", (h,)), ("ffn_norm", (h,)), ("attn_q", (q, h)), ("attn_k", (kv, h)),
                            ("attn_v", (kv, h)), ("attn_output", (h, q)), ("ffn_gate", (ff, h)),
                            ("ffn_up", (ff, h)), ("ffn_down", (h, ff))):
            yield f"blk.{i}.{kind}.weight", shape


def config_from_hf(cfg: dict, weights: dict[str, Weight]) -> LlamaConfig:
    # transformers >= 5 writes rope settings under rope_parameters; older versions at the top level.
    rope = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type") or (cfg.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type != "default" or (cfg.get("rope_scaling") and not rope):
        raise UnsupportedArchitectureError(f"llama with rope type {rope_type!r} is not supported yet")
    heads = int(cfg["num_attention_heads"])
    return LlamaConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_context=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings="lm_head.weight" not in weights or bool(cfg.get("tie_word_embeddings")),
    )


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _unpermute_rows(w: Weight, n_head: int) -> Weight:
    """Undo llama.cpp's q/k row permutation (its rope pairs adjacent dims; HF pairs halves)."""
    rows = w.shape[0]
    order = np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)
    inverse = np.argsort(order)
    return w.take_rows(inverse) if isinstance(w, QTensor) else w[inverse]


def canonical_from_gguf(weights: dict[str, Weight], cfg: LlamaConfig) -> dict[str, Weight]:
    out: dict[str, Weight] = {}
    for name, w in weights.items():
        if name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            out["model.norm.weight"] = w
        elif name == "output.weight":
            out["lm_head.weight"] = w
        elif name.startswith("blk."):
            parts = name.split(".")
            if len(parts) != 4:
                raise SourceFormatError(f"GGUF tensor name {name!r} is not blk.<layer>.<kind>.<weight|bias>")
            _, layer, kind, _ = parts
            if kind not in _GGUF_NAMES:
                continue  # e.g. rope_freqs: derived from the config instead
            if kind == "attn_q":
                w = _unpermute_rows(w, cfg.num_heads)
            elif kind == "attn_k":
                w = _unpermute_rows(w, cfg.num_kv_heads)
            out[f"model.layers.{layer}.{_GGUF_NAMES[kind]}.weight"] = w
    return out


def canonical_from_hf(weights: dict[str, Weight], cfg: LlamaConfig) -> dict[str, Weight]:
    return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}


# --- the graph ----------------------------------------------------------------------------------

def rope_cache(cfg: LlamaConfig, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    angles = np.arange(max_context, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _norm(w: Weight) -> np.ndarray:
    return w.dequantize() if isinstance(w, QTensor) else np.asarray(w, np.float32)


class LlamaWeights:
    """The checkpoint's tensors as graph weights: norms as float, linears quantized by `spec`
    (several names concatenated row-wise, e.g. q, k, v); records how each group was quantized."""

    def __init__(self, weights: dict[str, Weight], spec: QuantSpec):
        self.weights, self.spec = weights, spec
        self.quant_record: dict[str, str] = {}

    def need(self, name: str) -> Weight:
        if name not in self.weights:
            raise SourceFormatError(f"checkpoint lacks tensor {name}")
        return self.weights[name]

    def norm(self, name: str) -> np.ndarray:
        return _norm(self.need(name))

    def linear(self, names: list[str], key: str, keep_8bit: bool = False):
        parts = [quantize_linear(self.need(n), self.spec, keep_8bit) for n in names]
        if len(parts) == 1:
            w = parts[0]
        elif all(isinstance(p, np.ndarray) for p in parts):
            w = np.concatenate(parts)
        else:
            w = concat_rows(parts)
        self.quant_record[key] = getattr(w, "source", self.spec.mode)
        return w


# The pieces of a decoder graph. The one-shot graph (`build`) chains them; the split prefill graphs
# (converters/split_prefill.py) put each in its own graph, so an NPU can run the linear ones and a
# CPU the attention over the KV cache.

def attention_inputs(g: GraphBuilder, cfg: LlamaConfig, max_context: int, chunk: int | str = "T") -> dict[str, str]:
    """The inputs GroupQueryAttention needs besides qkv and the cache (see `build`), and the rope tables."""
    # Explicit positions and an additive mask over (past + T) let one graph verify a token tree;
    # plain prefill/decode pass consecutive positions and zeros (GQA still applies causality).
    # query_seqlens: how many of the T rows are real tokens: a fixed-size chunk pads the rest (static
    # shapes for NPUs; total_sequence_length may then be the cache capacity, an upper bound).
    cos, sin = rope_cache(cfg, max_context)
    return {"seqlens_k": g.input("seqlens_k", "int32", [1]),
            "total_len": g.input("total_sequence_length", "int32", []),
            "position_ids": g.input("position_ids", "int64", [1, chunk]),
            "attention_bias": g.input("attention_bias", "float32", [1, 1, chunk, "total"]),
            "query_seqlens": g.input("query_seqlens", "int32", [1]),
            "cos": g.const("rope.cos", cos), "sin": g.const("rope.sin", sin)}


def embed(g: GraphBuilder, cfg: LlamaConfig, w: LlamaWeights, ids: str):
    """Token rows, and the first layer's input norm: (normed, residual, embedding weight)."""
    table = w.linear(["model.embed_tokens.weight"], "embedding", keep_8bit=True)
    x = g.embedding(ids, table, "model.embed_tokens", cfg.hidden_size)
    normed = g.rms_norm(x, w.norm("model.layers.0.input_layernorm.weight"), cfg.rms_norm_eps,
                        "model.layers.0.input_norm")
    return normed, x, table


def qkv_projection(g: GraphBuilder, w: LlamaWeights, i: int, normed: str) -> str:
    p = f"model.layers.{i}"
    qkv = w.linear([f"{p}.self_attn.{n}_proj.weight" for n in "qkv"], "attention.qkv")
    return g.linear(normed, qkv, f"{p}.self_attn.qkv_proj")


def attention(g: GraphBuilder, cfg: LlamaConfig, i: int, qkv: str, a: dict[str, str], kv_suffix: str) -> str:
    """GroupQueryAttention (rotary inside) of layer i over the shared past/present buffer named
    past_key{kv_suffix} etc.; returns the attention output [1, T, heads * head_dim]."""
    kv, hd = cfg.num_kv_heads, cfg.head_dim
    past_k = g.input(f"past_key{kv_suffix}", "float32", [1, kv, "capacity", hd])
    past_v = g.input(f"past_value{kv_suffix}", "float32", [1, kv, "capacity", hd])
    out, _, _ = g.node(
        "GroupQueryAttention", [qkv, "", "", past_k, past_v, a["seqlens_k"], a["total_len"], a["cos"], a["sin"],
                                a["position_ids"], a["attention_bias"], "", "", "", "", "", a["query_seqlens"]],
        [f"model.layers.{i}.attn.out", f"present_key{kv_suffix}", f"present_value{kv_suffix}"], MS_DOMAIN,
        num_heads=cfg.num_heads, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0, scale=float(hd ** -0.5))
    g.output(f"present_key{kv_suffix}", "float32", [1, kv, "capacity", hd])
    g.output(f"present_value{kv_suffix}", "float32", [1, kv, "capacity", hd])
    return out


def after_attention(g: GraphBuilder, cfg: LlamaConfig, w: LlamaWeights, i: int, attn: str,
                    residual: str) -> tuple[str, str]:
    """O projection + residual + norm + MLP + residual + the next layer's input norm (the final norm
    after the last layer): (normed, residual) for the next layer."""
    normed, residual = output_projection(g, cfg, w, i, attn, residual)
    return next_layer_input(g, cfg, w, i, mlp(g, w, i, normed), residual)


def output_projection(g: GraphBuilder, cfg: LlamaConfig, w: LlamaWeights, i: int, attn: str,
                      residual: str) -> tuple[str, str]:
    """O projection + residual + the post-attention norm: (the MLP's input, residual)."""
    p = f"model.layers.{i}"
    o = g.linear(attn, w.linear([f"{p}.self_attn.o_proj.weight"], "attention.o"), f"{p}.self_attn.o_proj")
    return g.skip_rms_norm(o, residual, w.norm(f"{p}.post_attention_layernorm.weight"), cfg.rms_norm_eps,
                           f"{p}.post_attention_norm")


def mlp(g: GraphBuilder, w: LlamaWeights, i: int, normed: str) -> str:
    p = f"model.layers.{i}"
    gate_up = w.linear([f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"], "mlp.gate_up")
    h = g.silu_mul(g.linear(normed, gate_up, f"{p}.mlp.gate_up_proj"), f"{p}.mlp")
    return g.linear(h, w.linear([f"{p}.mlp.down_proj.weight"], "mlp.down"), f"{p}.mlp.down_proj")


def next_layer_input(g: GraphBuilder, cfg: LlamaConfig, w: LlamaWeights, i: int, mlp_out: str,
                     residual: str) -> tuple[str, str]:
    """Residual + layer i's MLP output, normed for layer i + 1 (the final norm after the last layer)."""
    next_norm = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < cfg.num_layers else "model.norm.weight"
    return g.skip_rms_norm(mlp_out, residual, w.norm(next_norm), cfg.rms_norm_eps, f"model.layers.{i}.output_norm")


def lm_head(g: GraphBuilder, cfg: LlamaConfig, w: LlamaWeights, normed: str, logits_from: str, table) -> str:
    """Logits of the positions from `logits_from` on (output "logits"); `table` is the embedding
    weight a tied head shares."""
    ends = g.const("logits.ends", np.array([np.iinfo(np.int64).max], np.int64))
    axis = g.const("logits.axis", np.array([1], np.int64))
    kept = g.node("Slice", [normed, logits_from, ends, axis], "logits.kept")[0]
    if cfg.tie_embeddings:
        head = table
        w.quant_record["lm_head"] = "tied to embedding"
    else:
        head = w.linear(["lm_head.weight"], "lm_head", keep_8bit=True)
    g.linear(kept, head, "model.embed_tokens" if cfg.tie_embeddings else "lm_head")
    g.nodes[-1].output[0] = "logits"
    return g.output("logits", "float32", [1, "L", head.shape[0]])  # a draft's head may keep fewer rows


def build(g: GraphBuilder, cfg: LlamaConfig, weights: dict[str, Weight], spec: QuantSpec,
          max_context: int) -> dict:
    """Compose the decoder graph; returns the quantization record for the manifest."""
    w = LlamaWeights(weights, spec)
    ids = g.input("input_ids", "int64", [1, "T"])
    a = attention_inputs(g, cfg, max_context)
    logits_from = g.input("logits_from", "int64", [1])
    normed, residual, table = embed(g, cfg, w, ids)
    for i in range(cfg.num_layers):
        attn = attention(g, cfg, i, qkv_projection(g, w, i, normed), a, kv_suffix=f".{i}")
        normed, residual = after_attention(g, cfg, w, i, attn, residual)
    lm_head(g, cfg, w, normed, logits_from, table)
    return w.quant_record
