"""The decoders (llama, Gemma 3) as plain torch modules, built from the converter's canonical weights.

What the TFLite exporter (converters/export_tflite.py) hands to litert-torch, and, with the cache
moved into buffers, what the Core ML exporter (converters/export_coreml.py) hands to coremltools;
`decoder_class(cfg)` picks the module of an architecture.
One step runs T new tokens at positions `input_pos` (consecutive, starting at past_len =
input_pos[0]) against a KV cache of `cache_len` slots per layer that the step only reads: it
returns the new tokens' keys and values ([1, kv_heads, T, head_dim] per layer) and the runtime writes them into the cache itself.
Attention is split into the cached part (slots < past_len, the rest masked) and the new part
(causal among the T tokens), one softmax over both: the graph never copies the cache.

Math as transformers' LlamaForCausalLM / Gemma3ForCausalLM in fp32 (same rope angles, same RMSNorm
order), so greedy output is comparable token for token.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ondevice.converters.canonical import Weight
from ondevice.converters.quantize import dequantize
from ondevice.errors import UnsupportedArchitectureError

NEG_INF = -1e30  # finite: a fully masked row must not turn into NaN


# each linear layer of a block -> the canonical weights stacked into it (rows: outputs side by side);
# q, k, v as one matmul and gate, up as another: fewer, larger ops to export and to run
STACKED = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
           "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def _tensor(w: Weight) -> torch.Tensor:
    return torch.from_numpy(np.array(dequantize(w), np.float32))  # a writable copy


def _projections(block: nn.Module, w: dict[str, Weight], i: int) -> None:
    """Layer i's linear layers (STACKED) as attributes of block."""
    for name, parts in STACKED.items():
        setattr(block, name, _linear(*(w[f"model.layers.{i}.{part}.weight"] for part in parts)))


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / max|x| before squaring: the same value, but SmolLM2's residual stream reaches ~25,000,
        # whose square overflows fp16 (Core ML computes in fp16; the plain form gives inf -> garbage)
        scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-6)
        y = x / scale
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps / scale.pow(2)))


class Block(nn.Module):
    def __init__(self, cfg, w: dict[str, Weight], i: int):
        super().__init__()
        p = f"model.layers.{i}."
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.attn_norm = RMSNorm(_tensor(w[p + "input_layernorm.weight"]), cfg.rms_norm_eps)
        self.mlp_norm = RMSNorm(_tensor(w[p + "post_attention_layernorm.weight"]), cfg.rms_norm_eps)
        _projections(self, w, i)

    def forward(self, x, cos, sin, cache_bias, new_bias, k_cache, v_cache):
        t, d = x.shape[1], self.head_dim
        q, k, v = self.qkv(self.attn_norm(x)).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        out, k, v = _attention(q.reshape(1, t, self.heads, d), k.reshape(1, t, self.kv_heads, d),
                               v.reshape(1, t, self.kv_heads, d), cos, sin, cache_bias, new_bias, k_cache, v_cache,
                               scale=1.0 / float(np.sqrt(d)))
        x = x + self.o(out)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up), k, v


