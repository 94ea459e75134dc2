"""Canonical weights -> model.tflite (LiteRT) with a decode and a prefill signature, via litert-torch.

The torch module is converters/torch_model.py. Both signatures read a KV cache of CACHE_LEN slots
per layer as inputs and return only the new tokens' keys and values; the runtime
(runtimes/tflite.py) keeps the cache in the interpreter's input tensors and writes those rows in.

Precision follows the converter's --quant: fp32 as is; fp16 weights; q8 int8 per-channel weights;
q4 int4 blocks of 32 (symmetric, re-quantized from the dequantized source). litert-torch's int4 and
int8 recipes are dynamic-range only (activations quantized to int8 at run time), so those exports
are not exact; the manifest says so. (Its weight-only int4 recipe leaves blockwise weights in float.)
The model is exported in fp32 and then quantized with litert-torch's recipe (`quantize`, what
litert-torch's convert(quant_config=...) does as its last step), so one export serves every precision.
"""

from __future__ import annotations

import time
from pathlib import Path

from ondevice.errors import OndeviceError

GRAPH_FILE = "model.tflite"
CACHE_LEN = 1024  # KV slots per layer: the context of the TFLite model (static shapes)
PREFILL_CHUNK = 64  # tokens per prefill call; the last chunk of a prompt is padded

# --quant -> (litert-torch recipe, manifest description)
PRECISIONS = {
    "fp32": (None, {"weights": "float32", "compute": "float32", "exact": True}),
    "fp16": ("fp16", {"weights": "float16", "compute": "float32", "exact": False}),
    "q8": ("int8", {"weights": "int8 per channel, symmetric", "compute": "dynamic-range int8 activations",
                    "exact": False}),
    "q4": ("int4", {"weights": "int4 blocks of 32, symmetric (re-quantized from the dequantized source)",
                    "compute": "dynamic-range int8 activations", "exact": False, "block_size": 32}),
}


def require_litert_torch():
    try:
        import litert_torch
    except ImportError as e:
        raise OndeviceError("--target tflite needs litert-torch: pip install torch==2.13.0 && "
                            "pip install 'ondevice[tflite]'") from e
    return litert_torch


def _quant_config(kind: str):
    from litert_torch.generative.quantize import quant_attrs, quant_recipes

    if kind == "fp16":
        return quant_recipes.full_fp16_recipe()
    if kind == "int8":
        return quant_recipes.full_dynamic_recipe(weight_dtype=quant_attrs.Dtype.INT8,
                                                 granularity=quant_attrs.Granularity.CHANNELWISE)
    return quant_recipes.full_dynamic_recipe(weight_dtype=quant_attrs.Dtype.INT4,
                                             granularity=quant_attrs.Granularity.BLOCKWISE_32)


def quantize(fp32_model: bytes, quant: str) -> bytes:
    """A fp32 TFLite model's weights at the precision of --quant (fp32: unchanged)."""
    recipe = PRECISIONS[quant][0]
    if recipe is None:
        return fp32_model
    from litert_torch.quantize import translate_recipe

    return bytes(translate_recipe.quantize_model(
        fp32_model, translate_recipe.translate_to_ai_edge_recipe(_quant_config(recipe).generative_recipe)))


def export_tflite(cfg, weights: dict, folder: Path, quant: str = "q4", *, context: int | None = None,
                  cache_len: int = CACHE_LEN, chunk: int = PREFILL_CHUNK) -> dict:
    """Write folder/model.tflite; returns its `backends.tflite` manifest entry. The cache holds
    min(cache_len, context) positions: the TFLite model's context."""
    litert_torch = require_litert_torch()
    import torch

    from ondevice.converters.torch_model import decoder_class

    if quant not in PRECISIONS:
        raise ValueError(f"quant must be one of {', '.join(PRECISIONS)} for the TFLite target, not {quant!r}")
    started = time.perf_counter()
    recipe, precision = PRECISIONS[quant]
    cache_len = min(cache_len, context or cfg.max_context)
    model = decoder_class(cfg)(cfg, weights, cache_len).eval()
    with torch.no_grad():
        edge = (litert_torch.signature("decode", model, sample_kwargs=model.sample_inputs(1))
                .signature("prefill", model, sample_kwargs=model.sample_inputs(chunk)).convert())
    (folder / GRAPH_FILE).write_bytes(quantize(edge.model_content(), quant))
    layers = cfg.num_layers
    cache = [f"{kind}_{i}" for i in range(layers) for kind in "kv"]
    return {
        "graph": GRAPH_FILE,
        "signatures": {
            "decode": {"tokens": 1, "inputs": ["tokens", "input_pos", "last", *cache], "outputs": ["logits", *cache]},
            "prefill": {"tokens": chunk, "inputs": ["tokens", "input_pos", "last", *cache],
                        "outputs": ["logits", *cache]},
        },
        "inputs": {"tokens": "int32 [1, T]", "input_pos": "int32 [T], consecutive positions",
                   "last": "int32 [1], the row whose logits are returned",
                   "k_i / v_i": f"float32 [1, {cfg.num_kv_heads}, {cache_len}, {cfg.head_dim}]: the cache, read only"},
        "outputs": {"logits": "float32 [1, vocab]", "k_i / v_i": f"float32 [1, {cfg.num_kv_heads}, T, {cfg.head_dim}]: "
                    "the new tokens' keys/values, to write at slots input_pos"},
        "kv_cache": {"layers": layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                     "layout": "BNSH", "dtype": "float32", "slots": cache_len,
                     "update": "outputs are the new rows; the runtime writes them into the input tensors"},
        "precision": {"quant": quant, **precision},
        "export_seconds": round(time.perf_counter() - started, 2),
        "exporter": f"litert-torch {getattr(litert_torch, '__version__', '?')}",
    }
