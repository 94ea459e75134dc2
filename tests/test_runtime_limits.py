"""Runtime limits on tiny random bundles: the context, argument values, the DRAM budget, execution
providers, drafts that do not fit their target, and two threads on one model. Each limit is a clear
OndeviceError (or a documented policy), never a silent fallback, a numpy/ORT exception or a hang."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import threading

import onnxruntime as ort
import pytest
from models import write_tiny_llama_gguf

import ondevice
from ondevice.cli import main, one_line
from ondevice.errors import (BudgetTooSmallError, BundleError, ContextOverflowError, DraftMismatchError,
                             InvalidArgumentError, ModelBusyError, OndeviceError, ProviderError,
                             TokenizerMismatchError)
from ondevice.speculative import SpecConfig

CPU = "CPUExecutionProvider"
IDS = [1, 40, 72, 100, 105, 32, 119, 111, 114, 108, 100]
GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
PROMPTS = ([5, 6, 7, 8, 9, 10, 11], [1, 200, 31, 4, 77, 150, 90, 12, 13])


@pytest.fixture(scope="module")
def model(tiny_bundle) -> ondevice.Model:
    """A model of its own: a test that leaves it held cannot block the shared tiny_model."""
    return ondevice.load(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def expected(model) -> list[list[int]]:
    """Each prompt's greedy tokens, generated alone."""
    out = []
    for prompt in PROMPTS:
        model.reset()
        out.append(model.generate(prompt, **GREEDY).token_ids)
    return out


def stream_text(model: ondevice.Model, prompt, **options) -> str:
    model.reset()
    return "".join(model.stream(prompt, **options))


def missing_provider() -> str:
    """A provider ONNX Runtime knows that this build lacks (CUDA here, or whichever is missing)."""
    lacking = [p for p in ort.get_all_providers() if p not in ort.get_available_providers()]
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in lacking else lacking[0]


# --- the context -----------------------------------------------------------------------------------

def test_the_default_max_tokens_stops_at_the_end_of_the_context_with_finish_reason_length(tiny_bundle_ctx64):
    model = ondevice.load(tiny_bundle_ctx64, threads=1)
    g = model.generate((IDS * 6)[:60], temperature=0, ignore_eos=True)
    assert len(g.token_ids) == 4 and g.finish_reason == "length"


def test_a_stream_past_the_context_raises_before_its_first_piece(tiny_bundle_ctx64):
    model = ondevice.load(tiny_bundle_ctx64, threads=1)
    stream = model.stream(IDS, max_tokens=54)
    with pytest.raises(ContextOverflowError, match="ask for at most 53 new tokens"):
        next(stream)
    assert model.generate(IDS, max_tokens=53, temperature=0).token_ids  # the model is free again


# --- argument values -------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", "8"), ("max_tokens", True),
    ("temperature", -1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "hot"),
    ("top_p", 2), ("top_p", 0), ("top_k", -1), ("top_k", 2.5), ("min_p", 1.0),
    ("repetition_penalty", 0), ("repetition_penalty", float("nan")), ("seed", -1), ("seed", 0.5),
])
def test_a_generation_option_out_of_range_is_an_invalid_argument_error_that_is_also_a_value_error(
        model, option, value):
    options = {"max_tokens": 2, option: value}
    with pytest.raises(InvalidArgumentError, match=option) as raised:
        model.generate(IDS, **options)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, OndeviceError)
    with pytest.raises(InvalidArgumentError, match=option):
        next(model.stream(IDS, **options))


@pytest.mark.parametrize("prompt", [[1, 320], [1, 5000], [1, -1]])
def test_a_token_id_outside_the_vocabulary_is_refused(model, prompt):
    with pytest.raises(InvalidArgumentError, match=rf"token id {prompt[1]} is outside the vocabulary \(0..319\)"):
        model.generate(prompt, max_tokens=2)


@pytest.mark.parametrize("prompt", [42, None, b"hi", {"role": "user", "content": "hi"},
                                    [1, {"role": "user", "content": "hi"}], [1, "two"], [True, False]])
def test_a_prompt_of_the_wrong_kind_is_refused(model, prompt):
    with pytest.raises(InvalidArgumentError, match="a prompt is a string, a list of messages .* or a list of token ids"):
        model.generate(prompt, max_tokens=2)