def _attention(q, k, v, cos, sin, cache_bias, new_bias, k_cache, v_cache, scale: float):
    """q [1, T, H, D], k and v [1, T, KV, D] (before rope) against the cache [1, KV, S, D]: the
    attention output [1, T, H * D] and the new keys (rotated) and values [1, KV, T, D]."""
    _, t, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    # [1, T, H, D] -> [1, KV, G*T, D]: each kv head's query heads side by side, no repeated KV
    q = q.reshape(1, t, kv_heads, group, d).permute(0, 2, 3, 1, 4)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    q = _rope(q, cos, sin).reshape(1, kv_heads, group * t, d)
    k = _rope(k, cos, sin)
    scores = torch.cat([torch.matmul(q, k_cache.transpose(2, 3)) * scale + cache_bias,
                        torch.matmul(q, k.transpose(2, 3)) * scale + new_bias], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    cached = k_cache.shape[2]
    out = torch.matmul(probs[..., :cached], v_cache) + torch.matmul(probs[..., cached:], v)
    return out.view(1, kv_heads, group, t, d).permute(0, 3, 1, 2, 4).reshape(1, t, heads * d), k, v


def _linear(*parts: Weight) -> nn.Linear:
    """A bias-free linear layer; several weights are stacked row-wise (outputs side by side)."""
    weight = torch.cat([_tensor(w) for w in parts])
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves (Hugging Face's pairing); x [..., T, D], cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LlamaDecoder(nn.Module):
    """forward(tokens [1, T] int32, input_pos [T] int32, last [1] int32, k_0, v_0, ... [1, KV, S, D])
    -> {"logits": [1, vocab] at row `last`, "k_0", "v_0", ...: the T new keys/values per layer}."""

    block = Block

    def __init__(self, cfg, weights: dict[str, Weight], cache_len: int, mask_value: float = NEG_INF):
        super().__init__()
        self.cfg, self.cache_len, self.mask_value = cfg, cache_len, mask_value
        self.embed_tokens = nn.Parameter(_tensor(weights["model.embed_tokens.weight"]), requires_grad=False)
        head = weights.get("lm_head.weight")
        # tied: no second parameter (torch.jit.trace, which coremltools converts, refuses shared ones)
        tied = cfg.tie_embeddings or head is None
        self.head = None if tied else nn.Parameter(_tensor(head), requires_grad=False)
        self.layers = nn.ModuleList(self.block(cfg, weights, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(_tensor(weights["model.norm.weight"]), cfg.rms_norm_eps)
        self.register_buffer("inv_freq", _inv_freq(cfg.rope_theta, cfg.head_dim), persistent=False)
        self.register_buffer("slots", torch.arange(cache_len, dtype=torch.int32), persistent=False)

    def forward(self, tokens, input_pos, last, **cache):
        x, rope, biases = self.embed(tokens, input_pos)
        out = {}
        for i, layer in enumerate(self.layers):
            x, out[f"k_{i}"], out[f"v_{i}"] = layer(x, *rope, *biases, cache[f"k_{i}"], cache[f"v_{i}"])
        return {"logits": self.logits(x, last), **out}

    def embed(self, tokens, input_pos):
        """The step's hidden states [1, T, hidden], rope (cos, sin) and attention biases (cached part,
        new part) at positions input_pos, for the blocks."""
        x = F.embedding(tokens, self.embed_tokens)
        return x, self.rope(self.inv_freq, input_pos, x.dtype), self.biases(input_pos, x.dtype)

    def rope(self, inv_freq, input_pos, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D] at positions input_pos; the angles in fp32 even in an fp16 run."""
        angles = input_pos.float()[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)

    def biases(self, input_pos, dtype, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention biases of the cached part [G*T, S] and the new part [G*T, T] (G query heads per KV
        head): cached slots before the first new position count, the new tokens attend causally; with a
        window, a query sees only the `window` positions up to itself."""
        t = input_pos.shape[0]
        cached = self.slots[None, :] < input_pos[:1, None]
        causal = input_pos[None, :] <= input_pos[:, None]
        if window is not None:
            cached = cached & (input_pos[:, None] - self.slots[None, :] < window)
            causal = causal & (input_pos[:, None] - input_pos[None, :] < window)
        cache_bias = torch.where(cached, 0.0, self.mask_value).to(dtype)
        new_bias = torch.where(causal, 0.0, self.mask_value).to(dtype)
        group = self.cfg.num_heads // self.cfg.num_kv_heads
        return cache_bias.expand(t, self.cache_len).repeat(group, 1), new_bias.repeat(group, 1)

    def logits(self, x, last):
        """Logits [1, vocab] of row `last` of the blocks' output x [1, T, hidden]."""
        h = torch.index_select(x[0], 0, last)
        return F.linear(self.norm(h), self.embed_tokens if self.head is None else self.head)

    def sample_inputs(self, t: int) -> dict[str, torch.Tensor]:
        """Inputs of a T-token step (zeros), keyword by keyword as the signature names them."""
        c = self.cfg
        cache = {f"{kind}_{i}": torch.zeros(1, c.num_kv_heads, self.cache_len, c.head_dim)
                 for i in range(c.num_layers) for kind in "kv"}
        return {"tokens": torch.zeros(1, t, dtype=torch.int32),
                "input_pos": torch.arange(t, dtype=torch.int32),
                "last": torch.zeros(1, dtype=torch.int32), **cache}


def _inv_freq(theta: float, head_dim: int, scaling: float = 1.0) -> torch.Tensor:
    """Rope frequencies as transformers computes them, divided by a linear scaling factor."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)) / scaling


# --- Gemma 3 (the math of converters/arch/gemma3.py) ------------------------------------------------

# Gemma's residual stream reaches ~1e5 (gemma3-270m), past fp16's 65504, and Core ML computes in fp16.
# It is carried scaled by 1/8: only RMS norms read it (their eps scaled to match), and the norms that
# write into it scale their outputs; a power of two, so the fp32 results are the same bit for bit.
RESIDUAL_SCALE = 0.125


def _gemma_norm(w: Weight, eps: float, scale: float = 1.0) -> RMSNorm:
    return RMSNorm((1.0 + _tensor(w)) * scale, eps)  # Gemma scales by 1 + weight


class Gemma3Block(nn.Module):
    """Llama's block plus: q and k normed per head before rope, norms after attention and after the
    MLP, a GELU (tanh) MLP, attention scaled by query_pre_attn_scalar^-0.5. Sliding-window layers
    and global ones take different rope tables and biases: each block picks its kind's from the pairs."""

    def __init__(self, cfg, w: dict[str, Weight], i: int):
        super().__init__()
        p = f"model.layers.{i}."
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.kind = 0 if cfg.layer_types[i] == "sliding_attention" else 1  # index into embed's pairs
        self.scale = float(cfg.query_pre_attn_scalar ** -0.5)
        s, eps = RESIDUAL_SCALE, cfg.rms_norm_eps
        norm = {name: _gemma_norm(w[p + name + ".weight"], eps * s * s) for name in  # they read the residual
                ("input_layernorm", "pre_feedforward_layernorm")}
        norm |= {name: _gemma_norm(w[p + name + ".weight"], eps, scale=s) for name in  # they write into it
                 ("post_attention_layernorm", "post_feedforward_layernorm")}
        norm |= {name: _gemma_norm(w[p + name + ".weight"], eps) for name in ("self_attn.q_norm", "self_attn.k_norm")}
        self.attn_norm, self.post_attn_norm = norm["input_layernorm"], norm["post_attention_layernorm"]
        self.mlp_norm, self.post_mlp_norm = norm["pre_feedforward_layernorm"], norm["post_feedforward_layernorm"]
        self.q_norm, self.k_norm = norm["self_attn.q_norm"], norm["self_attn.k_norm"]
        _projections(self, w, i)

    def forward(self, x, cos, sin, cache_bias, new_bias, k_cache, v_cache):
        """cos, sin, cache_bias, new_bias: pairs (sliding-window layers', global layers')."""
        cos, sin, cache_bias, new_bias = (pair[self.kind] for pair in (cos, sin, cache_bias, new_bias))
        t, d = x.shape[1], self.head_dim
        q, k, v = self.qkv(self.attn_norm(x)).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = self.q_norm(q.reshape(1, t, self.heads, d))
        k = self.k_norm(k.reshape(1, t, self.kv_heads, d))
        out, k, v = _attention(q, k, v.reshape(1, t, self.kv_heads, d), cos, sin, cache_bias, new_bias,
                               k_cache, v_cache, scale=self.scale)
        x = x + self.post_attn_norm(self.o(out))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.post_mlp_norm(self.down(F.gelu(gate, approximate="tanh") * up)), k, v


class Gemma3Decoder(LlamaDecoder):
    """LlamaDecoder's interface (inputs, outputs, cache) with Gemma 3's blocks, its embedding scaled by
    sqrt(hidden), and for each step two rope tables and two pairs of biases: the sliding-window
    layers' (local rope base, keys older than the window masked) and the global layers'."""

    block = Gemma3Block

    def __init__(self, cfg, weights: dict[str, Weight], cache_len: int, mask_value: float = NEG_INF):
        super().__init__(cfg, weights, cache_len, mask_value)
        # in place of llama's: the final norm scales by 1 + weight, global rope positions are scaled
        self.norm = _gemma_norm(weights["model.norm.weight"], cfg.rms_norm_eps * RESIDUAL_SCALE ** 2)
        self.inv_freq = _inv_freq(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling_factor)
        self.register_buffer("local_inv_freq", _inv_freq(cfg.rope_local_theta, cfg.head_dim), persistent=False)
        # transformers rounds sqrt(hidden) to fp32; the residual stream starts scaled
        self.embed_scale = float(np.float32(cfg.hidden_size ** 0.5)) * RESIDUAL_SCALE

    def embed(self, tokens, input_pos):
        """As LlamaDecoder.embed, each of rope's and the biases' tensors a pair (local, global)."""
        x = F.embedding(tokens, self.embed_tokens) * self.embed_scale
        (cos_local, sin_local), (cos, sin) = (self.rope(f, input_pos, x.dtype)
                                              for f in (self.local_inv_freq, self.inv_freq))
        cache_local, new_local = self.biases(input_pos, x.dtype, window=self.cfg.sliding_window)
        cache, new = self.biases(input_pos, x.dtype)
        return x, ((cos_local, cos), (sin_local, sin)), ((cache_local, cache), (new_local, new))


def decoder_class(cfg) -> type[LlamaDecoder]:
    """The module of cfg's architecture (by its config class), for the TFLite and Core ML exporters."""
    from ondevice.converters.arch.gemma3 import Gemma3Config
    from ondevice.converters.arch.llama import LlamaConfig

    decoders = {LlamaConfig: LlamaDecoder, Gemma3Config: Gemma3Decoder}
    if type(cfg) not in decoders:
        raise UnsupportedArchitectureError(f"the TFLite and Core ML exporters handle llama and gemma3 models, "
                                           f"not {type(cfg).__name__}")
    return decoders[type(cfg)]
