"""Drafts from the converter: layers dropped by a measured criterion, the LM head cut to frequent tokens.

The trimming functions work on canonical weights; the numpy forward that scores layers is checked
against transformers; a converted draft computes what the reference model computes with the same
layers removed, and its logits are the full model's at the token ids of its vocab map.
"""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from models import (BOS_ID, EOS_ID, SPECIAL_TOKENS, canonical_weights, gguf_state_dict, reference_logits,
                    reference_model_from_state, tiny_llama_weights, tiny_tokenizer, write_tiny_llama_gguf)
from tokenizers import Tokenizer

import ondevice
from ondevice.bundle import MANIFEST, VOCAB_MAP, read_bundle
from ondevice.converters import calibrate, trim
from ondevice.converters.arch import llama
from ondevice.converters.canonical import QTensor
from ondevice.errors import TokenizerMismatchError, UnsupportedArchitectureError

PROMPT = [1, 40, 72, 100, 105, 32, 119, 111, 114, 108, 100, 33, 200, 7, 260, 300]
N_LAYERS = 4


@pytest.fixture(scope="module", autouse=True)
def _torch_threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def deep_gguf(tmp_path_factory):
    """A tiny random llama with 4 layers (Q4_1 matmuls, tied Q8_0 embedding)."""
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("deep") / "deep.gguf", n_layer=N_LAYERS, seed=7)


@pytest.fixture(scope="module")
def deep_target(deep_gguf, tmp_path_factory):
    return ondevice.convert(deep_gguf, tmp_path_factory.mktemp("deep-target") / "target.bundle", progress=False)


def tiny_config(**changes) -> llama.LlamaConfig:
    cfg = llama.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                            num_kv_heads=2, head_dim=16, rope_theta=1e5, rms_norm_eps=1e-5, max_context=256,
                            tie_embeddings=True)
    return dataclasses.replace(cfg, **changes)


def only_layers(state: dict, kept: list[int]) -> dict:
    """A reference state dict with only layers `kept`, renumbered in order."""
    renamed = {}
    for name, w in state.items():
        parts = name.split(".")
        if parts[1] == "layers":
            if int(parts[2]) not in kept:
                continue
            parts[2] = str(kept.index(int(parts[2])))
        renamed[".".join(parts)] = w
    return renamed


def bundle_logits(path, ids) -> np.ndarray:
    """All-position logits of a bundle (a vocab-trimmed draft's: one per kept row)."""
    return ondevice.load(path, threads=1).backend.forward(ids, 0, all_logits=True)


# --- trimming canonical weights --------------------------------------------------------------------

def test_drop_layers_keeps_the_chosen_layers_renumbered_in_order():
    weights = tiny_llama_weights(n_layer=3)
    out, cfg = trim.drop_layers(weights, tiny_config(), [0, 2])
    assert cfg.num_layers == 2
    assert out["model.layers.1.mlp.up_proj.weight"] is weights["model.layers.2.mlp.up_proj.weight"]
    assert out["model.layers.0.self_attn.q_proj.weight"] is weights["model.layers.0.self_attn.q_proj.weight"]
    assert not any(k.startswith("model.layers.2.") for k in out)
    assert out["model.embed_tokens.weight"] is weights["model.embed_tokens.weight"]
    assert len(out) == len(weights) - 9  # one layer of 9 tensors gone


@pytest.mark.parametrize("keep", [[], [0, 0], [3], [-1]])
def test_drop_layers_refuses_indices_that_are_not_distinct_layers(keep):
    with pytest.raises(ValueError, match="distinct indices"):
        trim.drop_layers(tiny_llama_weights(n_layer=3), tiny_config(), keep)


def test_a_tied_head_trimmed_becomes_its_own_weight_and_the_embedding_stays_whole():
    weights = tiny_llama_weights(n_layer=3)
    keep = np.array([2, 7, 300])
    out, cfg = trim.trim_vocab_head(weights, tiny_config(), keep)
    assert not cfg.tie_embeddings and cfg.vocab_size == 320
    np.testing.assert_array_equal(out["lm_head.weight"], weights["model.embed_tokens.weight"][keep])
    assert out["model.embed_tokens.weight"] is weights["model.embed_tokens.weight"]


