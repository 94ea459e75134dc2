"""The graph builder's ops, each checked on its own against numpy."""

import numpy as np
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize
from onnx import helper

from ondevice.converters.canonical import QTensor
from ondevice.converters.export_onnx import OPSET, GraphBuilder
from ondevice.converters.quantize import LOSSLESS


def run_linear(w, x: np.ndarray, accuracy_level: int) -> np.ndarray:
    g = GraphBuilder("t", accuracy_level)
    g.linear(g.input("x", "float32", [1, "T", x.shape[-1]]), w, "lin")
    g.nodes[-1].output[0] = "y"
    g.output("y", "float32", None)
    model = helper.make_model(helper.make_graph(g.nodes, "t", g.inputs, g.outputs, g.initializers),
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.fixture
def q8_weight():
    w = np.random.default_rng(0).standard_normal((256, 576)).astype(np.float32) * 0.05
    return LOSSLESS["Q8_0"](QTensor("Q8_0", w.shape, gguf_quantize(w, GGMLQuantizationType.Q8_0),
                                    int(GGMLQuantizationType.Q8_0)))


def test_8bit_linear_under_float_compute_matches_float_math(q8_weight):
    x = np.random.default_rng(1).standard_normal((1, 5, 576)).astype(np.float32)
    x[0, :, 7] = 40.0  # an outlier channel: plain int8 activations lose the small ones next to it
    expected = x.astype(np.float64) @ q8_weight.dequantize().T.astype(np.float64)
    exact = run_linear(q8_weight, x, accuracy_level=0)
    int8 = run_linear(q8_weight, x, accuracy_level=4)
    assert np.abs(exact - expected).max() < 1e-4
    assert np.abs(int8 - expected).max() > 10 * np.abs(exact - expected).max()


def test_q4_1_linear_with_block_minimums_matches_float_math():
    w = np.random.default_rng(2).standard_normal((96, 128)).astype(np.float32) * 0.05
    blocks = LOSSLESS["Q4_1"](QTensor("Q4_1", w.shape, gguf_quantize(w, GGMLQuantizationType.Q4_1),
                                      int(GGMLQuantizationType.Q4_1)))
    x = np.random.default_rng(3).standard_normal((1, 3, 128)).astype(np.float32)
    expected = x.astype(np.float64) @ blocks.dequantize().T.astype(np.float64)
    assert np.abs(run_linear(blocks, x, accuracy_level=0) - expected).max() < 1e-4
