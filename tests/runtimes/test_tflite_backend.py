"""The LiteRT backend runs a bundle's model.tflite as the ONNX backend runs its graph: same greedy
tokens, same logits, chunked prefill, a KV cache kept across turns, clear errors."""

import json

import numpy as np
import pytest
from models import reference_logits, reference_model_from_gguf

import ondevice
from ondevice.cli import main
from ondevice.errors import BundleError, ContextOverflowError

PROMPT = [1, 40, 72, 100, 105, 32, 119, 111, 114, 108, 100, 33, 200, 7]
LONG = [(7 * i) % 300 + 3 for i in range(100)]  # over one 64-token prefill chunk


@pytest.fixture(scope="module")
def fp32_bundle(tiny_gguf, tmp_path_factory):
    pytest.importorskip("litert_torch", reason="needs litert-torch: pip install 'ondevice[tflite]'")
    pytest.importorskip("ai_edge_litert", reason="needs the LiteRT interpreter: pip install ai-edge-litert")
    return ondevice.convert(tiny_gguf, tmp_path_factory.mktemp("tflite") / "tiny-fp32.bundle", quant="fp32",
                            target="onnx,tflite", progress=False)


@pytest.fixture(scope="module")
def models(fp32_bundle):
    return ondevice.load(fp32_bundle, threads=1), ondevice.load(fp32_bundle, threads=1, backend="tflite")


@pytest.fixture(scope="module")
def reference(tiny_gguf):
    return reference_model_from_gguf(tiny_gguf)


def greedy(model, ids, n=24):
    model.reset()
    return model.generate(ids, max_tokens=n, temperature=0, ignore_eos=True).token_ids


@pytest.mark.parametrize("prompt", [PROMPT, LONG])
def test_greedy_tokens_equal_the_onnx_backend(models, prompt):
    onnx, tflite = models
    assert greedy(tflite, prompt) == greedy(onnx, prompt)


@pytest.mark.parametrize("prompt", [PROMPT, LONG])
def test_prefill_in_chunks_gives_transformers_last_logits(models, reference, prompt):
    _, tflite = models
    np.testing.assert_allclose(tflite.backend.forward(prompt, 0)[-1], reference_logits(reference, prompt)[-1],
                               atol=1e-4)


def test_all_position_logits_equal_transformers(models, reference):
    _, tflite = models
    np.testing.assert_allclose(tflite.backend.forward(PROMPT, 0, all_logits=True),
                               reference_logits(reference, PROMPT), atol=1e-4)


def test_a_second_turn_prefills_only_its_new_tokens_and_answers_as_a_fresh_model(models):
    _, tflite = models
    first = greedy(tflite, PROMPT, 8)
    follow_up = PROMPT + first + LONG[:70]
    g = tflite.generate(follow_up, max_tokens=8, temperature=0, ignore_eos=True)
    assert g.prefill_tokens == len(follow_up) - len(PROMPT) - len(first) + 1
    assert g.token_ids == greedy(tflite, follow_up, 8)


def test_decoding_writes_the_new_rows_into_one_cache_copy_only(models):
    _, tflite = models
    backend = tflite.backend
    greedy(tflite, LONG, 9)  # prefill of 100, then 8 decode steps
    assert backend._prefill.filled == len(LONG)
    assert backend._decode.filled == len(LONG) + 8


def test_the_context_is_the_tflite_models_cache(models, fp32_bundle):
    _, tflite = models
    slots = json.loads((fp32_bundle / "manifest.json").read_text())["backends"]["tflite"]["kv_cache"]["slots"]
    assert tflite.max_context == slots
    with pytest.raises(ContextOverflowError):
        tflite.generate(LONG * 3, max_tokens=slots)


def test_a_bundle_without_a_tflite_model_is_refused(tiny_bundle):
    with pytest.raises(BundleError, match="--target onnx,tflite"):
        ondevice.load(tiny_bundle, backend="tflite")


def test_onnx_only_options_are_refused_on_the_tflite_backend(fp32_bundle):
    with pytest.raises(ValueError, match="lookup"):
        ondevice.load(fp32_bundle, backend="tflite", lookup=True)


def test_the_cli_runs_either_backend_to_the_same_answer(fp32_bundle, capsys):
    answers = []
    for backend in ("onnx", "tflite"):
        assert main(["run", str(fp32_bundle), "--raw", "the quick brown", "--max-tokens", "8",
                     "--temperature", "0", "--json", "--backend", backend]) == 0
        answers.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert answers[0] == answers[1]
