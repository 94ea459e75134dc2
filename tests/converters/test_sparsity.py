"""Which FFN neurons a token needs (converters/sparsity.py): the sparse FFN, per-layer thresholds,
the low-rank predictor and its storage, on tiny random llamas and planted structures."""

import numpy as np
import pytest
from models import tiny_llama_weights

from ondevice.converters import calibrate
from ondevice.converters import sparsity as sp
from ondevice.converters.arch import llama

N_LAYERS = 2


def tiny_config() -> llama.LlamaConfig:
    return llama.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=N_LAYERS,
                             num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e5, rms_norm_eps=1e-5,
                             max_context=256, tie_embeddings=True)


@pytest.fixture(scope="module")
def tiny():
    ids = np.random.default_rng(0).integers(3, 320, size=(4, 32))
    return tiny_llama_weights(n_layer=N_LAYERS, seed=3), tiny_config(), ids


def ffn_of_layer_forward(weights, cfg, x, i):
    """(FFN input [N, hidden], the FFN's output [N, hidden]) inside calibrate.layer_forward."""
    seen = {}

    def observe(name, h):
        if name.endswith("mlp.gate_proj"):
            seen["x"] = h.reshape(-1, h.shape[-1])
    dense = calibrate.layer_forward(x, weights, cfg, i, observe)
    no_ffn = calibrate.layer_forward(x, weights, cfg, i, transform=lambda n, h: h * 0 if "down_proj" in n else h)
    return seen["x"], (dense - no_ffn).reshape(-1, dense.shape[-1])


def test_the_sparse_ffn_over_all_neurons_is_the_dense_ffn(tiny):
    weights, cfg, ids = tiny
    x = calibrate.embed(weights, ids)
    for i in range(cfg.num_layers):
        h_in, ffn_out = ffn_of_layer_forward(weights, cfg, x, i)
        w = sp.ffn_weights(weights, i)
        every = np.arange(cfg.intermediate_size)
        got = np.stack([sp.sparse_ffn(t, *w, every) for t in h_in])
        np.testing.assert_allclose(got, ffn_out, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(sp.masked_ffn(h_in, *w, np.ones((len(h_in), cfg.intermediate_size), bool)),
                                   ffn_out, atol=1e-4, rtol=1e-4)
        x = calibrate.layer_forward(x, weights, cfg, i)


def test_the_sparse_ffn_over_some_neurons_leaves_the_others_out(tiny):
    weights, cfg, _ = tiny
    w_gate, w_up, w_down = sp.ffn_weights(weights, 0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, cfg.hidden_size)).astype(np.float32)
    mask = rng.random((5, cfg.intermediate_size)) < 0.3
    batched = sp.masked_ffn(x, w_gate, w_up, w_down, mask)
    for t in range(5):
        idx = sp.neurons(mask[t])
        one = sp.sparse_ffn(x[t], w_gate, w_up, w_down, idx)
        np.testing.assert_allclose(one, batched[t], atol=1e-4, rtol=1e-4)
        h = sp.gated_activation(x[t], w_gate, w_up)
        np.testing.assert_allclose(one, w_down[:, idx] @ h[idx], atol=1e-4, rtol=1e-4)
        assert not np.allclose(one, w_down @ h, atol=1e-3)


def test_select_keeps_the_k_best_scored_neurons_of_each_token():
    scores = np.random.default_rng(2).standard_normal((7, 100))
    mask = sp.select(scores, 0.25)
    assert (mask.sum(-1) == 25).all()
    for s, m in zip(scores, mask):
        assert s[m].min() > s[~m].max()
    assert sp.select(scores, 1.0).all()


def test_per_layer_thresholds_keep_the_requested_fraction_on_the_calibration_tokens(tiny):
    weights, cfg, ids = tiny
    calib = sp.calibrate_predictors(weights, cfg, ids, rank=8, target=0.25, fractions=(0.1, 0.25, 0.5), epochs=3)
    xs = sp.ffn_inputs(weights, cfg, ids)
    assert len(xs) == cfg.num_layers and xs[0].shape == (ids.size, cfg.hidden_size)
    for i, x in enumerate(xs):
        w_gate, w_up, _ = sp.ffn_weights(weights, i)
        h, g = np.abs(sp.gated_activation(x, w_gate, w_up)), sp.gate_scores(x, w_gate)
        layer = calib["layers"][i]
        for j, f in enumerate(calib["fractions"]):
            assert sp.threshold_masks(h, layer["h_thresholds"][j]).mean() == pytest.approx(f, abs=0.005)
            assert sp.threshold_masks(g, layer["gate_thresholds"][j]).mean() == pytest.approx(f, abs=0.005)
        assert layer["a"].shape == (cfg.hidden_size, 8) and layer["b"].shape == (8, cfg.intermediate_size)


