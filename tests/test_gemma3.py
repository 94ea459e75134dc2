"""The real Gemma 3 270M bundle (Q4_K_M GGUF), end to end, against transformers fp32 on the same weights.

The reference is transformers' own GGUF loader (config and dequantization its own), so the
architecture file is checked against an independent reading of the checkpoint: greedy tokens must
be identical, logits equal within float rounding, also past the 512-token sliding window.
"""

import numpy as np
import pytest
import torch
from models import GEMMA3_PIP, gemma3_gguf_path, gemma3_reference, reference_greedy, reference_logits

import ondevice

pytestmark = pytest.mark.skipif(gemma3_gguf_path() is None, reason=f"needs the real model: {GEMMA3_PIP}")

CHAT = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Translate to French: The weather is nice today.",
]
RAW = [
    "Once upon a time, in a small village,",
    "def fibonacci(n):\n    ",
    "1. Preheat the oven to 180 degrees.\n2.",
]
TOKENIZER_TEXTS = [
    "Hello world  123",
    "The quick brown fox.\n\n\nDef  x =   42;\t tab",
    "  leading spaces and trailing   ",
    "émigré naïve 東京 🤖 emoji \u00a0nbsp\u200bzw Ünïcödé ﬁ",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x**2  # square\n",
    "1234567890 3.14159 -42 </s> <b>bold</b>",
    "multiple\r\n\r\nlines and a very long word: pneumonoultramicroscopicsilicovolcanoconiosis",
]


@pytest.fixture(scope="module")
def gemma3_bundle(tmp_path_factory):
    return ondevice.convert("gemma3-270m", tmp_path_factory.mktemp("gemma3") / "gemma.bundle", progress=False)


@pytest.fixture(scope="module")
def gemma3_model(gemma3_bundle):
    return ondevice.load(gemma3_bundle, threads=2)


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)  # a second torch thread only contends with ORT's on 2 cores
    return gemma3_reference()


@pytest.fixture(scope="module")
def prompts(gemma3_model):
    chat = [gemma3_model.encode_prompt(p) for p in CHAT]
    raw = [gemma3_model.encode_prompt(p, raw=True) for p in RAW]
    return chat + raw


@pytest.fixture(scope="module")
def long_prompt(gemma3_model):
    """Over twice the sliding window (512), so local layers drop keys and prefill runs in chunks."""
    text = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 13} marbles." for i in range(90))
    ids = gemma3_model.encode_prompt("Summarize this list:\n" + text)
    assert len(ids) > 1100
    return ids


def test_greedy_tokens_equal_transformers_fp32_for_32_tokens(gemma3_model, reference, prompts):
    for ids in prompts:
        gemma3_model.reset()
        ours = gemma3_model.generate(ids, max_tokens=32, temperature=0, ignore_eos=True).token_ids
        assert ours == reference_greedy(reference, ids, 32), gemma3_model.tokenizer.decode(ids)


def test_last_position_logits_match_transformers(gemma3_model, reference, prompts):
    for ids in prompts:
        gemma3_model.reset()
        ours = gemma3_model.backend.forward(ids, 0)[-1]
        theirs = reference_logits(reference, ids)[-1]
        assert np.abs(ours - theirs).max() < 2e-3


