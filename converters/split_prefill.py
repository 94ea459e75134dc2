"""Split prefill graphs: a chunk's work per decoder layer cut where an NPU and a CPU would share it.

mllm-NPU's block-level split (PAPERS.md section 1): the linear parts run on the NPU with static
shapes [1, C, ·] for the chunk size C; attention over the growing KV cache (float, dynamic length)
runs on the CPU. Per chunk:

    embed      input_ids [1, C]                 -> normed, residual  (npu)
    pre.i      normed                           -> qkv               (layer i's QKV projection; npu)
    attention  qkv, the KV buffer of one layer  -> attn (+ present_key/value in place; cpu)
    post.i     attn, residual                   -> next_normed, next_residual
               (O projection + residual + norm + gate/up + SiLU*up + down + residual + next norm; npu)
    head       normed, logits_from              -> logits            (last chunk only; npu)

The attention graph has no weights and serves every layer (the runtime binds that layer's cache).
The graphs are built from the same pieces as the one-shot graph (arch/llama.py) and their weights
are not stored again: each initializer points into model.onnx.data, at the bytes the one-shot graph
stores for the same tensor. Manifest: backends.onnx.split_prefill (see `manifest_entry`).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ondevice.converters.export_onnx import GraphBuilder, save_graphs_sharing
from ondevice.converters.quantize import QuantSpec
from ondevice.errors import UnsupportedArchitectureError

PREFIX = "prefill"
DEFAULT_CHUNK = 256  # mllm-NPU's chunk length (profiles/snapdragon-8gen3-phone.json, prefill_chunk)
_PIECES = ("LlamaWeights", "attention_inputs", "embed", "qkv_projection", "attention", "after_attention", "lm_head")


def build_split_graphs(arch: ModuleType, cfg, weights: dict, spec: QuantSpec, max_context: int, chunk: int,
                       accuracy_level: int) -> dict[str, GraphBuilder]:
    """The split graphs by role: "embed", "attention", "head", "pre.{i}", "post.{i}"."""
    if not all(hasattr(arch, piece) for piece in _PIECES):
        raise UnsupportedArchitectureError(f"split prefill graphs are not defined for {arch.__name__.rsplit('.', 1)[-1]}")
    hidden = cfg.hidden_size
    qkv_width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    w = arch.LlamaWeights(weights, spec)
    graphs: dict[str, GraphBuilder] = {}

    def graph(role: str) -> GraphBuilder:
        graphs[role] = GraphBuilder(f"{PREFIX}-{role}", accuracy_level=accuracy_level)
        return graphs[role]

    def outputs(g: GraphBuilder, **named: str) -> None:
        for name, value in named.items():
            g.node("Identity", [value], name)
            g.output(name, "float32", [1, chunk, hidden])

    g = graph("embed")
    normed, residual, table = arch.embed(g, cfg, w, g.input("input_ids", "int64", [1, chunk]))
    outputs(g, normed=normed, residual=residual)

    g = graph("attention")
    qkv = g.input("qkv", "float32", [1, chunk, qkv_width])
    out = arch.attention(g, cfg, 0, qkv, arch.attention_inputs(g, cfg, max_context, chunk), kv_suffix="")
    g.node("Identity", [out], "attn")
    g.output("attn", "float32", [1, chunk, cfg.num_heads * cfg.head_dim])

    for i in range(cfg.num_layers):
        g = graph(f"pre.{i}")
        g.node("Identity", [arch.qkv_projection(g, w, i, g.input("normed", "float32", [1, chunk, hidden]))], "qkv")
        g.output("qkv", "float32", [1, chunk, qkv_width])
        g = graph(f"post.{i}")
        attn = g.input("attn", "float32", [1, chunk, cfg.num_heads * cfg.head_dim])
        normed, residual = arch.after_attention(g, cfg, w, i, attn, g.input("residual", "float32", [1, chunk, hidden]))
        outputs(g, next_normed=normed, next_residual=residual)

    g = graph("head")
    arch.lm_head(g, cfg, w, g.input("normed", "float32", [1, chunk, hidden]),
                 g.input("logits_from", "int64", [1]), table)
    return graphs


def save_split_graphs(graphs: dict[str, GraphBuilder], folder: Path, main_graph: str) -> tuple[dict, int]:
    """Write each graph as prefill.<role>.onnx, sharing the main graph's weight bytes."""
    return save_graphs_sharing(graphs, folder, main_graph, PREFIX)


def manifest_entry(graphs: dict[str, GraphBuilder], files: dict[str, str], chunk: int, layers: int,
                   data_file: str, shared_bytes: int) -> dict:
    """backends.onnx.split_prefill: the chunk size, each graph's file and signature, who runs what."""
    def graph(role: str) -> dict:
        return {"graph": files[role], **graphs[role].signature}

    return {
        "chunk": chunk,
        "data": data_file,  # the weights: the one-shot graph's data file, shared
        "shared_weight_bytes": shared_bytes,
        "processors": {"npu": ["embed", "pre", "post", "head"], "cpu": ["attention"]},
        "embed": graph("embed"),
        "attention": graph("attention"),
        "head": graph("head"),
        "pre": graphs["pre.0"].signature,  # every layer's pre (post) graph has the same signature
        "post": graphs["post.0"].signature,
        "layers": [{"pre": files[f"pre.{i}"], "post": files[f"post.{i}"]} for i in range(layers)],
    }
