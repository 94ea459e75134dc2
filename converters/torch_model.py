"""The llama decoder as a plain torch module, built from the converter's canonical weights.

What the TFLite exporter (converters/export_tflite.py) hands to litert-torch, and, with the cache
moved into buffers, what the Core ML exporter (converters/export_coreml.py) hands to coremltools.
One step runs T new tokens at positions `input_pos` (consecutive, starting at past_len =
input_pos[0]) against a KV cache of `cache_len` slots per layer that the step only reads: it
returns the new tokens' keys and values ([1, kv_heads, T, head_dim] per layer) and the runtime writes them into the cache itself.
Attention is split into the cached part (slots < past_len, the rest masked) and the new part
(causal among the T tokens), one softmax over both: the graph never copies the cache.

Math as transformers' LlamaForCausalLM in fp32 (same rope angles, same RMSNorm order), so greedy
output is comparable token for token.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ondevice.converters.canonical import QTensor, Weight

NEG_INF = -1e30  # finite: a fully masked row must not turn into NaN


def _tensor(w: Weight) -> torch.Tensor:
    array = w.dequantize() if isinstance(w, QTensor) else np.asarray(w, np.float32)
    return torch.from_numpy(np.array(array, np.float32))  # a writable copy


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Block(nn.Module):
    def __init__(self, cfg, w: dict[str, Weight], i: int):
        super().__init__()
        p = f"model.layers.{i}."
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.attn_norm = RMSNorm(_tensor(w[p + "input_layernorm.weight"]), cfg.rms_norm_eps)
        self.mlp_norm = RMSNorm(_tensor(w[p + "post_attention_layernorm.weight"]), cfg.rms_norm_eps)
        # q, k, v as one matmul and gate, up as another: fewer, larger ops to export and to run
        self.qkv = _linear(*(w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"))
        self.o = _linear(w[p + "self_attn.o_proj.weight"])
        self.gate_up = _linear(w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"])
        self.down = _linear(w[p + "mlp.down_proj.weight"])

    def forward(self, x, cos, sin, cache_bias, new_bias, k_cache, v_cache):
        t, group, d = x.shape[1], self.heads // self.kv_heads, self.head_dim
        q, k, v = self.qkv(self.attn_norm(x)).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        # [1, T, H*D] -> [1, KV, G*T, D]: each kv head's query heads side by side, no repeated KV
        q = q.reshape(1, t, self.kv_heads, group, d).permute(0, 2, 3, 1, 4)
        k = k.reshape(1, t, self.kv_heads, d).transpose(1, 2)
        v = v.reshape(1, t, self.kv_heads, d).transpose(1, 2)
        q = _rope(q, cos, sin).reshape(1, self.kv_heads, group * t, d)
        k = _rope(k, cos, sin)
        scale = 1.0 / float(np.sqrt(d))
        scores = torch.cat([torch.matmul(q, k_cache.transpose(2, 3)) * scale + cache_bias,
                            torch.matmul(q, k.transpose(2, 3)) * scale + new_bias], dim=-1)
        probs = torch.softmax(scores, dim=-1)
        cached = k_cache.shape[2]
        out = torch.matmul(probs[..., :cached], v_cache) + torch.matmul(probs[..., cached:], v)
        out = out.view(1, self.kv_heads, group, t, d).permute(0, 3, 1, 2, 4).reshape(1, t, self.heads * d)
        x = x + self.o(out)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up), k, v


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

    def __init__(self, cfg, weights: dict[str, Weight], cache_len: int, mask_value: float = NEG_INF):
        super().__init__()
        self.cfg, self.cache_len, self.mask_value = cfg, cache_len, mask_value
        self.embed_tokens = nn.Parameter(_tensor(weights["model.embed_tokens.weight"]), requires_grad=False)
        head = weights.get("lm_head.weight")
        # tied: no second parameter (torch.jit.trace, which coremltools converts, refuses shared ones)
        tied = cfg.tie_embeddings or head is None
        self.head = None if tied else nn.Parameter(_tensor(head), requires_grad=False)
        self.layers = nn.ModuleList(Block(cfg, weights, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(_tensor(weights["model.norm.weight"]), cfg.rms_norm_eps)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float()
                                              / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
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
        t = tokens.shape[1]
        x = F.embedding(tokens, self.embed_tokens)
        angles = input_pos.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        # cached slots before the first new position count; the new tokens attend causally
        cache_bias = torch.where(self.slots[None, :] < input_pos[:1, None], 0.0, self.mask_value).to(x.dtype)
        new_bias = torch.where(input_pos[None, :] <= input_pos[:, None], 0.0, self.mask_value).to(x.dtype)
        group = self.cfg.num_heads // self.cfg.num_kv_heads
        cache_bias = cache_bias.expand(t, self.cache_len).repeat(group, 1)
        rope = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)  # angles in fp32 even in an fp16 run
        return x, rope, (cache_bias, new_bias.repeat(group, 1))

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