def test_sliding_window_layers_match_transformers_past_the_window(gemma3_model, reference, long_prompt):
    # A key too many or too few in a local layer's window moves these logits by 0.1 to 2.
    for n in (700, len(long_prompt)):
        gemma3_model.reset()
        ours = gemma3_model.backend.forward(long_prompt[:n], 0)[-1]
        with torch.inference_mode():
            theirs = reference(input_ids=torch.tensor([long_prompt[:n]]), logits_to_keep=1).logits[0, -1].numpy()
        assert np.abs(ours - theirs).max() < 1e-2, n
    gemma3_model.reset()
    greedy = gemma3_model.generate(long_prompt, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    assert greedy == reference_greedy(reference, long_prompt, 16)


def test_tokenizer_ids_equal_transformers_gguf_tokenizer(gemma3_model):
    from transformers import AutoTokenizer

    path = gemma3_gguf_path()
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TOKENIZER_TEXTS:
        ours = gemma3_model.tokenizer.encode(text, add_special_tokens=True)
        assert ours == theirs(text).input_ids, text
        assert ours[0] == gemma3_model.tokenizer.bos_token_id
        assert gemma3_model.tokenizer.decode(ours[1:]) == text


def test_chat_prompt_uses_gemma_turns_and_stops_at_end_of_turn(gemma3_model):
    tok = gemma3_model.tokenizer
    assert tok.render_chat([{"role": "user", "content": "Hi"}]) == \
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    for ids in (gemma3_model.encode_prompt("Hi"), gemma3_model.encode_prompt("Hi", raw=True)):
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # Gemma needs its BOS
    end_of_turn = tok.backend.token_to_id("<end_of_turn>")
    assert end_of_turn in tok.eos_token_ids
    assert tok.backend.token_to_id("</s>") not in tok.eos_token_ids  # ordinary text in Gemma's vocabulary


def test_bundle_records_exact_repacking_of_every_block_type(gemma3_model):
    manifest = gemma3_model.bundle.manifest
    tensors = manifest["quantization"]["tensors"]
    assert tensors["attention.qkv"] == "Q5_0 repacked | Q8_0 repacked"
    assert tensors["attention.o"] == "Q4_K repacked"
    assert tensors["mlp.gate_up"] == "Q5_0 repacked"
    assert tensors["mlp.down"] == "Q4_K repacked | Q6_K repacked"
    assert tensors["embedding"] == "Q8_0 repacked" and tensors["lm_head"] == "tied to embedding"
    config = manifest["config"]
    assert config["layer_types"].count("full_attention") == 3 and config["sliding_window"] == 512


def test_the_android_graph_gives_the_engine_s_greedy_tokens_past_the_sliding_window(gemma3_bundle, gemma3_model,
                                                                                       tmp_path):
    """export_android's rewrite of Gemma 3 (sliding-window masks, q/k norms, FastGelu, 8-bit blocks
    split in nibbles), driven as the app's bridge drives it."""
    import shutil

    from android_graph import AndroidGraph

    from ondevice.converters.export_android import export_android

    bundle = shutil.copytree(gemma3_bundle, tmp_path / "gemma.bundle")
    record = export_android(bundle)
    assert "system" not in record["chat_format"]["roles"] and record["chat_format"]["strip_content"]
    ids = gemma3_model.encode_prompt("word " * 700 + "The end. Now tell me a story.", raw=True)
    assert len(ids) > 600  # past the 512-token window
    tokens, logits = AndroidGraph(bundle, capacity=1024).greedy(ids, 8)
    gemma3_model.reset()
    engine = gemma3_model.generate(ids, max_tokens=8, temperature=0, ignore_eos=True)
    assert tokens == engine.token_ids
    np.testing.assert_allclose(logits[0], gemma3_model.backend.forward(ids, 0)[-1], atol=1e-3)


def test_the_android_app_s_kotlin_and_bridge_give_the_engine_s_greedy_tokens(gemma3_bundle, gemma3_model, run_host,
                                                                              tmp_path):
    """The app's path on the host JVM (Tokenizer.kt on Gemma's SentencePiece-style tokenizer.json, the
    chat format without a system role, the C bridge over ONNX Runtime 1.17.0)."""
    import shutil

    from ondevice.converters.export_android import export_android

    bundle = shutil.copytree(gemma3_bundle, tmp_path / "gemma.bundle")
    export_android(bundle)
    report = run_host({"bundle": str(bundle), "runs": [{"messages": [{"role": "user", "content": c}], "max_tokens": 16,
                                                        "reset": True} for c in CHAT]}, "ort117")
    for run, prompt in zip(report["runs"], CHAT):
        assert run["prompt_ids"] == gemma3_model.encode_prompt(prompt)
        gemma3_model.reset()
        g = gemma3_model.generate(prompt, max_tokens=16, temperature=0)
        ids = g.token_ids[:-1] if g.finish_reason == "stop" else g.token_ids
        assert run["ids"] == ids
        assert run["text"] == g.text
