"""The decoder cut at its MLPs (flash graphs) chained with an MLP computed outside the graph gives
the one-shot graph's logits and fills the same KV cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models import canonical_weights

import ondevice
from ondevice.converters.arch import get_architecture
from ondevice.converters.flash_graphs import build_flash_graphs, save_flash_graphs
from ondevice.converters.quantize import QuantSpec, dequantize
from ondevice.runtimes.flash_mlp import swiglu


@pytest.fixture(scope="module")
def flash_setup(tiny_gguf, tiny_bundle, tmp_path_factory):
    folder = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("flash") / "flash.bundle"))
    weights, cfg = canonical_weights(tiny_gguf)
    graphs = build_flash_graphs(get_architecture("llama"), cfg, weights, QuantSpec("q4"), cfg.max_context, accuracy_level=0)
    files, shared = save_flash_graphs(graphs, folder, "model.onnx")
    return folder, cfg, weights, files, shared


def _mlp_weights(weights, i):
    p = f"model.layers.{i}.mlp"
    return [dequantize(weights[f"{p}.{n}_proj.weight"]) for n in ("gate", "up", "down")]


def test_the_graphs_keep_no_weight_bytes_of_their_own_and_of_the_mlp_only_the_gate(flash_setup):
    folder, cfg, _, files, shared = flash_setup
    assert set(files) == {"embed", "head"} | {f"layer.{i}" for i in range(cfg.num_layers)}
    assert shared > 0
    for name in files.values():
        model = onnx.load(str(folder / name), load_external_data=False)
        assert all("gate_proj" in t.name for t in model.graph.initializer if "mlp" in t.name)
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
                   if len(t.raw_data) > 4096 or t.data_location == onnx.TensorProto.EXTERNAL)


@pytest.mark.parametrize("length", [1, 7])
def test_layer_graphs_and_an_outside_mlp_give_the_one_shot_logits(flash_setup, length):
    folder, cfg, weights, files, _ = flash_setup
    session = lambda role: ort.InferenceSession(str(folder / files[role]), providers=["CPUExecutionProvider"])  # noqa: E731
    ids = np.arange(3, 3 + length, dtype=np.int64)[None]
    capacity = 32
    residual = session("embed").run(None, {"input_ids": ids})[0]
    delta = np.zeros_like(residual)
    keys = []
    attention = {"seqlens_k": np.array([length - 1], np.int32), "total_sequence_length": np.array(length, np.int32),
                 "position_ids": np.arange(length, dtype=np.int64)[None],
                 "attention_bias": np.zeros((1, 1, length, length), np.float32),
                 "query_seqlens": np.array([length], np.int32)}
    kv_shape = (1, cfg.num_kv_heads, capacity, cfg.head_dim)
    for i in range(cfg.num_layers):
        feeds = dict(attention, delta=delta, residual=residual,
                     past_key=np.zeros(kv_shape, np.float32), past_value=np.zeros(kv_shape, np.float32))
        mlp_in, residual, key = session(f"layer.{i}").run(["mlp_in", "residual_out", "present_key"], feeds)
        keys.append(key[:, :, :length])
        delta = swiglu(*_mlp_weights(weights, i), mlp_in[0])[None].astype(np.float32)
    logits = session("head").run(None, {"delta": delta, "residual": residual,
                                        "logits_from": np.array([0], np.int64)})[0]

    model = ondevice.load(folder, threads=1)
    expected = model.backend.forward(ids[0].tolist(), 0, all_logits=True)
    np.testing.assert_allclose(logits[0], expected, atol=2e-3)
    assert (logits[0].argmax(-1) == expected.argmax(-1)).all()
    for i, key in enumerate(keys):  # the same cache the one-shot graph writes
        np.testing.assert_allclose(key, model.backend._kv_arrays[2 * i][:, :, :length], atol=1e-4)
