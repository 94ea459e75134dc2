"""The TFLite target: the torch module handed to litert-torch computes transformers' logits, and
`convert --target onnx,tflite` puts a checksummed LiteRT model with decode and prefill signatures
next to the ONNX graph, described in the manifest."""

import json

import numpy as np
import pytest
from models import canonical_weights, module_cache, module_step, reference_logits, reference_model_from_gguf

import ondevice
from ondevice.converters.torch_model import LlamaDecoder
from ondevice.errors import OndeviceError

PROMPT = [1, 40, 72, 100, 105, 32, 119, 111, 114, 108, 100, 33, 200, 7]
NEEDS_LITERT = "needs litert-torch: pip install torch==2.13.0 && pip install 'ondevice[tflite]'"


def test_the_exported_module_computes_transformers_logits_prefill_then_decode(tiny_gguf):
    weights, cfg = canonical_weights(tiny_gguf)
    model = LlamaDecoder(cfg, weights, cache_len=32).eval()
    cache = module_cache(model)
    reference = reference_logits(reference_model_from_gguf(tiny_gguf), PROMPT)
    np.testing.assert_allclose(module_step(model, cache, PROMPT[:10], 0), reference[9], atol=1e-4)
    for pos in range(10, len(PROMPT)):
        np.testing.assert_allclose(module_step(model, cache, [PROMPT[pos]], pos), reference[pos], atol=1e-4)


@pytest.fixture(scope="module")
def tflite_bundle(tiny_gguf, tmp_path_factory):
    pytest.importorskip("litert_torch", reason=NEEDS_LITERT)
    return ondevice.convert(tiny_gguf, tmp_path_factory.mktemp("tflite") / "tiny.bundle", quant="q4",
                            target="onnx,tflite", progress=False)


def test_the_tflite_model_sits_next_to_the_onnx_graph_with_both_signatures(tflite_bundle):
    manifest = json.loads((tflite_bundle / "manifest.json").read_text())
    tflite = manifest["backends"]["tflite"]
    assert set(manifest["backends"]) == {"onnx", "tflite"}
    assert manifest["files"][tflite["graph"]]["bytes"] == (tflite_bundle / tflite["graph"]).stat().st_size
    assert tflite["signatures"]["decode"]["tokens"] == 1
    assert tflite["signatures"]["prefill"]["tokens"] > 1
    assert tflite["kv_cache"]["slots"] == min(1024, manifest["max_context"])
    assert tflite["kv_cache"]["layers"] == manifest["config"]["num_layers"]


def test_the_manifest_says_the_tflite_weights_are_int4_blocks_with_int8_activations(tflite_bundle):
    precision = json.loads((tflite_bundle / "manifest.json").read_text())["backends"]["tflite"]["precision"]
    assert precision["quant"] == "q4" and precision["block_size"] == 32
    assert "int4" in precision["weights"] and "int8" in precision["compute"]
    assert precision["exact"] is False


def test_the_default_target_is_onnx_only(tiny_bundle):
    assert set(json.loads((tiny_bundle / "manifest.json").read_text())["backends"]) == {"onnx"}


@pytest.mark.parametrize("target, message", [("onnx,metal", "unknown target metal"),
                                             ("tflite", "every bundle carries the ONNX graph")])
def test_unknown_or_onnx_less_targets_are_refused(tiny_gguf, tmp_path, target, message):
    with pytest.raises(ValueError, match=message):
        ondevice.convert(tiny_gguf, tmp_path / "b", target=target, progress=False)


def test_a_missing_exporter_is_a_clear_error(tiny_gguf, tmp_path, hide_module):
    hide_module("litert_torch")
    with pytest.raises(OndeviceError, match="pip install 'ondevice\\[tflite\\]'"):
        ondevice.convert(tiny_gguf, tmp_path / "b", target="onnx,tflite", progress=False)
    assert not (tmp_path / "b").exists()
