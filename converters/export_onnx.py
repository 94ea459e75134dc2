"""A small ONNX graph builder over onnx.helper: the ops an architecture file composes a model from.

The converter picks the fused ONNX Runtime ops itself (MatMulNBits, GroupQueryAttention,
SkipSimplifiedLayerNormalization, GatherBlockQuantized), so no tracing framework is needed and a
conversion takes seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ondevice.converters.quantize import Blocks
from ondevice.errors import SourceFormatError

OPSET = 21
MS_DOMAIN = "com.microsoft"
_DTYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int32": TensorProto.INT32}


class GraphBuilder:
    def __init__(self, name: str, accuracy_level: int = 4):
        self.name = name
        self.accuracy_level = accuracy_level
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.signature: dict[str, list[dict]] = {"inputs": [], "outputs": []}
        self._names: set[str] = set()

    # -- graph plumbing ---------------------------------------------------------------------
    def input(self, name: str, dtype: str, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _DTYPES[dtype], shape))
        self.signature["inputs"].append({"name": name, "dtype": dtype, "shape": shape})
        return name

    def output(self, name: str, dtype: str, shape: list) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, _DTYPES[dtype], shape))
        self.signature["outputs"].append({"name": name, "dtype": dtype, "shape": shape})
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        if name not in self._names:
            self._names.add(name)
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, domain: str = "", **attrs) -> list[str]:
        outs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, name=outs[0] + "/" + op, domain=domain, **attrs))
        return outs

    # -- model ops --------------------------------------------------------------------------
    def linear(self, x: str, w: Blocks | np.ndarray, name: str) -> str:
        """x @ w.T for w [N, K], as MatMulNBits (quantized) or MatMul (float)."""
        if isinstance(w, Blocks):
            n, k = w.shape
            # ORT's float kernel exists for 4-bit blocks only; 8-bit ones compute exactly in int8
            # on the input split into rows that int8 holds without loss (see exact_int8_rows).
            exact_int8 = w.bits == 8 and self.accuracy_level != 4
            a = self.exact_int8_rows(x, k, w.block_size, name) if exact_int8 else x
            inputs = [a, self.const(name + ".qweight", w.packed()), self.const(name + ".scales", w.scales)]
            if w.zero_points is not None:
                inputs.append(self.const(name + ".zero_points", w.packed_zero_points().reshape(-1)))
            level = 4 if exact_int8 else self.accuracy_level
            y = self.node("MatMulNBits", inputs, name + ".nbits", MS_DOMAIN, K=k, N=n, bits=w.bits,
                          block_size=w.block_size, accuracy_level=level)[0]
            if exact_int8:  # add up the rows' partial products
                y = self.node("ReduceSum", [y, self.const("rows.axis", np.array([0], np.int64))],
                              name + ".rows_sum", keepdims=1)[0]
            if w.mins is None:
                return y
            # + sum over each block of x, times that block's min: (blocksum(x) @ mins^T)
            nb = k // w.block_size
            shape = self.const(f"blocks.shape.{nb}x{w.block_size}", np.array([0, 0, nb, w.block_size], np.int64))
            axes = self.const("blocks.axes", np.array([-1], np.int64))
            sums = self.node("ReduceSum", [self.node("Reshape", [x, shape], name + ".x_blocks")[0], axes],
                             name + ".block_sums", keepdims=0)[0]
            offset = self.node("MatMul", [sums, self.const(name + ".mins_t", np.ascontiguousarray(w.mins.T))],
                               name + ".min_term")[0]
            return self.node("Add", [y, offset], name + ".out")[0]
        wt = self._float(name + ".weight_t", np.ascontiguousarray(w.T))
        return self.node("MatMul", [x, wt], name + ".out")[0]

    def exact_int8_rows(self, x: str, k: int, block: int, name: str, levels: int = 3) -> str:
        """x [1, T, K] -> [levels, T, K] whose rows add up to x, each block of each row but the last
        a multiple of its own amax/127: MatMulNBits' int8 path, which quantizes every block of its
        input with scale amax/127, takes those rows without loss. Only the last row (a residual
        below 1/127^2 of x's block scale) is rounded, so the product matches float compute to
        float precision at int8 speed."""
        shape = self.const(f"blocks.shape.{k // block}x{block}", np.array([0, 0, k // block, block], np.int64))
        axis = self.const("blocks.axes", np.array([-1], np.int64))
        c127 = self.const("int8.max", np.array(127.0, np.float32))
        tiny = self.const("int8.tiny", np.array(1e-30, np.float32))
        rest = self.node("Reshape", [x, shape], f"{name}.rows_input")[0]
        rows = []
        for level in range(levels - 1):
            p = f"{name}.row{level}"
            amax = self.node("ReduceMax", [self.node("Abs", [rest], p + ".abs")[0], axis], p + ".amax", keepdims=1)[0]
            scale = self.node("Max", [self.node("Div", [amax, c127], p + ".scale0")[0], tiny], p + ".scale")[0]
            q = self.node("Round", [self.node("Div", [rest, scale], p + ".scaled")[0]], p + ".q")[0]
            row = self.node("Mul", [q, scale], p + ".row")[0]
            rows.append(row)
            rest = self.node("Sub", [rest, row], p + ".rest")[0]
        rows.append(rest)
        stacked = self.node("Concat", rows, f"{name}.rows_blocks", axis=0)[0]
        flat = self.const(f"rows.shape.{levels}x{k}", np.array([levels, -1, k], np.int64))
        return self.node("Reshape", [stacked, flat], f"{name}.rows")[0]

    def embedding(self, ids: str, w: Blocks | np.ndarray, name: str, hidden: int) -> str:
        """Rows of w for ids."""
        if isinstance(w, Blocks):
            if w.mins is not None:
                raise SourceFormatError(f"{name}: an embedding in 4-bit blocks with per-block mins (GGUF Q4_1/Q5_1) "
                                        "is not supported; re-quantize token_embd to Q8_0 or Q4_0 (llama.cpp's llama-quantize "
                                        "--token-embedding-type q8_0) or convert the Hugging Face checkpoint")
            # Shares the codes initializer with a tied LM head (same name, same bytes).
            codes = self.const(name + ".qweight", w.packed())
            scales = self.const(name + ".gather_scales", w.scales[..., None])
            inputs = [codes, ids, scales]
            if w.zero_points is not None:
                # one zero point per byte (low nibble): packing runs along the last axis, of size 1 here
                inputs.append(self.const(name + ".gather_zero_points", w.zero_points[..., None]))
            g = self.node("GatherBlockQuantized", inputs, name + ".blocks",
                          MS_DOMAIN, bits=w.bits, block_size=w.block_size, gather_axis=0, quantize_axis=2)[0]
            shape = self.const(name + ".shape", np.array([1, -1, hidden], np.int64))
            return self.node("Reshape", [g, shape], name + ".out")[0]
        return self.node("Gather", [self._float(name + ".weight", w), ids], name + ".out")[0]

    def _float(self, name: str, w: np.ndarray) -> str:
        """A float initializer; fp16 ones are stored half-size and cast once at load (constant-folded)."""
        if w.dtype == np.float16:
            return self.node("Cast", [self.const(name + ".fp16", w)], name, to=TensorProto.FLOAT)[0]
        return self.const(name, w)

    def rms_norm(self, x: str, weight: np.ndarray, eps: float, name: str) -> str:
        return self.node("SimplifiedLayerNormalization", [x, self.const(name + ".weight", weight)], name + ".out",
                         axis=-1, epsilon=eps, stash_type=1)[0]

    def skip_rms_norm(self, x: str, residual: str, weight: np.ndarray, eps: float, name: str) -> tuple[str, str]:
        """(norm(x + residual), x + residual) in one fused op."""
        out, _, _, total = self.node("SkipSimplifiedLayerNormalization",
                                     [x, residual, self.const(name + ".weight", weight)],
                                     [name + ".out", "", "", name + ".sum"], MS_DOMAIN, epsilon=eps)
        return out, total

    def silu_mul(self, gate_up: str, name: str) -> str:
        gate, up = self.node("Split", [gate_up], [name + ".gate", name + ".up"], axis=-1, num_outputs=2)
        sig = self.node("Sigmoid", [gate], name + ".sigmoid")[0]
        act = self.node("Mul", [gate, sig], name + ".silu")[0]
        return self.node("Mul", [act, up], name + ".out")[0]

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)])
        model.ir_version = 10
        return model

    def save(self, folder: Path, stem: str = "model") -> list[str]:
        """Write stem.onnx + stem.onnx.data; returns the file names written."""
        onnx_name, data_name = stem + ".onnx", stem + ".onnx.data"
        onnx.save_model(self.model(), os.fspath(folder / onnx_name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        return [onnx_name, data_name]

    def save_sharing(self, folder: Path, stem: str, stored: dict[str, tuple[str, int, int]]) -> tuple[str, int]:
        """Write stem.onnx whose initializers point into a data file already written (another graph's)
        wherever `stored` (name -> (file, offset, length), see `external_data_index`) holds the same
        bytes; the rest stay inside stem.onnx. Returns (file name, bytes shared)."""
        model, shared = self.model(), 0
        views: dict[str, memoryview] = {}
        for t in model.graph.initializer:
            if t.name not in stored:
                continue
            location, offset, length = stored[t.name]
            if location not in views:
                views[location] = memoryview(np.memmap(folder / location, np.uint8, mode="r"))
            if len(t.raw_data) != length or views[location][offset:offset + length] != t.raw_data:
                continue
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=key, value=value)
            shared += length
        name = stem + ".onnx"
        onnx.save_model(model, os.fspath(folder / name))
        return name, shared


def external_data_index(folder: Path, graph_file: str) -> dict[str, tuple[str, int, int]]:
    """Initializer name -> (data file, offset, length) of a saved graph's external tensors."""
    model = onnx.load(os.fspath(folder / graph_file), load_external_data=False)
    index = {}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            index[t.name] = (info["location"], int(info.get("offset", 0)), int(info["length"]))
    return index


def save_graphs_sharing(graphs: dict[str, GraphBuilder], folder: Path, main_graph: str, prefix: str
                        ) -> tuple[dict[str, str], int]:
    """Write each graph as <prefix>.<role>.onnx, its weights pointing into the main graph's data file
    where it holds the same bytes. Returns ({role: file name}, bytes shared with the main graph)."""
    stored = external_data_index(folder, main_graph)
    files, shared = {}, 0
    for role, g in graphs.items():
        files[role], n = g.save_sharing(folder, f"{prefix}.{role}", stored)
        shared += n
    return files, shared