def test_an_untied_head_keeps_only_the_chosen_rows():
    weights = tiny_llama_weights(n_layer=3, tie_embeddings=False)
    out, _ = trim.trim_vocab_head(weights, tiny_config(tie_embeddings=False), np.array([5, 1]))
    np.testing.assert_array_equal(out["lm_head.weight"], weights["lm_head.weight"][[5, 1]])


def test_rows_of_gguf_blocks_are_taken_without_requantization(deep_gguf):
    weights, _ = canonical_weights(deep_gguf)
    embed = weights["model.embed_tokens.weight"]
    assert isinstance(embed, QTensor) and embed.kind == "Q8_0"
    rows = np.array([3, 0, 299])
    np.testing.assert_array_equal(trim.take_rows(embed, rows).dequantize(), embed.dequantize()[rows])


# --- choosing what stays ---------------------------------------------------------------------------

def test_layers_with_the_highest_scores_stay_and_so_do_the_first_and_last():
    scores = np.array([0.01, 0.5, 0.02, 0.4, 0.03, 0.001])
    assert trim.choose_layers(scores, 4) == [0, 1, 3, 5]
    assert trim.choose_layers(scores, 4, keep_ends=False) == [1, 2, 3, 4]
    assert trim.choose_layers(scores, 6) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="cannot keep 7 of 6"):
        trim.choose_layers(scores, 7)


def test_the_vocabulary_keeps_special_tokens_then_frequent_ones_then_the_lowest_ids():
    counts = np.zeros(20, np.int64)
    counts[[15, 9, 12]] = [5, 7, 1]
    assert trim.choose_vocab(counts, 6, always=[18, 2]).tolist() == [0, 2, 9, 12, 15, 18]
    with pytest.raises(ValueError, match="cannot hold the 3 special"):
        trim.choose_vocab(counts, 2, always=[1, 2, 3])


def test_special_and_single_byte_tokens_are_always_kept():
    tok = tiny_tokenizer()
    always = trim.always_kept_ids(tok.to_str(), [BOS_ID, EOS_ID])
    # the tiny tokenizer: the special tokens, then the 256 byte-level tokens, then merges
    assert always == list(range(len(SPECIAL_TOKENS) + 256))


# --- the numpy forward that measures layers ---------------------------------------------------------

