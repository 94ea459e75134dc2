"""The app's generation path (Kotlin tokenizer, chat format, loop, sampler; the C bridge over the ONNX
Runtime C API) gives the Python engine's tokens on the real SmolLM2 bundle, under the PyPI
runtime and under ONNX Runtime 1.17 (the app's C API)."""

import json
import shutil

import pytest
from android_host import REPO
from test_smollm2 import CHAT, RAW

import ondevice

N = 32


@pytest.fixture(scope="module")
def python_model(android_bundle):
    return ondevice.load(android_bundle, threads=2)


def python_greedy(model, prompt, raw=False):
    model.reset()
    g = model.generate(prompt, max_tokens=N, temperature=0, raw=raw)
    ids = list(g.token_ids)
    if ids and ids[-1] in model.eos_token_ids:  # the app does not count the stop token as generated
        ids.pop()
    return ids, g.text


@pytest.mark.parametrize("runtime", ["pypi", "ort117"])
def test_greedy_tokens_and_text_equal_the_python_engine(run_host, android_bundle, python_model, runtime):
    runs = [{"messages": [{"role": "user", "content": c}], "max_tokens": N, "reset": True} for c in CHAT]
    runs += [{"raw": r, "max_tokens": N, "reset": True} for r in RAW]
    report = run_host({"bundle": str(android_bundle), "runs": runs}, runtime)
    assert report["ort_version"].startswith("1.17") == (runtime == "ort117")
    for run, prompt, raw in zip(report["runs"], CHAT + RAW, [False] * len(CHAT) + [True] * len(RAW)):
        assert run["prompt_ids"] == python_model.encode_prompt(prompt, raw=raw)
        ids, text = python_greedy(python_model, prompt, raw)
        assert run["ids"] == ids, prompt
        assert run["text"] == text
        assert run["finish"] == ("stop" if len(ids) < N else "length")


def test_the_app_renders_chat_history_as_the_jinja_template_does(run_host, android_bundle, python_model):
    history = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
               {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?\n"}]
    report = run_host({"bundle": str(android_bundle), "runs": [{"messages": history, "max_tokens": 4}]})
    assert report["runs"][0]["rendered"] == python_model.tokenizer.render_chat(history)


def test_a_second_chat_turn_prefills_only_its_new_tokens_and_answers_as_a_fresh_model(run_host, android_bundle):
    first = [{"role": "user", "content": "What is the capital of France?"}]
    report = run_host({"bundle": str(android_bundle), "runs": [{"messages": first, "max_tokens": 16}]})
    answer = report["runs"][0]["text"]
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
    turns = run_host({"bundle": str(android_bundle), "runs": [{"messages": first, "max_tokens": 16},
                                                               {"messages": second, "max_tokens": 16},
                                                               {"messages": second, "max_tokens": 16, "reset": True}]})
    chat, fresh = turns["runs"][1], turns["runs"][2]
    assert chat["prefilled"] < len(chat["prompt_ids"]) // 2  # the first turn stayed in the cache
    assert fresh["prefilled"] == len(fresh["prompt_ids"])
    assert chat["ids"] == fresh["ids"]


def test_cancelling_stops_the_stream_and_the_next_call_still_works(run_host, android_bundle):
    msgs = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    report = run_host({"bundle": str(android_bundle), "runs": [{"messages": msgs, "max_tokens": 64, "cancel_after": 3},
                                                                {"messages": msgs, "max_tokens": 8, "reset": True}]})
    cancelled, after = report["runs"]
    assert cancelled["finish"] == "cancelled" and len(cancelled["ids"]) == 3
    assert after["ids"][:3] == cancelled["ids"]


def test_sampling_with_a_seed_is_reproducible_and_differs_from_greedy(run_host, android_bundle):
    msgs = [{"role": "user", "content": "Write a line of a poem about the sea."}]
    sampled = {"messages": msgs, "max_tokens": 24, "temperature": 1.0, "reset": True}
    report = run_host({"bundle": str(android_bundle), "runs": [sampled, sampled, dict(sampled, temperature=0)]})
    a, b, greedy = report["runs"]
    assert a["ids"] == b["ids"]
    assert a["ids"] != greedy["ids"]


@pytest.mark.parametrize("profile, missing", [
    ("snapdragon-8gen3-phone", ["QNNExecutionProvider (not in this ONNX Runtime build)", "XnnpackExecutionProvider ("]),
    ("tensor-g3-phone", ["NnapiExecutionProvider (not in this ONNX Runtime build)", "XnnpackExecutionProvider ("]),
])
def test_profile_providers_missing_from_the_runtime_fall_back_to_cpu(run_host, android_bundle, profile, missing):
    # the host's PyPI runtime has neither QNN, NNAPI nor XNNPACK: each is named, CPU runs
    report = run_host({"bundle": str(android_bundle), "profile": str(REPO / f"profiles/{profile}.json"),
                       "runs": [{"raw": "Hello", "max_tokens": 2}]})
    assert report["providers"] == ["CPUExecutionProvider"]
    for name in missing:
        assert name in report["skipped_providers"]
    assert len(report["runs"][0]["ids"]) == 2


@pytest.mark.parametrize("damage, message", [
    ("no_android", "run `ondevice export-android`"),
    ("truncated", "the copy is incomplete"),
    ("escape", "leaves the bundle"),
    ("not_json", "not valid JSON"),
])
def test_a_damaged_bundle_is_a_clear_error(run_host, android_bundle, tmp_path, damage, message):
    bundle = shutil.copytree(android_bundle, tmp_path / "b.bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    if damage == "no_android":
        del manifest["backends"]["android"]
    elif damage == "escape":
        manifest["backends"]["android"]["graph"] = "../../etc/passwd"
    elif damage == "truncated":
        data = bundle / "android.onnx.data"
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    (bundle / "manifest.json").write_text("{oops" if damage == "not_json" else json.dumps(manifest))
    report = run_host({"bundle": str(bundle), "runs": []}, expect_error=True)
    assert message in report["error"]


def test_a_prompt_over_the_context_is_a_clear_error(run_host, android_bundle):
    runs = [{"raw": "word " * 9000, "max_tokens": 8}]
    report = run_host({"bundle": str(android_bundle), "runs": runs}, expect_error=True)
    assert "context holds 8192" in report["error"]


def test_a_stripping_chat_format_strips_as_python_does(run_host, android_bundle, tmp_path):
    from ondevice.converters.export_android import format_chat

    bundle = shutil.copytree(android_bundle, tmp_path / "strip.bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    fmt = manifest["backends"]["android"]["chat_format"]
    fmt["strip_content"] = True  # as for Gemma's template
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    history = [{"role": "user", "content": " \u00a0\u2003Hi\u3000\t\n"}, {"role": "assistant", "content": "\x1cok\u200b "},
               {"role": "user", "content": "\u0085more\u2028"}]
    report = run_host({"bundle": str(bundle), "runs": [{"messages": history, "max_tokens": 1}]})
    assert report["runs"][0]["rendered"] == format_chat(fmt, history)
