"""The int8 prefill graph: QDQ int8 linears that ONNX Runtime runs on its int8 kernel, outlier
channels computed in float beside them, recorded in the manifest next to the float graph."""

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import ondevice
from ondevice.converters.export_onnx import OPSET
from ondevice.converters.int8_prefill import Int8GraphBuilder, Int8Plan, LinearPlan, quantize_weight, split_int8


@pytest.fixture(scope="module")
def int8_bundle(tiny_gguf, tmp_path_factory):
    return ondevice.convert(tiny_gguf, tmp_path_factory.mktemp("int8") / "tiny-int8.bundle", int8_prefill=True,
                            progress=False)


def optimized_ops(path, tmp_path) -> collections.Counter:
    """Op counts of the graph after ONNX Runtime's optimizations (what actually runs)."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["CommonSubexpressionElimination"])
    graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node)


def one_linear(plan: Int8Plan, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Run a single linear built by Int8GraphBuilder on x [1, T, K]; w [N, K]."""
    g = Int8GraphBuilder("one", plan)
    g.input("x", "float32", [1, "T", w.shape[1]])
    y = g.linear("x", w, "layer")
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    g.output("y", "float32", [1, "T", w.shape[0]])
    model = helper.make_model(helper.make_graph(g.nodes, "one", g.inputs, g.outputs, g.initializers),
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["CommonSubexpressionElimination"])
    return session.run(None, {"x": x})[0]


def test_every_decoder_linear_runs_on_onnx_runtimes_int8_kernel(int8_bundle, tmp_path):
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    spec = manifest["backends"]["onnx"]["prefill_int8"]
    layers = manifest["config"]["num_layers"]
    q = spec["quantization"]
    assert q["activation_bits"] == 16 and q["weight_bits"] == 16  # the default preset: three int8 products
    ops = optimized_ops(int8_bundle / spec["graph"], tmp_path)
    assert ops["MatMulIntegerToFloat"] == layers * 4 * 3
    assert ops["MatMul"] == 0 or ops["MatMul"] == ops["Gather"]  # float MatMuls only on outlier channels


def test_the_a8w8_preset_is_one_static_int8_product_per_linear(tiny_gguf, tmp_path):
    bundle = ondevice.convert(tiny_gguf, tmp_path / "a8w8.bundle", int8_prefill="a8w8", progress=False)
    graph = onnx.load(bundle / "prefill_int8.onnx", load_external_data=False).graph
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) == 2 * 4  # one per linear input, 2 layers
    scales = {i.name: i for i in graph.initializer}
    for n in quantize:  # static: the scale is a constant of the graph, not computed from the chunk
        assert n.input[1] in scales and onnx.numpy_helper.to_array(scales[n.input[1]]).size == 1  # per tensor
    ops = optimized_ops(bundle / "prefill_int8.onnx", tmp_path)
    assert ops["MatMulIntegerToFloat"] == 2 * 4


def test_the_int8_graph_has_the_float_graphs_signature_and_a_checksum(int8_bundle):
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    onnx_spec = manifest["backends"]["onnx"]
    spec = onnx_spec["prefill_int8"]
    assert spec["inputs"] == onnx_spec["inputs"] and spec["outputs"] == onnx_spec["outputs"]
    assert {spec["graph"], spec["data"]} <= set(manifest["files"])
    assert spec["chunk_sizes"] == [256]
    q = spec["quantization"]
    assert q["calibration_text"] == "calibration.txt" and q["calibration_tokens"] > 0
    assert q["outlier_ratio"] == 6.0 and q["outlier_channels_total"] == sum(q["outlier_channels"].values())


def test_outlier_channels_are_computed_in_float_beside_the_int8_path():
    rng = np.random.default_rng(0)
    k, n = 64, 32
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
    x = rng.standard_normal((1, 8, k)).astype(np.float32)
    x[..., 5] *= 300.0  # one channel with activations 300x the others
    ranges = np.abs(x).reshape(-1, k).max(0)
    exact = x @ w.T
    shadow = one_linear(Int8Plan({"layer": LinearPlan(ranges, np.array([5]))}), w, x)
    plain = one_linear(Int8Plan({"layer": LinearPlan(ranges, np.zeros(0, np.int64))}), w, x)
    # the outlier channel's contribution is exact; the rest carries int8 rounding only
    err_shadow = np.abs(shadow - exact).max() / np.abs(exact).max()
    err_plain = np.abs(plain - exact).max() / np.abs(exact).max()
    assert err_shadow < 0.02
    assert err_plain > 5 * err_shadow  # one scale for all channels leaves the small ones ~2 levels


def test_outlier_rows_leave_the_int8_weight_and_16_bit_halves_rebuild_the_tensor():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    parts, scale = quantize_weight(w, np.array([3, 7]), parts=2)
    assert all(p.dtype == np.int8 for p in parts)
    assert not parts[0][[3, 7]].any() and not parts[1][[3, 7]].any()
    rebuilt = parts[0] * scale + parts[1] * (scale / 254)
    kept = np.delete(np.arange(32), [3, 7])
    assert np.abs(rebuilt[kept] - w.T[kept]).max() <= scale.max() / 254  # ~15 bits, not int8's 1/127
    halves = split_int8(np.array([0.5, -1.0, 3.0]), 1 / 127, 2)
    assert halves[0].tolist() == [64, -127, 127]  # the first half saturates at the static range


def test_unknown_preset_is_refused(tiny_gguf, tmp_path):
    with pytest.raises(ValueError, match="unknown int8 prefill preset"):
        ondevice.convert(tiny_gguf, tmp_path / "x.bundle", int8_prefill="a4w4", progress=False)


def test_bits_can_differ_by_kind_of_linear(tiny_gguf, tmp_path):
    options = {"act_bits": {"mlp.down_proj": 16}, "weight_bits": {"self_attn.o_proj": 16}}
    bundle = ondevice.convert(tiny_gguf, tmp_path / "mixed.bundle", int8_prefill=options, progress=False)
    graph = onnx.load(bundle / "prefill_int8.onnx", load_external_data=False).graph
    products = collections.Counter(n.name.split(".int8_out")[0].split(".", 3)[3] for n in graph.node
                                   if n.op_type == "MatMul" and ".int8_out" in n.name)
    # per layer: 16-bit activations into down (hi, lo), 16-bit weights in o (hi, lo), one product elsewhere
    assert products == {"mlp.down_proj": 2 * 2, "self_attn.o_proj": 2 * 2, "self_attn.qkv_proj": 2,
                        "mlp.gate_up_proj": 2}