def test_the_numpy_forward_matches_transformers_hidden_states_and_logits(deep_gguf):
    weights, cfg = canonical_weights(deep_gguf)
    ours = calibrate.hidden_states(weights, cfg, np.array([PROMPT]))
    ref = reference_model_from_state(*gguf_state_dict(deep_gguf))
    with torch.inference_mode():
        theirs = ref(input_ids=torch.tensor([PROMPT]), output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == N_LAYERS + 1
    for a, b in zip(ours[:-1], theirs[:-1]):  # transformers' last state is after the final norm
        np.testing.assert_allclose(a[0], b[0].numpy(), atol=1e-4, rtol=1e-4)
    normed = calibrate.rms_norm(ours[-1], weights["model.norm.weight"], cfg.rms_norm_eps)
    np.testing.assert_allclose(normed[0], theirs[-1][0].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(calibrate.logits(weights, cfg, np.array([PROMPT]))[0],
                               reference_logits(ref, PROMPT), atol=1e-3)


def test_a_layer_scores_one_minus_the_cosine_of_the_hidden_states_around_it(deep_gguf):
    weights, cfg = canonical_weights(deep_gguf)
    ids = np.array([PROMPT, PROMPT[::-1]])
    states = calibrate.hidden_states(weights, cfg, ids)
    scores = calibrate.layer_scores(weights, cfg, ids)
    for i, score in enumerate(scores):
        a, b = states[i], states[i + 1]
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert score == pytest.approx(1 - cos.mean(), abs=1e-6)


def test_calibration_windows_spread_over_the_text():
    ids = list(range(1000))
    w = calibrate.windows(ids, 100, 300)
    assert w.shape == (3, 100) and w[0, 0] == 0 and w[-1, -1] == 999
    assert calibrate.windows(ids[:40], 100, 300).tolist() == [ids[:40]]


def test_the_calibration_text_ships_with_the_package():
    text = calibrate.calibration_text()
    assert 10_000 < len(text) < 40_000 and "def " in text and "Summary:" in text


# --- draft bundles ---------------------------------------------------------------------------------

def test_a_draft_without_some_layers_computes_what_the_reference_without_them_computes(deep_gguf, deep_target,
                                                                                       tmp_path):
    draft = ondevice.convert(deep_gguf, tmp_path / "draft", draft_of=deep_target, draft_layers=2,
                             draft_vocab=10**6, progress=False)
    manifest = read_bundle(draft).manifest
    kept = manifest["draft"]["layers_kept"]
    assert len(kept) == 2 and manifest["config"]["num_layers"] == 2 and VOCAB_MAP not in manifest["files"]
    scores = manifest["draft"]["layer_scores"]
    assert kept == trim.choose_layers(np.array(scores), 2)

    state, params = gguf_state_dict(deep_gguf)
    renamed = only_layers(state, kept)
    ref = reference_model_from_state(renamed, dict(params, num_hidden_layers=2))
    np.testing.assert_allclose(bundle_logits(draft, PROMPT), reference_logits(ref, PROMPT), atol=1e-3)


def test_a_vocab_trimmed_draft_gives_the_full_models_logits_at_its_kept_ids(deep_gguf, deep_target, tmp_path):
    draft = ondevice.convert(deep_gguf, tmp_path / "draft", draft_of=deep_target, draft_layers=N_LAYERS,
                             draft_vocab=280, progress=False)
    vocab_map = read_bundle(draft).vocab_map()
    assert len(vocab_map) == 280 and set(range(len(SPECIAL_TOKENS) + 256)) <= set(vocab_map.tolist())
    full = bundle_logits(deep_target, PROMPT)
    np.testing.assert_allclose(bundle_logits(draft, PROMPT), full[:, vocab_map], atol=1e-4)


def test_the_draft_manifest_records_its_target_and_how_it_was_trimmed(deep_gguf, deep_target, tmp_path):
    draft = ondevice.convert(deep_gguf, tmp_path / "draft", draft_of=deep_target, draft_vocab=300, progress=False)
    manifest = read_bundle(draft).manifest  # verifies the vocab map's checksum too
    record = manifest["draft"]
    target_manifest = (deep_target / MANIFEST).read_bytes()
    assert record["target"]["manifest_sha256"] == hashlib.sha256(target_manifest).hexdigest()
    assert record["target"]["tokenizer_sha256"] == manifest["files"]["tokenizer.json"]["sha256"]
    assert record["source_layers"] == N_LAYERS and len(record["layer_scores"]) == N_LAYERS
    assert record["layers_kept"] == list(range(N_LAYERS))  # by default no layer is dropped
    assert record["vocab_kept"] == 300 and record["calibration"]["text"] == "calibration.txt"
    assert manifest["vocab_map"] == {"file": VOCAB_MAP, "size": 300}
    logits = next(o for o in manifest["backends"]["onnx"]["outputs"] if o["name"] == "logits")
    assert logits["shape"] == [1, "L", 300]
    ids = np.fromfile(draft / VOCAB_MAP, dtype="<i4")
    assert ids.tolist() == sorted(set(ids.tolist())) and manifest["config"]["vocab_size"] == 320


def test_a_draft_whose_tokenizer_differs_from_the_targets_is_refused(deep_target, tmp_path):
    other = write_tiny_llama_gguf(tmp_path / "other.gguf", vocab=330, n_layer=2)
    with pytest.raises(TokenizerMismatchError, match="different tokenizer from the target"):
        ondevice.convert(other, tmp_path / "draft", draft_of=deep_target, progress=False)
    assert not (tmp_path / "draft").exists()


def test_draft_options_need_a_target(deep_gguf, tmp_path):
    with pytest.raises(ValueError, match="need draft_of"):
        ondevice.convert(deep_gguf, tmp_path / "b", draft_layers=2, progress=False)


def test_the_cli_converts_a_draft(deep_gguf, deep_target, tmp_path, capsys):
    from ondevice.cli import main

    out = tmp_path / "draft"
    assert main(["convert", str(deep_gguf), str(out), "--draft-of", str(deep_target), "--draft-layers", "3",
                 "--draft-vocab", "290", "--quiet"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["draft"]["layers_kept"]) == 3 and manifest["vocab_map"]["size"] == 290
    assert main(["inspect", str(out)]) == 0
    assert "draft" in capsys.readouterr().out


def test_calibration_finds_a_planted_outlier_channel_in_the_linear_inputs(tiny_gguf):
    from ondevice.converters import calibrate
    weights, cfg = canonical_weights(tiny_gguf)
    weights = dict(weights)
    norm = np.array(weights["model.layers.0.input_layernorm.weight"], np.float32)
    norm[5] *= 100.0  # channel 5 of the attention input of layer 0 becomes huge
    weights["model.layers.0.input_layernorm.weight"] = norm
    ids = np.arange(3, 3 + 32)[None, :]
    ranges = calibrate.activation_ranges(weights, cfg, ids)
    assert set(ranges) >= {f"model.layers.{i}.{n}" for i in range(cfg.num_layers)
                           for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
    assert ranges["model.layers.0.self_attn.q_proj"].shape == (cfg.hidden_size,)
    outliers = calibrate.outlier_channels(ranges)
    assert 5 in outliers["model.layers.0.self_attn.q_proj"]
    assert 5 in outliers["model.layers.0.self_attn.k_proj"]


# --- the trimming pass of a regular conversion (--trim-layers, --trim-ffn) --------------------------

def test_whole_column_blocks_of_gguf_weights_are_taken_without_requantization(deep_gguf):
    weights, _ = canonical_weights(deep_gguf)
    down = weights["model.layers.0.mlp.down_proj.weight"]
    assert isinstance(down, QTensor) and down.block_size == 32
    cols = np.r_[64:96, 0:32]
    taken = trim.take_columns(down, cols)
    assert isinstance(taken, QTensor)
    np.testing.assert_array_equal(taken.dequantize(), down.dequantize()[:, cols])
    loose = trim.take_columns(down, np.array([5, 7, 40]))  # not whole blocks: the float values
    np.testing.assert_array_equal(loose, down.dequantize()[:, [5, 7, 40]])


def test_ffn_groups_with_the_largest_total_contribution_stay():
    scores = [np.r_[np.full(32, 1.0), np.full(32, 3.0), np.full(32, 2.0)], np.r_[np.full(32, 5.0), np.zeros(64)]]
    kept = trim.choose_ffn(scores, 40)  # rounded up to 2 whole groups
    np.testing.assert_array_equal(kept[0], np.r_[32:96])
    np.testing.assert_array_equal(kept[1], np.r_[0:64])


def test_a_bundle_with_fewer_ffn_neurons_computes_what_the_reference_with_those_neurons_computes(deep_gguf, tmp_path):
    out = ondevice.convert(deep_gguf, tmp_path / "ffn.bundle", trim_ffn=64, progress=False)
    manifest = read_bundle(out).manifest
    record = manifest["trim"]
    assert manifest["config"]["intermediate_size"] == 64 == record["ffn_neurons"]
    state, params = gguf_state_dict(deep_gguf)
    for i, kept in enumerate(record["ffn_kept"]):
        p = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            state[p + name + ".weight"] = state[p + name + ".weight"][kept]
        state[p + "down_proj.weight"] = state[p + "down_proj.weight"][:, kept]
    ref = reference_model_from_state(state, dict(params, intermediate_size=64))
    np.testing.assert_allclose(bundle_logits(out, PROMPT), reference_logits(ref, PROMPT), atol=1e-3)


def test_a_bundle_with_fewer_layers_records_which_and_runs_them(deep_gguf, tmp_path):
    out = ondevice.convert(deep_gguf, tmp_path / "layers.bundle", trim_layers=3, progress=False)
    manifest = read_bundle(out).manifest
    kept = manifest["trim"]["layers_kept"]
    assert manifest["config"]["num_layers"] == 3 and kept[0] == 0 and kept[-1] == N_LAYERS - 1
    assert kept == trim.choose_layers(np.array(manifest["trim"]["layer_scores"]), 3)
    state, params = gguf_state_dict(deep_gguf)
    renamed = only_layers(state, kept)
    ref = reference_model_from_state(renamed, dict(params, num_hidden_layers=3))
    np.testing.assert_allclose(bundle_logits(out, PROMPT), reference_logits(ref, PROMPT), atol=1e-3)


def test_query_heads_with_the_largest_contribution_stay_as_many_from_each_kv_group():
    scores = [np.array([1.0, 5.0, 2.0, 0.5, 3.0, 4.0]), np.array([9.0, 8.0, 7.0, 1.0, 2.0, 3.0])]
    kept = trim.choose_heads(scores, 4, kv_heads=2)  # groups {0, 1, 2} and {3, 4, 5}: two from each
    np.testing.assert_array_equal(kept[0], [1, 2, 4, 5])
    np.testing.assert_array_equal(kept[1], [0, 1, 4, 5])
    with pytest.raises(ValueError, match="multiple of the 2 KV heads"):
        trim.choose_heads(scores, 3, kv_heads=2)


def test_trimming_heads_keeps_their_q_rows_and_o_columns_without_requantization(tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "wide.gguf", n_embd=128, n_head=4, n_head_kv=2, seed=3)
    weights, cfg = canonical_weights(gguf)
    trimmed, cfg2 = trim.trim_heads(weights, cfg, [np.array([0, 3])] * cfg.num_layers)
    assert cfg2.num_heads == 2 and cfg2.head_dim == cfg.head_dim == 32
    q, o = (weights[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qo")
    tq, to = (trimmed[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qo")
    assert isinstance(to, QTensor)  # 32-column heads are whole 4-bit blocks
    np.testing.assert_array_equal(tq.dequantize(), q.dequantize()[np.r_[0:32, 96:128]])
    np.testing.assert_array_equal(to.dequantize(), o.dequantize()[:, np.r_[0:32, 96:128]])
    with pytest.raises(ValueError, match="as many from each KV group"):
        trim.trim_heads(weights, cfg, [np.array([0, 1])] * cfg.num_layers)  # both from the first group


def test_a_bundle_with_fewer_query_heads_computes_what_the_reference_with_those_heads_computes(tmp_path):
    gguf = write_tiny_llama_gguf(tmp_path / "wide.gguf", n_embd=128, n_head=4, n_head_kv=2, n_layer=3, seed=3)
    out = ondevice.convert(gguf, tmp_path / "heads.bundle", trim_heads=2, progress=False)
    manifest = read_bundle(out).manifest
    assert manifest["config"]["num_heads"] == 2 == manifest["trim"]["query_heads"]
    state, params = gguf_state_dict(gguf)
    d = params["hidden_size"] // params["num_attention_heads"]
    for i, heads in enumerate(manifest["trim"]["heads_kept"]):
        assert len(heads) == 2 and heads[0] < 2 <= heads[1]  # one from each KV group
        rows = np.concatenate([np.arange(h * d, (h + 1) * d) for h in heads])
        p = f"model.layers.{i}.self_attn."
        state[p + "q_proj.weight"] = state[p + "q_proj.weight"][rows]
        state[p + "o_proj.weight"] = state[p + "o_proj.weight"][:, rows]
    ref = reference_model_from_state(state, dict(params, num_attention_heads=2, head_dim=d))
    np.testing.assert_allclose(bundle_logits(out, PROMPT), reference_logits(ref, PROMPT), atol=1e-3)


def test_trimming_on_the_command_line_and_in_inspect(deep_gguf, tmp_path, capsys):
    from ondevice.cli import main

    assert main(["convert", str(deep_gguf), str(tmp_path / "t.bundle"), "--trim-layers", "2", "--trim-ffn", "32",
                 "--trim-heads", "2", "--quiet"]) == 0
    assert main(["inspect", str(tmp_path / "t.bundle")]) == 0
    out = capsys.readouterr().out
    assert "32 FFN neurons per layer" in out and "2 query heads per layer" in out
    with pytest.raises(ValueError, match="positive"):
        ondevice.convert(deep_gguf, tmp_path / "bad.bundle", trim_ffn=0, progress=False)


# --- vocabulary trimming: tokenizer, embedding and head together (--trim-vocab) --------------------

TEXT = "Hello world! The quick brown fox jumps over the lazy dog. 12 + 30 = 42\n\tdef f(x): return x"


def test_a_trimmed_tokenizer_only_yields_kept_tokens_and_still_round_trips_text():
    full = tiny_tokenizer()
    always = trim.always_kept_ids(full.to_str(), [BOS_ID, EOS_ID])
    keep = trim.closed_vocab(full.to_str(), list(range(full.get_vocab_size() - 1, 0, -1)), 290, always)
    small = Tokenizer.from_str(trim.trim_tokenizer(full.to_str(), keep))
    assert small.get_vocab_size() == len(keep) == 290
    ids = small.encode(TEXT).ids
    assert max(ids) < 290 and small.decode(ids) == full.decode(full.encode(TEXT).ids)
    # the same token strings as the full tokenizer where it used only kept tokens
    for t, i in small.get_vocab().items():
        assert full.token_to_id(t) == keep[i]


def test_a_kept_token_keeps_the_tokens_its_merges_are_built_from():
    full = tiny_tokenizer()
    model = json.loads(full.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    last = model["vocab"][merges[-1][0] + merges[-1][1]]
    keep = set(trim.closed_vocab(full.to_str(), [last], 300, []).tolist())
    todo = [last]
    while todo:  # every ancestor of the last merge is kept
        t = todo.pop()
        assert t in keep
        for a, b in merges:
            if model["vocab"].get(a + b) == t:
                todo += [model["vocab"][a], model["vocab"][b]]


def test_a_vocab_trimmed_bundle_gives_the_full_models_logits_at_the_kept_tokens(deep_gguf, deep_target, tmp_path):
    out = ondevice.convert(deep_gguf, tmp_path / "v.bundle", trim_vocab=300, progress=False)
    bundle = read_bundle(out)
    original = np.fromfile(out / bundle.manifest["trim"]["original_ids"], "<i4")
    assert bundle.manifest["config"]["vocab_size"] == 300 == len(original)
    assert bundle.manifest["trim"]["original_ids"] in bundle.manifest["files"]  # checksummed
    new_of = {int(o): n for n, o in enumerate(original)}
    prompt = [i for i in PROMPT if i in new_of]
    full = bundle_logits(deep_target, prompt)
    small = bundle_logits(out, [new_of[i] for i in prompt])
    np.testing.assert_allclose(small, full[:, original], atol=1e-4)
    assert bundle.manifest["tokenizer"]["eos_token_ids"][0] == new_of[EOS_ID]


def test_vocabulary_trimming_needs_a_bpe_tokenizer():
    data = json.loads(tiny_tokenizer().to_str())
    data["model"]["type"] = "Unigram"
    with pytest.raises(UnsupportedArchitectureError, match="BPE"):
        trim.closed_vocab(json.dumps(data), [5], 300, [])
