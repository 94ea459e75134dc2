"""The Gemma 3 torch module the TFLite and Core ML exporters convert (converters/torch_model.py), built
from the real gemma3-270m's canonical weights, run the way the runtimes run it (prefill chunks, then
one token at a time, the returned keys and values written into the cache inputs), against
transformers fp32 on the same GGUF: logits within float rounding, also past the 512-token sliding
window, and identical greedy tokens."""

import numpy as np
import pytest
import torch
from models import GEMMA3_PIP, gemma3_gguf_path, gemma3_reference, module_cache, module_step
from tokenizers import Tokenizer

from ondevice.converters.arch import gemma3
from ondevice.converters.export_coreml import StatefulDecoder
from ondevice.converters.sources import read_source
from ondevice.converters.torch_model import Gemma3Decoder, decoder_class

pytestmark = pytest.mark.skipif(gemma3_gguf_path() is None, reason=f"needs the real model: {GEMMA3_PIP}")

CACHE_LEN = 640  # past the 512-token window, enough for the long prompt and a few decode steps
CHUNK = 64  # the TFLite export's prefill chunk


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small matmuls on two shared cores: a second torch thread mostly waits (4x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source():
    """The converter's reading of the GGUF: canonical weights, config, tokenizer."""
    ckpt = read_source(gemma3_gguf_path())
    cfg = gemma3.config_from_gguf(ckpt.metadata, ckpt.weights)
    return gemma3.canonical_from_gguf(ckpt.weights, cfg), cfg, Tokenizer.from_str(ckpt.tokenizer_json)


@pytest.fixture(scope="module")
def module(source):
    weights, cfg, _ = source
    return decoder_class(cfg)(cfg, weights, CACHE_LEN).eval()


@pytest.fixture(scope="module")
def reference():
    return gemma3_reference()


def chat(tokenizer: Tokenizer, text: str) -> list[int]:
    prompt = f"<bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"
    return tokenizer.encode(prompt, add_special_tokens=False).ids


def reference_logits_at(reference, ids: list[int], rows: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return reference(input_ids=torch.tensor([ids]), logits_to_keep=torch.tensor(rows)).logits[0].numpy()


def test_gemma3_configs_get_the_gemma3_module(module):
    assert type(module) is Gemma3Decoder


def test_logits_equal_transformers_over_chunked_prefill_past_the_sliding_window_then_decode(module, source,
                                                                                          reference):
    _, cfg, tokenizer = source
    text = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 13} marbles."
                    for i in range(60))
    ids, prompt = chat(tokenizer, "Summarize this list:\n" + text)[:604], 600  # then 4 decode steps
    assert len(ids) == 604 and prompt > cfg.sliding_window
    cache, ours, rows = module_cache(module), [], []
    for start in range(0, prompt, CHUNK):  # chunks' last rows: before, across and past the window
        chunk = ids[start:min(start + CHUNK, prompt)]
        ours.append(module_step(module, cache, chunk, start))
        rows.append(start + len(chunk) - 1)
    for pos in range(prompt, len(ids)):
        ours.append(module_step(module, cache, [ids[pos]], pos))
        rows.append(pos)
    np.testing.assert_allclose(np.stack(ours), reference_logits_at(reference, ids, rows), atol=1e-4)


def test_greedy_tokens_equal_transformers_for_32_tokens(module, source, reference):
    ids = chat(source[2], "What is the capital of France?")
    cache = module_cache(module)
    tokens = [int(np.argmax(module_step(module, cache, ids, 0)))]
    while len(tokens) < 32:
        tokens.append(int(np.argmax(module_step(module, cache, tokens[-1:], len(ids) + len(tokens) - 1))))
    # transformers' greedy choice after the prompt and each prefix of ours (one pass, not 32): the same
    # tokens exactly when its greedy output is ours
    rows = list(range(len(ids) - 1, len(ids) + 31))
    assert list(reference_logits_at(reference, ids + tokens[:-1], rows).argmax(-1)) == tokens


def test_an_fp16_run_as_core_ml_computes_stays_finite_and_picks_the_fp32_modules_next_token(module, source):
    # gemma3-270m's residual stream reaches ~1e5, past fp16's 65504: the module carries it scaled down
    weights, cfg, tokenizer = source
    ids = chat(tokenizer, "What is the capital of France?")
    core_ml = StatefulDecoder(cfg, weights, cache_len=64).half().eval()
    with torch.no_grad():
        fp16 = core_ml(torch.tensor([ids], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                       torch.tensor([len(ids) - 1], dtype=torch.int32))[0].float().numpy()
    fp32 = module_step(module, module_cache(module), ids, 0)
    assert np.isfinite(fp16).all() and fp16.argmax() == fp32.argmax()
