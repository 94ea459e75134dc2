"""The engine on a tiny random llama bundle: context limits, streaming, stop strings, determinism,
KV-cache reuse between calls, and the three kinds of prompt."""

import numpy as np
import pytest

import ondevice
from ondevice.errors import ContextOverflowError, InvalidArgumentError

CONTEXT = 64  # tiny_bundle_ctx64's max_context
IDS = [1, 40, 72, 100, 105, 32, 119, 111, 114, 108, 100]


def fresh(model: ondevice.Model, prompt, **options) -> ondevice.Generation:
    """generate() with an empty KV cache."""
    model.reset()
    return model.generate(prompt, **options)


@pytest.fixture(scope="module")
def model_ctx64(tiny_bundle_ctx64) -> ondevice.Model:
    return ondevice.load(tiny_bundle_ctx64, threads=1)


# --- the context ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [CONTEXT, CONTEXT + 1, 3 * CONTEXT])
def test_a_prompt_that_fills_the_context_is_a_context_overflow_error(model_ctx64, n):
    with pytest.raises(ContextOverflowError, match=rf"prompt has {n} tokens but the context holds 64"):
        model_ctx64.generate((IDS * 50)[:n], max_tokens=1)


def test_a_long_text_prompt_is_a_context_overflow_error(model_ctx64):
    with pytest.raises(ContextOverflowError):
        model_ctx64.generate("The quick brown fox jumps over the lazy dog. " * 20, raw=True, max_tokens=1)
    with pytest.raises(ContextOverflowError):  # the chat template's system prompt alone overflows 64 tokens
        model_ctx64.generate("Hi", max_tokens=1)


def test_max_tokens_past_the_context_says_how_many_fit(model_ctx64):
    prompt = IDS[:10]
    with pytest.raises(ContextOverflowError, match="ask for at most 54 new tokens"):
        model_ctx64.generate(prompt, max_tokens=55)


def test_a_generation_may_fill_the_context_exactly(model_ctx64):
    model_ctx64.reset()
    g = model_ctx64.generate(IDS[:10], max_tokens=54, temperature=0, ignore_eos=True)
    assert len(g.token_ids) == 54 and g.finish_reason == "length"
    g = fresh(model_ctx64, (IDS * 10)[:63], max_tokens=1)
    assert len(g.token_ids) == 1


def test_an_overflowing_request_leaves_the_model_usable(tiny_model):
    expected = fresh(tiny_model, IDS, max_tokens=5, temperature=0).token_ids
    with pytest.raises(ContextOverflowError):
        tiny_model.generate(IDS, max_tokens=1000)
    assert tiny_model.generate(IDS, max_tokens=5, temperature=0).token_ids == expected


def test_invalid_requests_raise_invalid_argument_error_which_is_a_value_error(tiny_model):
    for request, message in ((dict(prompt=IDS, max_tokens=0), "max_tokens"),
                             (dict(prompt="", raw=True, max_tokens=1), "empty"),
                             (dict(prompt=IDS, max_tokens=1, top_p=0.0), "top_p")):
        with pytest.raises(InvalidArgumentError, match=message) as raised:
            tiny_model.generate(**request)
        assert isinstance(raised.value, ValueError)


# --- streaming and stop strings --------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    {"temperature": 0.0},
    {"temperature": 1.0, "seed": 3},
    {"temperature": 1.0, "seed": 3, "stop": ["never-generated"]},
])
def test_stream_pieces_join_to_the_generated_text(tiny_model, options):
    tiny_model.reset()
    pieces = list(tiny_model.stream(IDS, max_tokens=30, ignore_eos=True, **options))
    assert all(pieces)  # no empty pieces
    assert "".join(pieces) == fresh(tiny_model, IDS, max_tokens=30, ignore_eos=True, **options).text


def a_stop_string_inside(text: str) -> str | None:
    """A two-character substring of text that does not start it and has no U+FFFD."""
    for i in range(1, len(text) - 1):
        if "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i:
            return text[i:i + 2]
    return None


def sampled_text_with_a_stop_string(model, first_seed: int, **options):
    """(seed, generation, stop string): the first seed from first_seed whose text has a usable stop string
    (the random tiny model often samples lone bytes that decode to U+FFFD)."""
    for seed in range(first_seed, first_seed + 300):
        full = fresh(model, "Tell me a story", seed=seed, **options)
        stop = a_stop_string_inside(full.text)
        if stop is not None:
            return seed, full, stop
    pytest.fail(f"no seed in {first_seed}..{first_seed + 299} samples usable text")