def test_the_predictor_recovers_a_planted_low_rank_activation_pattern():
    """Which neurons fire is set by 4 directions of the input: a rank-8 predictor trained on 2000
    tokens must find most of the top quarter on fresh tokens (chance is 25%)."""
    rng = np.random.default_rng(4)
    hidden, inter = 48, 96
    u, v = rng.standard_normal((inter, 4)), rng.standard_normal((4, hidden))
    w_gate = (u @ v / np.sqrt(hidden)).astype(np.float32)
    w_up = np.ones((inter, hidden), np.float32) / hidden  # up ~ constant sign: |h| follows the gate

    def tokens(n):
        return (rng.standard_normal((n, hidden)) + 3.0).astype(np.float32)
    x = tokens(2000)
    pred = sp.train_predictor(x, sp.gated_activation(x, w_gate, w_up), rank=8, target=0.25, epochs=60)
    fresh = tokens(500)
    truth = sp.select(np.abs(sp.gated_activation(fresh, w_gate, w_up)), 0.25)
    recall, precision = sp.recall_precision(sp.select(sp.predictor_scores(pred, fresh), 0.25), truth)
    assert recall > 0.93 and precision > 0.93  # rank 1 gets 0.86, no training 0.39


def test_window_union_is_the_share_of_neurons_chosen_in_the_last_k_tokens():
    masks = np.random.default_rng(5).random((20, 30)) < 0.2
    for k in (1, 3, 8, 25):
        want = np.mean([np.any(masks[max(0, s - k + 1):s + 1], axis=0).mean() for s in range(20)])
        assert sp.window_union(masks, k) == pytest.approx(want)


def test_saved_predictors_load_back_identically_and_a_corrupt_file_is_refused(tiny, tmp_path):
    weights, cfg, ids = tiny
    calib = sp.calibrate_predictors(weights, cfg, ids, rank=4, fractions=(0.25, 0.5), epochs=2)
    bin_path, _ = sp.save_predictors(tmp_path, calib)
    back = sp.load_predictors(tmp_path)
    assert (back["rank"], back["target"], back["fractions"]) == (4, calib["target"], [0.25, 0.5])
    for a, b in zip(calib["layers"], back["layers"]):
        for name in ("a", "b", "c", "h_thresholds", "gate_thresholds"):
            np.testing.assert_array_equal(a[name], b[name])
        assert b["recall"] == pytest.approx(a["recall"])
    data = bytearray(bin_path.read_bytes())
    data[10] ^= 1
    bin_path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        sp.load_predictors(tmp_path)


def test_for_bundle_writes_the_files_its_manifest_entry_describes(tiny, tmp_path):
    from models import tiny_tokenizer

    weights, cfg, _ = tiny
    entry = sp.for_bundle(tmp_path, weights, cfg, tiny_tokenizer().to_str(), rank=4, tokens=256, epochs=2)
    assert (tmp_path / entry["file"]).stat().st_size == entry["bytes"]
    assert len(sp.load_predictors(tmp_path)["layers"]) == cfg.num_layers
    assert entry["rank"] == 4 and 0 <= entry["recall"] <= 1


@pytest.mark.parametrize("method", sp.METHODS)
def test_token_neurons_are_the_mask_each_method_keeps(tiny, method):
    weights, cfg, ids = tiny
    calib = sp.calibrate_predictors(weights, cfg, ids, rank=4, fractions=(0.5,), epochs=2)
    x = sp.ffn_inputs(weights, cfg, ids)[1]
    w_gate, w_up, _ = sp.ffn_weights(weights, 1)
    layer = calib["layers"][1]
    scores = {"gate": sp.gate_scores(x, w_gate), "predictor": sp.predictor_scores(layer, x)}.get(
        method, sp.oracle_scores(x, w_gate, w_up))
    want = (sp.threshold_masks(scores, layer["h_thresholds"][0]) if method == "h-thresh"
            else sp.select(scores, 0.5))
    for t in range(0, len(x), 17):
        got = sp.token_neurons(x[t], w_gate, w_up, layer, method, 0.5)
        np.testing.assert_array_equal(got, sp.neurons(want[t]))
    with pytest.raises(ValueError, match="method"):
        sp.token_neurons(x[0], w_gate, method="relu")
