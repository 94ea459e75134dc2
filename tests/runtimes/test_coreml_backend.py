"""The Core ML backend. Core ML predicts only on Apple platforms: on Linux the backend drives a
stand-in with coremltools' make_state()/predict() API that runs the exact torch module handed to
coremltools and checks each call against the program's declared inputs (enumerated token counts,
slots), so the backend's chunking, padding and positions are tested here; on a Mac the real model
runs too."""

import json
import sys

import numpy as np
import pytest
import torch
from models import CoreMLStandIn, canonical_weights

import ondevice
from ondevice.bundle import read_bundle
from ondevice.converters.export_coreml import StatefulDecoder
from ondevice.errors import ContextOverflowError, OndeviceError
from ondevice.runtimes.coreml import CoreMLBackend

PROMPT = [1, 40, 72, 100, 105, 32, 119, 111, 114, 108, 100, 33, 200, 7]
LONG = [(7 * i) % 300 + 3 for i in range(100)]  # one full 64-token chunk, then a padded one


def coreml_model(bundle, tiny_gguf) -> tuple[ondevice.Model, CoreMLStandIn]:
    b = read_bundle(bundle)
    spec = b.manifest["backends"]["coreml"]
    weights, cfg = canonical_weights(tiny_gguf)
    stand_in = CoreMLStandIn(StatefulDecoder(cfg, weights, spec["kv_cache"]["slots"]).eval(), spec["chunks"])
    model = ondevice.Model(b, CoreMLBackend(b, model=stand_in))
    model.max_context = model.backend.max_context
    return model, stand_in


def greedy(model, ids, n=24):
    model.reset()
    return model.generate(ids, max_tokens=n, temperature=0, ignore_eos=True).token_ids


@pytest.mark.parametrize("prompt", [PROMPT, LONG])
def test_greedy_tokens_equal_the_onnx_backend(coreml_bundle, tiny_gguf, prompt):
    model, stand_in = coreml_model(coreml_bundle, tiny_gguf)
    assert greedy(model, prompt) == greedy(ondevice.load(coreml_bundle, threads=1), prompt)
    chunks = 2 if prompt is LONG else 1  # the prompt in 64-token chunks (the last padded), then one token a call
    assert stand_in.calls[:chunks] == [64] * chunks and set(stand_in.calls[chunks:]) == {1}


def test_a_second_turn_prefills_only_its_new_tokens(coreml_bundle, tiny_gguf):
    model, stand_in = coreml_model(coreml_bundle, tiny_gguf)
    onnx = ondevice.load(coreml_bundle, threads=1)
    for m in (model, onnx):
        m.reset()
        m.generate(PROMPT, max_tokens=5, temperature=0, ignore_eos=True)
    stand_in.calls.clear()
    follow_up = [5, 6, 7, 8]
    a = model.generate(follow_up, max_tokens=8, temperature=0, ignore_eos=True).token_ids
    assert a == onnx.generate(follow_up, max_tokens=8, temperature=0, ignore_eos=True).token_ids
    assert stand_in.calls[0] == 64 and len(stand_in.calls) == 8  # the 4 new tokens, padded; then 7 decode steps


def test_chunks_never_run_past_the_slots(tiny_gguf, tmp_path):
    pytest.importorskip("coremltools", reason="needs coremltools: pip install 'ondevice[coreml]'")
    bundle = ondevice.convert(tiny_gguf, tmp_path / "ctx80.bundle", target="onnx,coreml", max_context=80,
                              progress=False)
    model, stand_in = coreml_model(bundle, tiny_gguf)
    prompt = LONG[:70]  # 64, then 6 tokens where a padded 64-chunk would pass slot 80: single tokens
    np.testing.assert_allclose(model.backend.forward(prompt, 0), ondevice.load(bundle, threads=1).backend.forward(
        prompt, 0), atol=1e-3)
    assert stand_in.calls == [64, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ContextOverflowError, match="context of 80"):
        model.backend.forward(LONG[:81], 0)


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS Core ML loads the model")
def test_loading_off_apple_platforms_is_a_clear_error(coreml_bundle):
    with pytest.raises(OndeviceError, match="runs on macOS 15\\+.*use backend='onnx'"):
        ondevice.load(coreml_bundle, backend="coreml")


def test_onnx_only_options_are_refused_on_the_coreml_backend(coreml_bundle):
    with pytest.raises(ValueError, match="lookup: not available on the coreml backend"):
        ondevice.load(coreml_bundle, backend="coreml", lookup=True)


def test_a_bundle_without_a_core_ml_model_says_how_to_convert(tiny_bundle):
    with pytest.raises(OndeviceError, match="--target onnx,coreml"):
        CoreMLBackend(read_bundle(tiny_bundle), model=object())


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predicts only on macOS 15+ (coremltools on Linux "
                                                       "converts but cannot load or run a model)")
def test_on_macos_the_real_core_ml_model_follows_the_onnx_backend(coreml_bundle):
    coreml, onnx = ondevice.load(coreml_bundle, backend="coreml"), ondevice.load(coreml_bundle, threads=1)
    np.testing.assert_allclose(coreml.backend.forward(PROMPT, 0), onnx.backend.forward(PROMPT, 0), atol=0.1)
    assert json.loads((coreml_bundle / "manifest.json").read_text())["backends"]["coreml"]["chunks"] == [1, 64]
