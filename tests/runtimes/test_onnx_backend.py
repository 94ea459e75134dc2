"""The ONNX Runtime backend drives only graphs whose manifest signature it understands."""

import json

import pytest

import ondevice
from ondevice.errors import BundleError


def test_a_graph_signature_without_the_decoder_inputs_is_refused(tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    onnx = manifest["backends"]["onnx"]
    onnx["inputs"] = [i for i in onnx["inputs"] if i["name"] != "seqlens_k"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="missing inputs \\['seqlens_k'\\]"):
        ondevice.load(bundle)


def test_the_kv_cache_is_allocated_once_and_reused_across_steps(tiny_model):
    backend = tiny_model.backend
    buffers = [v.data_ptr() for v in backend._kv]
    logits = backend.forward([1, 2, 3], 0)[-1]
    for step in range(5):
        logits = backend.decode_one(int(logits.argmax()), 3 + step)[0]
    assert [v.data_ptr() for v in backend._kv] == buffers