def test_one_stop_string_is_that_string_not_its_characters(model):
    options = dict(GREEDY, max_tokens=24)
    text = stream_text(model, IDS, **options)
    # two characters that occur in the text later together than the first of them alone
    stop = next(text[k:k + 2] for k in range(len(text) - 1) if min(map(text.index, text[k:k + 2])) < k)
    cut = model.generate(IDS, stop=stop, **options)
    assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("options", [
    {"backend": "x"}, {"threads": 0}, {"threads": -1}, {"threads": "2"}, {"prefill_chunk": 0},
    {"prefill_chunk": 1.5}, {"split_prefill": "sideways"}, {"providers": CPU},
])
def test_a_load_option_out_of_range_is_an_invalid_argument_error(tiny_bundle, options):
    name = next(iter(options))
    with pytest.raises(InvalidArgumentError, match=name) as raised:
        ondevice.load(tiny_bundle, **options)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("options", [
    {"dram_budget": "lots"}, {"dram_budget": "50MB", "ffn_select": "best"},
    {"dram_budget": "50MB", "ffn_fraction": 0}, {"dram_budget": "50MB", "ffn_fraction": 1.5},
])
def test_a_flash_option_out_of_range_is_an_invalid_argument_error(flash_bundle, options):
    with pytest.raises(InvalidArgumentError, match="size|ffn_select|ffn_fraction"):
        ondevice.load(flash_bundle, **options)


# --- the DRAM budget -------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", ["1KB", "-5MB", 0])
def test_a_dram_budget_below_the_minimum_is_budget_too_small_error_saying_how_much_to_give(flash_bundle, budget):
    with pytest.raises(BudgetTooSmallError, match=r"below what must stay resident.*give at least [\d.]+ MB"):
        ondevice.load(flash_bundle, dram_budget=budget)


# --- execution providers ---------------------------------------------------------------------------

def test_an_explicit_provider_this_build_lacks_raises_provider_error_naming_the_available_ones(tiny_bundle):
    lacking = missing_provider()
    for providers in ([lacking], [lacking, CPU]):
        with pytest.raises(ProviderError) as raised:
            ondevice.load(tiny_bundle, providers=providers)
        message = str(raised.value)
        assert f"{lacking} is not available in this onnxruntime build" in message
        assert all(p in message for p in ort.get_available_providers())


@pytest.mark.parametrize("name, hint", [("NoSuchExecutionProvider", ""),
                                        ("cuda", " (did you mean 'CUDAExecutionProvider'?)")])
def test_a_provider_onnx_runtime_does_not_know_raises_provider_error_with_a_hint(tiny_bundle, name, hint):
    with pytest.raises(ProviderError) as raised:
        ondevice.load(tiny_bundle, providers=[name])
    assert str(raised.value).startswith(f"'{name}' is not an ONNX Runtime execution provider{hint}; this build has ")
    assert CPU in str(raised.value)


def test_explicit_providers_may_be_names_or_name_option_pairs(tiny_bundle):
    for providers in ([CPU], [(CPU, {})]):
        assert ondevice.load(tiny_bundle, providers=providers).backend.providers == [CPU]


def test_a_profile_whose_providers_this_build_lacks_falls_back_to_the_cpu_and_logs_it(tiny_bundle, caplog):
    if "XnnpackExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has XNNPACK")
    with caplog.at_level(logging.WARNING):
        model = ondevice.load(tiny_bundle, profile="generic-arm64-cpu")
    assert model.backend.providers == [CPU]
    assert "XnnpackExecutionProvider not available in this onnxruntime build: falling back" in caplog.text


@pytest.fixture
def xnnpack_listed_but_broken(monkeypatch):
    """ondevice believes this build has XNNPACK; ONNX Runtime, which does not, leaves it out of the session
    (as it does with a provider that is in the build but fails to start)."""
    if "XnnpackExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has XNNPACK")
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["XnnpackExecutionProvider", *real])


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_an_explicit_provider_that_does_not_start_raises_provider_error(tiny_bundle, xnnpack_listed_but_broken):
    with pytest.raises(ProviderError, match="XnnpackExecutionProvider is in this onnxruntime build but did not start"):
        ondevice.load(tiny_bundle, providers=["XnnpackExecutionProvider", CPU])


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_a_profile_provider_that_does_not_start_falls_back_with_a_log_line(tiny_bundle, xnnpack_listed_but_broken,
                                                                           caplog):
    with caplog.at_level(logging.WARNING):
        model = ondevice.load(tiny_bundle, profile="generic-arm64-cpu")
    assert model.backend.providers == [CPU]
    assert "XnnpackExecutionProvider is in this onnxruntime build but did not start" in caplog.text
    assert model.generate(IDS, max_tokens=2).token_ids