@pytest.mark.parametrize("first_seed", [0, 100, 200])
def test_a_stop_string_cuts_the_text_before_it_and_finishes_with_stop(tiny_model, first_seed):
    options = dict(max_tokens=24, temperature=0.8, ignore_eos=True)
    seed, full, stop = sampled_text_with_a_stop_string(tiny_model, first_seed, **options)
    assert full.finish_reason == "length"
    cut = full.text.index(stop)

    g = fresh(tiny_model, "Tell me a story", seed=seed, stop=["zzz-never", stop], **options)
    assert g.text == full.text[:cut]
    assert g.finish_reason == "stop"
    assert g.token_ids == full.token_ids[:len(g.token_ids)]
    tiny_model.reset()
    assert "".join(tiny_model.stream("Tell me a story", seed=seed, stop=[stop], **options)) == full.text[:cut]


def test_a_stop_string_in_text_released_only_at_the_end_still_cuts_it(tiny_model):
    # Greedy from this prompt ends in lone bytes: the detokenizer holds their U+FFFD text back until the
    # final flush, so the stop check must also run on the flushed text.
    options = dict(max_tokens=6, temperature=0, ignore_eos=True)
    full = fresh(tiny_model, "Hello there", **options)
    assert full.text.find("\ufffd") >= 1, full.text  # precondition of this test
    g = fresh(tiny_model, "Hello there", stop=["\ufffd"], **options)
    assert (g.text, g.finish_reason) == (full.text[:full.text.index("\ufffd")], "stop")
    tiny_model.reset()
    assert "".join(tiny_model.stream("Hello there", stop=["\ufffd"], **options)) == g.text


def test_a_stop_string_that_never_appears_changes_nothing(tiny_model):
    options = dict(max_tokens=24, temperature=0.8, seed=56, ignore_eos=True)
    full = fresh(tiny_model, "Tell me a story", **options)
    # starts like the text's tail, so the engine holds it back at the end, then must release it
    stop = full.text[-1] + "\x00never"
    g = fresh(tiny_model, "Tell me a story", stop=[stop], **options)
    assert (g.text, g.token_ids, g.finish_reason) == (full.text, full.token_ids, "length")


def test_generation_stops_at_an_end_of_sequence_token_without_its_text(tiny_model):
    eos = tiny_model.eos_token_ids
    for seed in range(64):
        unstopped = fresh(tiny_model, IDS, max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True)
        at = next((i for i, t in enumerate(unstopped.token_ids) if t in eos), None)
        if at is not None:
            break
    else:
        pytest.fail("no seed in 0..63 samples an end-of-sequence token")
    g = fresh(tiny_model, IDS, max_tokens=24, temperature=1.0, seed=seed)
    assert g.token_ids == unstopped.token_ids[:at + 1]
    assert g.finish_reason == "stop"
    assert "<|im_end|>" not in g.text and "<|endoftext|>" not in g.text


# --- determinism ---------------------------------------------------------------------------------

def test_the_same_seed_gives_the_same_sampled_ids(tiny_model):
    options = dict(max_tokens=20, temperature=1.0, top_p=0.95, ignore_eos=True)
    a = fresh(tiny_model, IDS, seed=7, **options).token_ids
    b = fresh(tiny_model, IDS, seed=7, **options).token_ids
    c = fresh(tiny_model, IDS, seed=8, **options).token_ids
    assert a == b
    assert a != c  # the seed matters: sampling is not secretly greedy


def test_greedy_is_deterministic_and_picks_the_argmax_of_a_full_forward(tiny_model):
    g = fresh(tiny_model, IDS, max_tokens=20, temperature=0, ignore_eos=True)
    assert fresh(tiny_model, IDS, max_tokens=20, temperature=0, ignore_eos=True).token_ids == g.token_ids
    tiny_model.reset()
    logits = tiny_model.backend.forward(IDS + g.token_ids[:-1], 0, all_logits=True)
    tiny_model.reset()
    assert logits[len(IDS) - 1:].argmax(-1).tolist() == g.token_ids


