"""Decoder graphs with the MLPs cut out, for running with the FFN weights in storage (LLM in a flash).

With a flash store (converters/flash.py) the FFN weights stay on storage and the runtime computes
each layer's MLP itself over the neurons it has in DRAM. The rest of the model runs in ONNX Runtime
as one graph per layer, cut at the MLP:

    embed      input_ids [1, T]                         -> residual (the token rows)
    layer.i    delta, residual, the layer's KV buffer   -> mlp_in, residual, gate
               (residual + delta, normed: layer i's input; QKV, attention, O projection, residual,
               post-attention norm; delta is layer i-1's MLP output, zeros for layer 0; gate is the
               MLP's gate projection of mlp_in for every neuron [1, T, intermediate]: the gate rows
               stay resident, they pick the neurons to read, ondevice/flash_mlp.py)
    head       delta, residual, logits_from             -> logits (residual + delta, final norm, LM head)

so a token runs embed, then per layer: layer.i, the runtime's MLP(mlp_in) -> delta, then head.
The graphs are built from the same pieces as the one-shot graph (arch/llama.py); their weights are
not stored again: each initializer points at the bytes model.onnx.data holds for the same tensor.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ondevice.converters.export_onnx import GraphBuilder, save_graphs_sharing
from ondevice.converters.quantize import QuantSpec
from ondevice.errors import UnsupportedArchitectureError

PREFIX = "flash"
_PIECES = ("LlamaWeights", "attention_inputs", "qkv_projection", "attention", "output_projection",
           "next_layer_input", "lm_head")


def build_flash_graphs(arch: ModuleType, cfg, weights: dict, spec: QuantSpec, max_context: int,
                       accuracy_level: int) -> dict[str, GraphBuilder]:
    """The graphs by role: "embed", "layer.{i}", "head"."""
    if not all(hasattr(arch, piece) for piece in _PIECES):
        raise UnsupportedArchitectureError(f"flash graphs are not defined for {arch.__name__.rsplit('.', 1)[-1]}")
    hidden = cfg.hidden_size
    w = arch.LlamaWeights(weights, spec)
    graphs: dict[str, GraphBuilder] = {}

    def graph(role: str) -> GraphBuilder:
        graphs[role] = GraphBuilder(f"{PREFIX}-{role}", accuracy_level=accuracy_level)
        return graphs[role]

    def stream(g: GraphBuilder, name: str) -> str:
        return g.input(name, "float32", [1, "T", hidden])

    def outputs(g: GraphBuilder, **named: str) -> None:
        for name, value in named.items():
            g.node("Identity", [value], name)
            g.output(name, "float32", [1, "T", hidden])

    table = w.linear(["model.embed_tokens.weight"], "embedding", keep_8bit=True)
    g = graph("embed")
    outputs(g, residual=g.embedding(g.input("input_ids", "int64", [1, "T"]), table, "model.embed_tokens", hidden))

    for i in range(cfg.num_layers):
        g = graph(f"layer.{i}")
        delta, residual = stream(g, "delta"), stream(g, "residual")
        if i == 0:
            normed, residual = g.skip_rms_norm(delta, residual, w.norm("model.layers.0.input_layernorm.weight"),
                                               cfg.rms_norm_eps, "model.layers.0.input_norm")
        else:
            normed, residual = arch.next_layer_input(g, cfg, w, i - 1, delta, residual)
        attn = arch.attention(g, cfg, i, arch.qkv_projection(g, w, i, normed),
                              arch.attention_inputs(g, cfg, max_context), kv_suffix="")
        mlp_in, residual = arch.output_projection(g, cfg, w, i, attn, residual)
        outputs(g, mlp_in=mlp_in, residual_out=residual)
        gate = w.linear([f"model.layers.{i}.mlp.gate_proj.weight"], "mlp.gate")
        g.node("Identity", [g.linear(mlp_in, gate, f"model.layers.{i}.mlp.gate_proj")], "gate")
        g.output("gate", "float32", [1, "T", cfg.intermediate_size])

    g = graph("head")
    normed, _ = arch.next_layer_input(g, cfg, w, cfg.num_layers - 1, stream(g, "delta"), stream(g, "residual"))
    arch.lm_head(g, cfg, w, normed, g.input("logits_from", "int64", [1]), table)
    return graphs


def save_flash_graphs(graphs: dict[str, GraphBuilder], folder: Path, main_graph: str) -> tuple[dict, int]:
    """Write each graph as flash.<role>.onnx, sharing the main graph's weight bytes."""
    return save_graphs_sharing(graphs, folder, main_graph, PREFIX)