# --- drafts ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_draft(tiny_bundle, tmp_path_factory):
    """A draft with the target's tokenizer but 400 logits where the target has 320 token ids."""
    folder = tmp_path_factory.mktemp("wide-draft")
    draft = ondevice.convert(write_tiny_llama_gguf(folder / "wide.gguf", vocab=400, seed=3), folder / "wide.bundle",
                             progress=False)
    shutil.copyfile(tiny_bundle / "tokenizer.json", draft / "tokenizer.json")
    manifest = json.loads((draft / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = json.loads((tiny_bundle / "manifest.json").read_text())["files"][
        "tokenizer.json"]
    (draft / "manifest.json").write_text(json.dumps(manifest))
    return draft


def test_a_draft_that_proposes_token_ids_the_target_lacks_raises_draft_mismatch_error(tiny_bundle, wide_draft):
    with pytest.raises(DraftMismatchError, match="proposes token ids up to 399 but .* has 320 token ids"):
        ondevice.load(tiny_bundle, draft=wide_draft)
    assert issubclass(TokenizerMismatchError, DraftMismatchError)  # a tokenizer mismatch is one kind of it


def test_a_draft_that_is_not_a_bundle_is_a_bundle_error_naming_the_draft(tiny_bundle, tiny_gguf):
    with pytest.raises(BundleError, match=rf"^the draft: {tiny_gguf}: not a bundle"):
        ondevice.load(tiny_bundle, draft=tiny_gguf)


def test_a_draft_with_a_shorter_context_drafts_while_the_text_fits_and_the_output_stays_the_targets(
        tiny_bundle, tiny_bundle_ctx64, model):
    prompt = (IDS * 6)[:58]  # the draft's 64 positions run out a few tokens in
    options = dict(GREEDY, max_tokens=40)
    model.reset()
    plain = model.generate(prompt, **options).token_ids
    spec = ondevice.load(tiny_bundle, draft=tiny_bundle_ctx64, threads=1)
    spec.speculator.config = SpecConfig(adaptive=False, threshold=0.0, max_nodes=8, max_depth=4)
    spec.speculator.threshold = 0.0
    g = spec.generate(prompt, **options)
    assert g.token_ids == plain
    assert g.speculation["drafted"] > 0  # it did draft before the text outgrew it


# --- two threads, one model ------------------------------------------------------------------------

def run_in_threads(*jobs) -> list:
    """Run each job in its own thread, all released at once; their results (or exceptions) in order."""
    start = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)

    def run(i, job):
        start.wait()
        try:
            results[i] = job()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_threads_generating_at_once_each_get_their_single_threaded_answer(model, expected):
    def job(prompt):
        return lambda: [model.generate(prompt, **GREEDY).token_ids for _ in range(4)]

    results = run_in_threads(job(PROMPTS[0]), job(PROMPTS[1]))
    assert results == [[expected[0]] * 4, [expected[1]] * 4]


def test_two_threads_streaming_at_once_each_get_their_single_threaded_text(model):
    texts = [stream_text(model, p, **GREEDY) for p in PROMPTS]

    def job(prompt):
        return lambda: ["".join(model.stream(prompt, **GREEDY)) for _ in range(4)]

    assert run_in_threads(job(PROMPTS[0]), job(PROMPTS[1])) == [[texts[0]] * 4, [texts[1]] * 4]


def test_another_thread_waits_for_an_open_stream_then_gets_its_own_answer(model, expected):
    text = stream_text(model, PROMPTS[0], **GREEDY)
    model.reset()
    stream = model.stream(PROMPTS[0], **GREEDY)
    pieces = [next(stream)]  # the stream now holds the model
    other = start_thread(lambda: model.generate(PROMPTS[1], **GREEDY).token_ids)
    pieces.extend(stream)  # ends the stream: the other thread's call runs after it
    assert other() == expected[1]
    assert "".join(pieces) == text


def start_thread(job):
    """Start job in a thread now; the function returned joins it and returns its result (or raises)."""
    box: list = []

    def run():
        try:
            box.append(job())
        except BaseException as e:  # noqa: BLE001 - raised in the test's thread
            box.append(e)

    thread = threading.Thread(target=run)
    thread.start()

    def result():
        thread.join()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    return result


def test_a_call_while_this_threads_own_stream_is_open_raises_model_busy_error_instead_of_waiting(model, expected):
    stream = model.stream(PROMPTS[0], **GREEDY)
    next(stream)
    for call in (lambda: model.generate(PROMPTS[1], **GREEDY), lambda: next(model.stream(PROMPTS[1])), model.reset):
        with pytest.raises(ModelBusyError, match="read it to the end or call its close"):
            call()
    stream.close()
    assert model.generate(PROMPTS[1], **GREEDY).token_ids == expected[1]


def test_a_stream_dropped_without_close_frees_the_model(model, expected):
    stream = model.stream(PROMPTS[0], **GREEDY)
    next(stream)
    del stream
    assert model.generate(PROMPTS[1], **GREEDY).token_ids == expected[1]
    for _ in model.stream(PROMPTS[0], **GREEDY):
        break  # leaving a for loop drops the stream too
    assert model.generate(PROMPTS[1], **GREEDY).token_ids == expected[1]


def test_a_stream_abandoned_in_a_reference_cycle_frees_the_model_for_this_and_other_threads(model, expected):
    gc.disable()  # the cycle below is then only collected when a call finds the model held
    try:
        for caller in (lambda job: job(), lambda job: run_in_threads(job)[0]):
            holder = {"stream": model.stream(PROMPTS[0], **GREEDY)}
            holder["self"] = holder
            next(holder["stream"])
            del holder
            assert caller(lambda: model.generate(PROMPTS[1], **GREEDY).token_ids) == expected[1]
    finally:
        gc.enable()


def test_an_error_inside_a_generation_frees_the_model(model, expected):
    with pytest.raises(ContextOverflowError):
        model.generate(PROMPTS[0], max_tokens=1000)
    with pytest.raises(InvalidArgumentError):
        next(model.stream(PROMPTS[0], max_tokens=-1))
    assert run_in_threads(lambda: model.generate(PROMPTS[1], **GREEDY).token_ids) == [expected[1]]


# --- the command line ------------------------------------------------------------------------------

def test_the_cli_prints_each_limit_as_one_error_line_and_exits_2(capsys, tiny_bundle, tiny_bundle_ctx64, flash_bundle,
                                                                 wide_draft, tiny_gguf, tmp_path):
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    cases = [
        (["run", tiny_bundle_ctx64, "--prompt-file", long_prompt, "--raw"], "context holds 64"),
        (["run", tiny_bundle_ctx64, "hi", "--raw", "--max-tokens", "100"], "ask for at most"),
        (["run", tiny_bundle, "hi", "--max-tokens", "-1"], "max_tokens"),
        (["run", tiny_bundle, "hi", "--temperature", "nan"], "temperature must be a finite number"),
        (["run", tiny_bundle, "hi", "--threads", "0"], "threads"),
        (["run", tiny_bundle, "hi", "--prefill-chunk", "0"], "prefill_chunk"),
        (["run", flash_bundle, "hi", "--dram-budget", "1KB"], "give at least"),
        (["run", flash_bundle, "hi", "--dram-budget", "lots"], "cannot read 'lots' as a size"),
        (["run", tiny_bundle, "hi", "--draft", wide_draft], "proposes token ids"),
        (["run", tiny_bundle, "hi", "--draft", tiny_gguf], "the draft:"),
    ]
    for argv, message in cases:
        code = main([str(a) for a in argv])
        _, err = capsys.readouterr()
        assert code == 2, argv
        assert err.startswith("error:") and message in err and "Traceback" not in err, (argv, err)
        assert err.endswith("\n") and "\n" not in err[:-1], (argv, err)


def test_an_error_message_that_spans_lines_is_printed_on_one():
    assert one_line(BundleError("ONNX Runtime cannot load the graph:\n  bad node\n\tat 3")) == \
        "ONNX Runtime cannot load the graph: bad node at 3"
