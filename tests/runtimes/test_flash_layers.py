"""A bundle run layer by layer with its MLPs computed outside ONNX Runtime (the flash path) generates
what the one-graph engine generates."""

from __future__ import annotations

import numpy as np
import pytest
from models import canonical_weights

import ondevice
from ondevice.bundle import read_bundle
from ondevice.converters.quantize import dequantize
from ondevice.errors import BundleError
from ondevice.runtimes.flash_layers import FlashLayers
from ondevice.runtimes.flash_mlp import swiglu


@pytest.fixture(scope="module")
def dense_mlp(tiny_gguf):
    weights, cfg = canonical_weights(tiny_gguf)
    mats = [[dequantize(weights[f"model.layers.{i}.mlp.{n}_proj.weight"]) for n in ("gate", "up", "down")]
            for i in range(cfg.num_layers)]
    calls = []

    def mlp(layer: int, x: np.ndarray, gate: np.ndarray) -> np.ndarray:
        calls.append((layer, x.shape[0]))
        np.testing.assert_allclose(gate, x @ mats[layer][0].T, rtol=1e-3, atol=1e-3)  # the graph's gate output
        return swiglu(*mats[layer], x)

    mlp.calls = calls
    return mlp


def test_layer_by_layer_generation_equals_the_one_graph_engine(flash_bundle, dense_mlp):
    plain = ondevice.load(flash_bundle, threads=1)
    flash = ondevice.load(flash_bundle, threads=1)
    flash.backend.flash_layers = FlashLayers(read_bundle(flash_bundle), flash.backend, dense_mlp, threads=1)
    for prompt in ([5, 9, 14, 2, 77, 31, 8], list(range(3, 40))):
        expected = plain.generate(prompt, max_tokens=24, temperature=0, ignore_eos=True).token_ids
        dense_mlp.calls.clear()
        got = flash.generate(prompt, max_tokens=24, temperature=0, ignore_eos=True).token_ids
        assert got == expected
        assert len(dense_mlp.calls) == 24 * len(flash.backend.flash_layers.layers)  # the MLPs ran outside
        plain.reset()
        flash.reset()


def test_a_token_tree_verified_layer_by_layer_gives_the_one_graph_logits(flash_bundle, dense_mlp):
    plain = ondevice.load(flash_bundle, threads=1)
    flash = ondevice.load(flash_bundle, threads=1)
    flash.backend.flash_layers = FlashLayers(read_bundle(flash_bundle), flash.backend, dense_mlp, threads=1)
    prompt = [5, 9, 14, 2, 77, 31, 8]
    for model in (plain, flash):
        model.backend.forward(prompt, 0)
    tokens = np.array([8, 11, 12, 13])  # root, two children of it, a grandchild
    positions = len(prompt) + np.array([0, 1, 1, 2])
    bias = np.zeros((4, len(prompt) + 4), np.float32)
    bias[:, len(prompt):] = np.where(np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], bool), 0, -np.inf)
    np.testing.assert_allclose(flash.backend.run(tokens, len(prompt), positions, bias),
                               plain.backend.run(tokens, len(prompt), positions, bias), atol=2e-3)


def test_a_bundle_without_flash_graphs_is_refused(tiny_bundle, dense_mlp):
    model = ondevice.load(tiny_bundle, threads=1)
    with pytest.raises(BundleError, match="--flash"):
        FlashLayers(read_bundle(tiny_bundle), model.backend, dense_mlp)
