"""The MLP over a DRAM window of the flash store (runtimes/flash_mlp.py) computes what the model's MLP
computes over the same neurons, whatever the window held before, and a model loaded with a DRAM budget
generates what the in-memory engine generates when nothing is left out."""

from __future__ import annotations

import numpy as np
import pytest
from models import canonical_weights

import ondevice
from ondevice.bundle import read_bundle
from ondevice.converters.quantize import dequantize
from ondevice.errors import BudgetTooSmallError, BundleError
from ondevice.flash import decode_records, window_dtype
from ondevice.runtimes.flash_mlp import FlashMlp, budget_for, swiglu, top_neurons

BIG = 10**10  # a budget that holds every neuron


@pytest.fixture(scope="module")
def mats(tiny_gguf):
    weights, cfg = canonical_weights(tiny_gguf)
    return [[dequantize(weights[f"model.layers.{i}.mlp.{n}_proj.weight"]) for n in ("gate", "up", "down")]
            for i in range(cfg.num_layers)]


def reference(mats, layer, x, top):
    """The layer's MLP over each token's own neurons, the others counted as zero."""
    gate, up, down = mats[layer]
    return np.stack([swiglu(gate[ids], up[ids], down[:, ids], x[t:t + 1])[0] for t, ids in enumerate(top)])


def test_the_onnx_decoder_gives_the_numpy_decoding_bit_for_bit(flash_bundle):
    bundle = read_bundle(flash_bundle)
    mlp = FlashMlp(bundle, BIG, fraction=1.0, dtype="float32")
    w = mlp.weights
    ids = np.array([0, 3, 4, 17, 31, 32, 63])
    for layer in range(w.layers):
        records = w.reader.read(layer, ids)
        got = mlp._decode(records, ids, w.tables[layer])
        want = decode_records(records, ids, w.tables[layer], w.entry, window_dtype(w.entry, ("up", "down"), "float32"))
        for name in ("up", "down"):
            np.testing.assert_array_equal(got[name], want[name])
    mlp.close()


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_decoding_token_after_token_equals_the_mlp_over_each_tokens_top_neurons(flash_bundle, mats, fraction):
    bundle = read_bundle(flash_bundle)
    n = mats[0][0].shape[0]
    k = max(1, round(fraction * n))
    # room for little more than one token's neurons: the window evicts and reloads as tokens go by
    entry = bundle.manifest["flash"]
    budget = budget_for(entry, (k + 2) / n, "float32")
    mlp = FlashMlp(bundle, budget, fraction=fraction, dtype="float32", window_tokens=2)
    assert mlp.weights.capacity == min(n, k + 2)
    rng = np.random.default_rng(0)
    hidden = mats[0][0].shape[1]
    for step in range(12):
        for layer in range(len(mats)):
            x = rng.standard_normal((1, hidden)).astype(np.float32)
            gate = x @ mats[layer][0].T
            top = top_neurons(gate, k)
            np.testing.assert_allclose(mlp(layer, x, gate), reference(mats, layer, x, top), rtol=1e-4, atol=1e-5)
        mlp.end_step()
    assert mlp.weights.dram_bytes() <= budget
    if fraction < 1.0:
        assert 0.0 < mlp.weights.hit_rate < 1.0  # neurons came from the window and from storage
    mlp.close()


def test_several_tokens_stream_the_layer_and_keep_each_tokens_own_neurons(flash_bundle, mats):
    bundle = read_bundle(flash_bundle)
    mlp = FlashMlp(bundle, BIG, fraction=0.5, dtype="float32")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, mats[0][0].shape[1])).astype(np.float32)
    for layer in range(len(mats)):
        gate = x @ mats[layer][0].T
        top = top_neurons(gate, mlp.k)
        np.testing.assert_allclose(mlp(layer, x, gate), reference(mats, layer, x, top), rtol=1e-4, atol=1e-5)
    assert mlp.weights.windows[0].used == 0  # a prompt streams past the window
    mlp.close()


def test_the_naive_baseline_computes_the_same(flash_bundle, mats):
    bundle = read_bundle(flash_bundle)
    window = FlashMlp(bundle, BIG, fraction=0.5, prefetch=False)
    naive = FlashMlp(bundle, BIG, fraction=0.5, naive=True)
    x = np.random.default_rng(2).standard_normal((1, mats[0][0].shape[1])).astype(np.float32)
    gate = x @ mats[1][0].T
    np.testing.assert_allclose(window(1, x, gate), naive(1, x, gate), rtol=1e-3, atol=1e-4)
    n = mats[1][0].shape[0]
    assert naive.weights.reader.stats.records == n and window.weights.reader.stats.records == n // 2
    window.close()
    naive.close()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_with_every_neuron_generation_equals_the_in_memory_engine(flash_bundle, dtype):
    plain = ondevice.load(flash_bundle, threads=1)
    flash = ondevice.load(flash_bundle, threads=1, dram_budget=BIG, ffn_fraction=1.0)
    if dtype == "float32":
        flash.backend.flash_layers.mlp = FlashMlp(read_bundle(flash_bundle), BIG, fraction=1.0, dtype="float32")
    assert flash.backend.session is None  # the one-shot graph (with the whole FFN) is not loaded
    for prompt in ([5, 9, 14, 2, 77, 31, 8], list(range(3, 40))):
        expected = plain.generate(prompt, max_tokens=24, temperature=0, ignore_eos=True).token_ids
        assert flash.generate(prompt, max_tokens=24, temperature=0, ignore_eos=True).token_ids == expected
        plain.reset()
        flash.reset()
    counters = flash.backend.flash_layers.mlp.counters()
    assert counters["window_hit_rate"] > 0.9 and counters["tokens"] > 0


