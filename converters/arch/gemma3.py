"""Gemma 3 (text): config, checkpoint name mapping, ONNX graph.

Differs from llama in: sliding-window (local) attention layers interleaved with global ones, each
kind with its own rope base; RMS norms of q and k per head; a norm after attention and around the
MLP (pre and post); RMSNorm scaling by (1 + weight); the embedding scaled by sqrt(hidden); a GELU
(tanh approximation) gated MLP; attention scaled by query_pre_attn_scalar^-0.5; a tied LM head.
Checked against transformers' modeling_gemma3 (see tests/test_gemma3.py).

The graph has llama's signature (same inputs, outputs and KV layout), so the runtime runs it as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ondevice.converters.canonical import Weight, check_attention, gguf_number
from ondevice.converters.export_onnx import MS_DOMAIN, GraphBuilder
from ondevice.converters.quantize import QuantSpec, concat_rows, dequantize, quantize_linear
from ondevice.errors import SourceFormatError, UnsupportedArchitectureError

SLIDING, FULL = "sliding_attention", "full_attention"
# Not in Gemma 3 GGUFs: llama.cpp and transformers both use every 6th layer global, and a local rope
# base of 10000.
DEFAULT_PATTERN = 6
DEFAULT_LOCAL_ROPE_THETA = 10000.0
# Options of `convert` built on llama's graph pieces or its numpy forward; not for Gemma yet.
UNSUPPORTED_OPTIONS = ("draft_of", "split_prefill", "int8_prefill", "flash", "trim_layers", "trim_ffn", "trim_heads")
# Gemma 3 GGUFs often carry no chat template: the text part of the one Google ships with the model.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass
class Gemma3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float  # global layers
    rope_local_theta: float  # sliding-window layers
    rope_scaling_factor: float  # linear scaling of the global layers' positions (1.0: none)
    rms_norm_eps: float
    max_context: int
    tie_embeddings: bool
    sliding_window: int  # a query sees itself and the sliding_window - 1 keys before it
    layer_types: list[str]
    query_pre_attn_scalar: float

    def to_dict(self) -> dict:
        return asdict(self)


def _pattern_types(n_layers: int, period: int) -> list[str]:
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(n_layers)]


# --- from each source format -----------------------------------------------------------------

def config_from_gguf(meta: dict, weights: dict[str, Weight]) -> Gemma3Config:
    def get(key, kind=int, default=None):
        return gguf_number(meta, f"gemma3.{key}", kind, default)

    scaling = meta.get("gemma3.rope.scaling.type") or "none"
    if scaling not in ("none", "linear"):
        raise UnsupportedArchitectureError(f"gemma3 with rope scaling {scaling!r} is not supported")
    hidden, heads, layers = get("embedding_length"), get("attention.head_count"), get("block_count")
    head_dim = get("attention.key_length", default=hidden // heads)
    if get("attention.value_length", default=head_dim) != head_dim:
        raise UnsupportedArchitectureError("gemma3 with different key and value head sizes is not supported")
    pattern = meta.get("gemma3.attention.sliding_window_pattern", DEFAULT_PATTERN)
    if isinstance(pattern, list):  # per layer: true = sliding window
        if len(pattern) != layers:
            raise SourceFormatError(f"GGUF metadata gemma3.attention.sliding_window_pattern has {len(pattern)} "
                                    f"entries for {layers} layers")
        types = [SLIDING if p else FULL for p in pattern]
    else:
        types = _pattern_types(layers, get("attention.sliding_window_pattern", default=DEFAULT_PATTERN))
    if "token_embd.weight" not in weights:
        raise SourceFormatError("GGUF lacks token_embd.weight")
    cfg = Gemma3Config(
        vocab_size=weights["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", default=heads),
        head_dim=head_dim,
        rope_theta=get("rope.freq_base", float, 1000000.0),
        rope_local_theta=get("rope.freq_base_swa", float, DEFAULT_LOCAL_ROPE_THETA),
        rope_scaling_factor=get("rope.scaling.factor", float, 1.0) if scaling == "linear" else 1.0,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", float),
        max_context=get("context_length"),
        tie_embeddings="output.weight" not in weights,
        sliding_window=get("attention.sliding_window"),
        layer_types=types,
        # llama.cpp's rule (the GGUF does not say): 27B scales by hidden / heads, the others by head_dim.
        query_pre_attn_scalar=float(hidden // heads if layers == 62 else head_dim),
    )
    check_attention(cfg)
    return cfg


def gguf_shapes(cfg: Gemma3Config):
    """(GGUF tensor name, [rows, cols] or [size]) of every tensor the config implies, layer by layer."""
    h, q, kv, ff, hd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
        cfg.intermediate_size, cfg.head_dim
    yield "token_embd.weight", (cfg.vocab_size, h)
    yield "output_norm.weight", (h,)
    if not cfg.tie_embeddings:
        yield "output.weight", (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        for kind, shape in (("attn_norm", (h,)), ("post_attention_norm", (h,)), ("ffn_norm", (h,)),
                            ("post_ffw_norm", (h,)), ("attn_q_norm", (hd,)), ("attn_k_norm", (hd,)),
                            ("attn_q", (q, h)), ("attn_k", (kv, h)), ("attn_v", (kv, h)), ("attn_output", (h, q)),
                            ("ffn_gate", (ff, h)), ("ffn_up", (ff, h)), ("ffn_down", (h, ff))):
            yield f"blk.{i}.{kind}.weight", shape


def config_from_hf(cfg: dict, weights: dict[str, Weight]) -> Gemma3Config:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise UnsupportedArchitectureError(f"gemma3 with {key} is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedArchitectureError("gemma3 with bidirectional attention (an encoder) is not supported")
    layers, heads = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    # transformers >= 5: rope_parameters per layer type; older: rope_theta + rope_local_base_freq.
    rope = cfg.get("rope_parameters") or {}
    full = rope.get(FULL, {"rope_theta": cfg.get("rope_theta", 1000000.0), **(cfg.get("rope_scaling") or {})})
    local = rope.get(SLIDING, {"rope_theta": cfg.get("rope_local_base_freq", DEFAULT_LOCAL_ROPE_THETA)})
    factor = 1.0
    for name, params in ((FULL, full), (SLIDING, local)):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "linear" and name == FULL:
            factor = float(params["factor"])
        elif kind != "default":
            raise UnsupportedArchitectureError(f"gemma3 with rope type {kind!r} ({name}) is not supported")
    types = cfg.get("layer_types") or _pattern_types(layers, int(cfg.get("sliding_window_pattern", DEFAULT_PATTERN)))
    return Gemma3Config(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or 256),
        rope_theta=float(full["rope_theta"]),
        rope_local_theta=float(local["rope_theta"]),
        rope_scaling_factor=factor,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_context=int(cfg.get("max_position_embeddings", 32768)),
        tie_embeddings="lm_head.weight" not in weights,
        sliding_window=int(cfg.get("sliding_window") or 4096),
        layer_types=list(types),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or 256),
    )


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def canonical_from_gguf(weights: dict[str, Weight], cfg: Gemma3Config) -> dict[str, Weight]:
    """HF names and conventions. llama.cpp stores Gemma's norm weights as 1 + w (its RMSNorm
    multiplies by the weight); HF keeps w and scales by 1 + w, so 1 is taken off here (as
    transformers' GGUF loader does: the same float32 values reach the graph)."""
    out: dict[str, Weight] = {}
    for name, w in weights.items():
        if name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            out["model.norm.weight"] = _norm_from_gguf(w)
        elif name == "output.weight":
            out["lm_head.weight"] = w
        elif name.startswith("blk."):
            parts = name.split(".")
            if len(parts) != 4:
                raise SourceFormatError(f"GGUF tensor name {name!r} is not blk.<layer>.<kind>.<weight|bias>")
            _, layer, kind, _ = parts
            if kind not in _GGUF_NAMES:
                raise UnsupportedArchitectureError(f"gemma3 GGUF tensor {name} is not known")
            if kind.endswith("norm"):
                w = _norm_from_gguf(w)
            out[f"model.layers.{layer}.{_GGUF_NAMES[kind]}.weight"] = w
    return out


def _norm_from_gguf(w: Weight) -> np.ndarray:
    return dequantize(w) - np.float32(1.0)


def canonical_from_hf(weights: dict[str, Weight], cfg: Gemma3Config) -> dict[str, Weight]:
    if any(k.startswith(("language_model.", "model.language_model.", "vision_tower.")) for k in weights):
        raise UnsupportedArchitectureError("multimodal Gemma 3 checkpoints are not supported; use the text model")
    return dict(weights)


# --- the graph ----------------------------------------------------------------------------------

def inv_freq(theta: float, head_dim: int, scaling: float = 1.0) -> np.ndarray:
    """Rope frequencies as transformers computes them (float32), divided by a linear scaling factor."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents) / np.float32(scaling)).astype(np.float32)


def _rope_tables(g: GraphBuilder, name: str, freqs: np.ndarray, max_context: int) -> tuple[str, str]:
    """cos/sin [max_context, head_dim / 2] computed in the graph from positions x frequencies in
    float32, as transformers does; ONNX Runtime folds them into constants when the session loads, so
    the bundle does not store 2 x 2 tables of the whole context (64 MB at 32k)."""
    column = g.const(f"rope.positions.{max_context}", np.arange(max_context, dtype=np.float32)[:, None])
    angles = g.node("Mul", [column, g.const(f"rope.{name}.inv_freq", freqs[None, :])], f"rope.{name}.angles")[0]
    return (g.node("Cos", [angles], f"rope.{name}.cos")[0], g.node("Sin", [angles], f"rope.{name}.sin")[0])


class GemmaWeights:
    """Graph weights: norms as float (1 + w), linears from `spec`. GGUF blocks of every type in a
    K-quant mix (Q4_K, Q5_0, Q6_K, Q8_0) are carried exactly (4-bit where they fit, else 8-bit),
    never re-quantized: the mix is llama.cpp's choice of precision per tensor."""

    def __init__(self, weights: dict[str, Weight], spec: QuantSpec):
        self.weights, self.spec = weights, spec
        self.sources: dict[str, set[str]] = {}  # group -> how its tensors were stored, over all layers

    @property
    def quant_record(self) -> dict[str, str]:
        return {key: " | ".join(sorted(s)) for key, s in self.sources.items()}

    def need(self, name: str) -> Weight:
        if name not in self.weights:
            raise SourceFormatError(f"checkpoint lacks tensor {name}")
        return self.weights[name]

    def norm(self, name: str) -> np.ndarray:
        return (np.float32(1.0) + dequantize(self.need(name))).astype(np.float32)

    def linear(self, names: list[str], key: str):
        parts = [quantize_linear(self.need(n), self.spec, keep_8bit=True) for n in names]
        if len(parts) == 1:
            w = parts[0]
        elif all(isinstance(p, np.ndarray) for p in parts):
            w = np.concatenate(parts)
        else:
            w = concat_rows(parts)
        self.sources.setdefault(key, set()).update(getattr(w, "source", self.spec.mode).split(" | "))
        return w


def _head_norm(g: GraphBuilder, x: str, weight: np.ndarray, heads: int, cfg: Gemma3Config, name: str) -> str:
    """RMS norm over each head's head_dim slice of x [1, T, heads * head_dim]."""
    per_head = g.node("Reshape", [x, g.const(f"heads.shape.{heads}", np.array([0, 0, heads, cfg.head_dim], np.int64))],
                      name + ".heads")[0]
    normed = g.rms_norm(per_head, weight, cfg.rms_norm_eps, name)
    return g.node("Reshape", [normed, g.const("heads.merge", np.array([0, 0, -1], np.int64))], name + ".merged")[0]


def attention(g: GraphBuilder, cfg: Gemma3Config, w: GemmaWeights, i: int, normed: str, a: dict) -> str:
    p = f"model.layers.{i}"
    qkv = w.linear([f"{p}.self_attn.{n}_proj.weight" for n in "qkv"], "attention.qkv")
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    split = g.const("qkv.split", np.array([q_size, kv_size, kv_size], np.int64))
    q, k, v = g.node("Split", [g.linear(normed, qkv, f"{p}.self_attn.qkv_proj"), split],
                     [f"{p}.q", f"{p}.k", f"{p}.v"], axis=-1)
    q = _head_norm(g, q, w.norm(f"{p}.self_attn.q_norm.weight"), cfg.num_heads, cfg, f"{p}.q_norm")
    k = _head_norm(g, k, w.norm(f"{p}.self_attn.k_norm.weight"), cfg.num_kv_heads, cfg, f"{p}.k_norm")
    kv, hd, sfx = cfg.num_kv_heads, cfg.head_dim, f".{i}"
    past_k = g.input(f"past_key{sfx}", "float32", [1, kv, "capacity", hd])
    past_v = g.input(f"past_value{sfx}", "float32", [1, kv, "capacity", hd])
    sliding = cfg.layer_types[i] == SLIDING
    cos, sin = a["local"] if sliding else a["global"]
    # transformers: a query sees the sliding_window keys up to itself; ONNX Runtime's local_window_size
    # of the same value gives its logits (tests/test_gemma3.py checks positions past the window).
    window = {"local_window_size": cfg.sliding_window} if sliding else {}
    out, _, _ = g.node(
        "GroupQueryAttention", [q, k, v, past_k, past_v, a["seqlens_k"], a["total_len"], cos, sin,
                                a["position_ids"], a["attention_bias"], "", "", "", "", "", a["query_seqlens"]],
        [f"{p}.attn.out", f"present_key{sfx}", f"present_value{sfx}"], MS_DOMAIN,
        num_heads=cfg.num_heads, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0,
        scale=float(cfg.query_pre_attn_scalar ** -0.5), **window)
    g.output(f"present_key{sfx}", "float32", [1, kv, "capacity", hd])
    g.output(f"present_value{sfx}", "float32", [1, kv, "capacity", hd])
    o = g.linear(out, w.linear([f"{p}.self_attn.o_proj.weight"], "attention.o"), f"{p}.self_attn.o_proj")
    return g.rms_norm(o, w.norm(f"{p}.post_attention_layernorm.weight"), cfg.rms_norm_eps, f"{p}.post_attention_norm")


def mlp(g: GraphBuilder, cfg: Gemma3Config, w: GemmaWeights, i: int, normed: str) -> str:
    p = f"model.layers.{i}"
    gate_up = w.linear([f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"], "mlp.gate_up")
    gate, up = g.node("Split", [g.linear(normed, gate_up, f"{p}.mlp.gate_up_proj")], [f"{p}.mlp.gate", f"{p}.mlp.up"],
                      axis=-1, num_outputs=2)
    act = g.node("Gelu", [gate], f"{p}.mlp.gelu", approximate="tanh")[0]
    h = g.node("Mul", [act, up], f"{p}.mlp.h")[0]
    down = g.linear(h, w.linear([f"{p}.mlp.down_proj.weight"], "mlp.down"), f"{p}.mlp.down_proj")
    return g.rms_norm(down, w.norm(f"{p}.post_feedforward_layernorm.weight"), cfg.rms_norm_eps, f"{p}.post_mlp_norm")


def build(g: GraphBuilder, cfg: Gemma3Config, weights: dict[str, Weight], spec: QuantSpec, max_context: int) -> dict:
    """Compose the decoder graph (llama's inputs and outputs); returns the quantization record."""
    w = GemmaWeights(weights, spec)
    ids = g.input("input_ids", "int64", [1, "T"])
    a = {"seqlens_k": g.input("seqlens_k", "int32", [1]),
         "total_len": g.input("total_sequence_length", "int32", []),
         "position_ids": g.input("position_ids", "int64", [1, "T"]),
         "attention_bias": g.input("attention_bias", "float32", [1, 1, "T", "total"]),
         "query_seqlens": g.input("query_seqlens", "int32", [1]),
         "local": _rope_tables(g, "local", inv_freq(cfg.rope_local_theta, cfg.head_dim), max_context),
         "global": _rope_tables(g, "global", inv_freq(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling_factor),
                                max_context)}
    logits_from = g.input("logits_from", "int64", [1])

    table = w.linear(["model.embed_tokens.weight"], "embedding")
    rows = g.embedding(ids, table, "model.embed_tokens", cfg.hidden_size)
    # transformers multiplies by sqrt(hidden) rounded to float32
    residual = g.node("Mul", [rows, g.const("embed.scale", np.array(cfg.hidden_size ** 0.5, np.float32))],
                      "model.embed_scaled")[0]
    normed = g.rms_norm(residual, w.norm("model.layers.0.input_layernorm.weight"), cfg.rms_norm_eps,
                        "model.layers.0.input_norm")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        attn = attention(g, cfg, w, i, normed, a)
        normed, residual = g.skip_rms_norm(attn, residual, w.norm(f"{p}.pre_feedforward_layernorm.weight"),
                                           cfg.rms_norm_eps, f"{p}.pre_mlp_norm")
        after = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < cfg.num_layers else "model.norm.weight"
        normed, residual = g.skip_rms_norm(mlp(g, cfg, w, i, normed), residual, w.norm(after), cfg.rms_norm_eps,
                                           f"{p}.output_norm")

    ends = g.const("logits.ends", np.array([np.iinfo(np.int64).max], np.int64))
    kept = g.node("Slice", [normed, logits_from, ends, g.const("logits.axis", np.array([1], np.int64))],
                  "logits.kept")[0]
    if cfg.tie_embeddings:
        head = table
        w.sources["lm_head"] = {"tied to embedding"}
    else:
        head = w.linear(["lm_head.weight"], "lm_head")
    g.linear(kept, head, "model.embed_tokens" if cfg.tie_embeddings else "lm_head")
    g.nodes[-1].output[0] = "logits"
    g.output("logits", "float32", [1, "L", head.shape[0]])
    return w.quant_record
