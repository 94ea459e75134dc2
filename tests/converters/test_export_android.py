"""export_android: the bundle's graph rewritten for ONNX Runtime 1.17 computes what the bundle's
own graph computes, and the chat template becomes text around each message only when it is."""

import json

import numpy as np
import onnx
import pytest
from android_graph import AndroidGraph

import ondevice
from ondevice.converters.export_android import chat_format, export_android, format_chat
from ondevice.errors import BundleError, ChatTemplateError
from ondevice.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def android_tiny(tiny_bundle, tmp_path_factory):
    import shutil
    path = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("android") / "tiny.bundle")
    export_android(path)
    return path


def test_the_graph_uses_only_ops_onnx_runtime_1_17_runs_on_cpu(android_tiny):
    model = onnx.load(android_tiny / "android.onnx", load_external_data=False)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert not ops & {("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "GatherBlockQuantized")}
    bits = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {4}  # 1.17's MatMulNBits has 4-bit kernels only
    assert model.ir_version <= 9 and {o.domain: o.version for o in model.opset_import}[""] <= 20


def test_logits_equal_the_bundle_s_own_engine_through_prefill_and_decode(android_tiny):
    engine = ondevice.load(android_tiny, threads=1).backend
    graph = AndroidGraph(android_tiny)
    prompt = [5, 17, 42, 99, 3, 250, 7, 8, 9, 10]
    np.testing.assert_allclose(graph.step(prompt, 0), engine.forward(prompt, 0)[-1], atol=1e-4)
    for pos, tok in enumerate([11, 12, 300, 4], start=len(prompt)):
        np.testing.assert_allclose(graph.step([tok], pos), engine.forward([tok], pos)[-1], atol=1e-4)


def test_a_prompt_in_chunks_equals_it_in_one_call(android_tiny):
    prompt = list(range(3, 60))
    whole = AndroidGraph(android_tiny).step(prompt, 0)
    chunked = AndroidGraph(android_tiny).greedy(prompt, 1, chunk=16)[1][0]
    np.testing.assert_allclose(chunked, whole, atol=1e-4)


def test_cache_rows_at_and_past_past_length_are_never_read(android_tiny):
    graph = AndroidGraph(android_tiny)
    graph.step([5, 6, 7], 0)
    for buf in graph.cache:  # garbage where the graph must not look
        buf[:, :, 3:] = 1e3
    np.testing.assert_allclose(graph.step([8], 3), AndroidGraph(android_tiny).step([5, 6, 7, 8], 0), atol=1e-4)


def test_manifest_records_the_graph_with_checksums_and_the_bundle_still_verifies(android_tiny):
    m = json.loads((android_tiny / "manifest.json").read_text())
    record = m["backends"]["android"]
    assert record["ort_api"] == 17 and record["graph"] in m["files"] and record["data"] in m["files"]
    assert [i["name"] for i in record["inputs"]][:2] == ["input_ids", "past_length"]
    ondevice.load(android_tiny)  # checksums of every file, the new ones included


def test_chat_format_renders_what_the_jinja_template_renders(tiny_bundle):
    tok = load_tokenizer(tiny_bundle)
    fmt = chat_format(tok)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi\n"},
            {"role": "assistant", "content": " yes "}, {"role": "user", "content": "more?"}]
    assert format_chat(fmt, msgs) == tok.render_chat(msgs)
    assert format_chat(fmt, msgs[1:], False) == tok.render_chat(msgs[1:], add_generation_prompt=False)


TRIMMING = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n' %}"
            "{% set msgs = messages[1:] %}{% else %}{% set first = '' %}{% set msgs = messages %}{% endif %}"
            "{% for m in msgs %}<{{ m['role'] }}>{{ (first if loop.first else '') + m['content'] | trim }}</s>"
            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def test_a_template_that_strips_messages_and_folds_the_system_prompt_is_rendered_without_a_system_role(tiny_bundle):
    tok = load_tokenizer(tiny_bundle)
    tok.chat_template = TRIMMING  # the shape of Gemma's
    fmt = chat_format(tok)
    assert fmt["strip_content"] and "system" not in fmt["roles"]
    msgs = [{"role": "user", "content": "  Hi \u00a0\n"}, {"role": "assistant", "content": "\tyes "},
            {"role": "user", "content": "more?"}]
    assert format_chat(fmt, msgs) == tok.render_chat(msgs)


def test_a_template_that_changes_the_messages_is_refused(tiny_bundle):
    tok = load_tokenizer(tiny_bundle)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | upper }}</s>{% endfor %}"
    with pytest.raises(ChatTemplateError, match="the Android app cannot"):
        chat_format(tok)


def test_flash_bundles_are_refused_with_a_clear_error(flash_bundle, copy_bundle):
    with pytest.raises(BundleError, match="plain bundle"):
        export_android(copy_bundle(flash_bundle))