def test_a_budget_too_small_for_the_fraction_is_a_clear_error(flash_bundle):
    half = budget_for(read_bundle(flash_bundle).manifest["flash"], 0.5)
    with pytest.raises(BudgetTooSmallError, match="raise the budget or lower the fraction"):
        ondevice.load(flash_bundle, dram_budget=half, ffn_fraction=0.75)
    ondevice.load(flash_bundle, dram_budget=half, ffn_fraction=0.5)
    with pytest.raises(BudgetTooSmallError, match="below what must stay resident"):
        ondevice.load(flash_bundle, dram_budget="1MB")


def test_a_dram_budget_needs_a_flash_store(tiny_bundle):
    with pytest.raises(BundleError, match="--flash"):
        ondevice.load(tiny_bundle, dram_budget="100MB")


@pytest.mark.parametrize("text,value", [("70MB", 70_000_000), ("1.5GB", 1_500_000_000), ("64MiB", 64 << 20),
                                        (12345, 12345), ("2048", 2048)])
def test_budgets_read_as_sizes(text, value):
    assert ondevice.parse_bytes(text) == value


def test_an_unreadable_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="as a size"):
        ondevice.parse_bytes("lots")


def test_dense_misses_make_the_next_layer_read_ahead_whole_and_the_result_is_the_same(flash_bundle, mats):
    bundle = read_bundle(flash_bundle)
    ahead, on_demand = FlashMlp(bundle, BIG, fraction=0.5), FlashMlp(bundle, BIG, fraction=0.5, prefetch=False)
    rng = np.random.default_rng(3)
    for step in range(3):
        for layer in range(len(mats)):
            x = rng.standard_normal((1, mats[0][0].shape[1])).astype(np.float32)
            gate = x @ mats[layer][0].T
            np.testing.assert_allclose(ahead(layer, x, gate), on_demand(layer, x, gate), rtol=1e-5, atol=1e-6)
        ahead.end_step()
        on_demand.end_step()
    # a fresh window misses half of each layer: every layer's section was read ahead, whole
    n, layers = mats[0][0].shape[0], len(mats)
    assert ahead.weights.reader.stats.records >= layers * n
    assert on_demand.weights.reader.stats.records < layers * n
    ahead.close()
    on_demand.close()


@pytest.fixture(scope="module")
def predictor_bundle(tiny_gguf, tmp_path_factory):
    return ondevice.convert(tiny_gguf, tmp_path_factory.mktemp("flash-pred") / "tiny-pred.bundle", flash=True,
                            flash_predictor=True, progress=False)


def test_threshold_selection_keeps_the_neurons_above_the_layers_calibrated_threshold(flash_bundle, mats):
    bundle = read_bundle(flash_bundle)
    table = bundle.manifest["flash"]["selection"]
    mlp = FlashMlp(bundle, BIG, fraction=0.5, select="threshold", dtype="float32")
    rng = np.random.default_rng(4)
    for layer in range(len(mats)):
        x = rng.standard_normal((1, mats[0][0].shape[1])).astype(np.float32)
        gate = x @ mats[layer][0].T
        silu = np.abs(gate / (1 + np.exp(-gate)))
        want = np.flatnonzero(silu[0] > table["gate_thresholds"][layer][table["fractions"].index(0.5)])
        np.testing.assert_array_equal(np.sort(mlp.choose(layer, x, gate)[0]), want)
        np.testing.assert_allclose(mlp(layer, x, gate), reference(mats, layer, x, [want]), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="calibrated for fractions"):
        FlashMlp(bundle, BIG, fraction=0.6, select="threshold")
    mlp.close()


def test_thresholds_keep_fewer_neurons_for_smaller_fractions(flash_bundle):
    table = read_bundle(flash_bundle).manifest["flash"]["selection"]
    assert table["fractions"] == sorted(table["fractions"])
    for layer in table["gate_thresholds"]:
        assert layer == sorted(layer, reverse=True)


def test_predictor_selection_keeps_the_predictors_top_scores(predictor_bundle, mats):
    bundle = read_bundle(predictor_bundle)
    assert {"ffn_predictors.bin", "ffn_predictors.json"} <= set(bundle.manifest["files"])  # checksummed
    from ondevice.converters.sparsity import load_predictors
    preds = load_predictors(predictor_bundle)["layers"]
    mlp = FlashMlp(bundle, BIG, fraction=0.25, select="predictor", dtype="float32")
    rng = np.random.default_rng(5)
    for layer in range(len(mats)):
        x = rng.standard_normal((1, mats[0][0].shape[1])).astype(np.float32)
        gate = x @ mats[layer][0].T
        scores = (x @ preds[layer]["a"]) @ preds[layer]["b"] + preds[layer]["c"]
        want = np.sort(np.argsort(-scores[0], kind="stable")[:mlp.k])
        np.testing.assert_array_equal(np.sort(mlp.choose(layer, x, gate)[0]), want)
        np.testing.assert_allclose(mlp(layer, x, gate), reference(mats, layer, x, [want]), rtol=1e-3, atol=1e-4)
    entry = bundle.manifest["flash"]
    assert budget_for(entry, 0.25, select="predictor") - budget_for(entry, 0.25) == entry["predictor"]["bytes"]
    mlp.close()


def test_predictor_selection_needs_converted_predictors(flash_bundle):
    with pytest.raises(BundleError, match="--flash-predictor"):
        ondevice.load(flash_bundle, dram_budget=BIG, ffn_select="predictor")
