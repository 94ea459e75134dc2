"""The ONNX Runtime backend drives only graphs whose manifest signature it understands."""

import json

import numpy as np

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


class _RecordingBinding:
    """An IO binding that remembers the shape of every input bound through it."""

    def __init__(self, binding):
        self._binding, self.shapes = binding, []

    def bind_cpu_input(self, name, array):
        self.shapes.append((name, tuple(array.shape)))
        self._binding.bind_cpu_input(name, array)

    def __getattr__(self, name):
        return getattr(self._binding, name)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("chunk", [4, 16, 64])
@pytest.mark.parametrize("length", [1, 15, 16, 45])
def test_fixed_size_chunked_prefill_equals_one_shot_prefill(tiny_model, chunk, length, static):
    backend, prompt = tiny_model.backend, [(7 * i) % 300 + 3 for i in range(length)]
    one_shot = backend.forward(prompt, 0, all_logits=True)
    backend.chunk_size, backend.static_shapes = chunk, static
    try:
        chunked = backend.forward(prompt, 0, all_logits=True)
        last = backend.forward(prompt, 0)[-1].copy()
        after = backend.decode_one(5, length)[0].copy()
    finally:
        backend.chunk_size, backend.static_shapes = None, False
    np.testing.assert_allclose(chunked, one_shot, atol=1e-4)
    np.testing.assert_allclose(last, one_shot[-1], atol=1e-4)
    backend.forward(prompt, 0)
    np.testing.assert_allclose(after, backend.decode_one(5, length)[0], atol=1e-4)


def test_every_prefill_chunk_has_the_same_input_shapes(tiny_model):
    backend = tiny_model.backend
    backend.chunk_size, backend.static_shapes = 16, True
    recorder = backend._prefill = _RecordingBinding(backend._prefill)
    try:
        backend.forward(list(range(3, 3 + 40)), 0)  # 16 + 16 + 8 (padded)
    finally:
        backend.chunk_size, backend.static_shapes, backend._prefill = None, False, recorder._binding
    calls = [dict(recorder.shapes[i:i + 7]) for i in range(0, len(recorder.shapes), 7)]
    assert len(calls) == 3
    assert all(c == calls[0] for c in calls)
    assert calls[0]["input_ids"] == (1, 16) and calls[0]["attention_bias"] == (1, 1, 16, backend.capacity)