# --- the KV cache between calls --------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 11}])
def test_a_prompt_extending_the_last_conversation_prefills_only_the_new_tokens(tiny_model, sampling):
    options = dict(max_tokens=8, ignore_eos=True, **sampling)
    first = fresh(tiny_model, IDS, **options)
    extended = IDS + first.token_ids + [100, 105, 32]
    # cached: the prompt and every generated token but the last (whose keys/values were never computed)
    cached = len(IDS) + len(first.token_ids) - 1
    reused = tiny_model.generate(extended, **options)
    assert reused.prefill_tokens == len(extended) - cached
    assert reused.prompt_tokens == len(extended)

    scratch = fresh(tiny_model, extended, **options)
    assert scratch.prefill_tokens == len(extended)
    assert reused.token_ids == scratch.token_ids


def test_a_prompt_diverging_from_the_cache_reuses_only_the_common_prefix(tiny_model):
    options = dict(max_tokens=8, temperature=0, ignore_eos=True)
    fresh(tiny_model, IDS + [200, 201, 202, 203], **options)
    diverging = IDS[:5] + [150, 151, 152, 153, 154, 155]
    reused = tiny_model.generate(diverging, **options)
    assert reused.prefill_tokens == len(diverging) - 5
    assert reused.token_ids == fresh(tiny_model, diverging, **options).token_ids


def test_the_same_prompt_twice_prefills_one_token_and_gives_the_same_answer(tiny_model):
    options = dict(max_tokens=8, temperature=0, ignore_eos=True)
    first = fresh(tiny_model, IDS, **options)
    again = tiny_model.generate(IDS, **options)
    assert again.prefill_tokens == 1
    assert again.token_ids == first.token_ids


def test_a_chat_turn_reuses_the_previous_turns(tiny_model):
    options = dict(max_tokens=6, temperature=0)
    messages = [{"role": "user", "content": "Hello there"}]
    first = fresh(tiny_model, messages, **options)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    second = tiny_model.generate(messages, **options)
    assert second.prefill_tokens <= second.prompt_tokens - first.prompt_tokens
    assert second.token_ids == fresh(tiny_model, messages, **options).token_ids


def test_reset_forgets_the_cache(tiny_model):
    fresh(tiny_model, IDS, max_tokens=4)
    tiny_model.reset()
    assert tiny_model.generate(IDS, max_tokens=4).prefill_tokens == len(IDS)


# --- kinds of prompt -----------------------------------------------------------------------------

def test_token_ids_are_used_as_given(tiny_model):
    g = fresh(tiny_model, IDS, max_tokens=4, temperature=0)
    assert g.prompt_tokens == len(IDS)
    assert fresh(tiny_model, np.array(IDS), max_tokens=4, temperature=0).token_ids == g.token_ids


def test_raw_text_is_tokenized_as_is_without_template_or_specials(tiny_model):
    text = "The capital of France is"
    ids = tiny_model.tokenizer.encode(text)
    g = fresh(tiny_model, text, raw=True, max_tokens=4, temperature=0)
    assert g.prompt_tokens == len(ids)
    assert g.token_ids == fresh(tiny_model, ids, max_tokens=4, temperature=0).token_ids


def test_text_and_messages_go_through_the_chat_template(tiny_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tiny_model.tokenizer.encode(tiny_model.tokenizer.render_chat(messages))
    assert tiny_model.encode_prompt(messages) == ids
    assert tiny_model.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    from_messages = fresh(tiny_model, messages, max_tokens=4, temperature=0)
    from_text = fresh(tiny_model, "What is the capital of France?", max_tokens=4, temperature=0)
    from_ids = fresh(tiny_model, ids, max_tokens=4, temperature=0)
    assert from_messages.prompt_tokens == from_text.prompt_tokens == len(ids)
    assert from_messages.token_ids == from_text.token_ids == from_ids.token_ids


def test_a_generation_reports_its_timings_and_counts(tiny_model):
    g = fresh(tiny_model, IDS, max_tokens=6, temperature=0, ignore_eos=True)
    assert len(g.token_ids) == 6 and g.prompt_tokens == len(IDS) == g.prefill_tokens
    assert g.ttft_s > 0 and g.prefill_s > 0 and g.decode_s > 0
    d = g.to_dict()
    assert set(d) >= {"text", "token_ids", "prompt_tokens", "finish_reason", "ttft_s", "prefill_tok_s",
                      "decode_tok_s"}
    assert d["prefill_tok_s"] > 0 and d["decode_tok_s"] > 0
