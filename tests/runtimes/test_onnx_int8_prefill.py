"""Prefill through the int8 graph, decode through the float graph, over one KV cache."""

import json

import numpy as np
import pytest

import ondevice
from ondevice.bundle import read_bundle
from ondevice.errors import BundleError
from ondevice.runtimes.onnx import OnnxBackend

PROMPT = [1, 40, 72, 100, 105, 32, 119, 111, 114, 108, 100, 33, 200, 7] * 3


@pytest.fixture(scope="module")
def int8_bundle(tiny_gguf, tmp_path_factory):
    return ondevice.convert(tiny_gguf, tmp_path_factory.mktemp("int8-rt") / "tiny-int8.bundle",
                            int8_prefill=True, progress=False)


def test_prefill_runs_the_int8_graph_and_decode_the_float_graph_on_one_cache(int8_bundle):
    assert ondevice.load(int8_bundle, int8_prefill=True).backend.chunk_size == 256  # the manifest's chunk
    model = ondevice.load(int8_bundle, int8_prefill=True, prefill_chunk=16)
    backend = model.backend
    calls = {"int8": 0, "float": 0}
    int8_run, float_run = backend.int8_session.run_with_iobinding, backend.session.run_with_iobinding
    backend.int8_session.run_with_iobinding = lambda b: (calls.__setitem__("int8", calls["int8"] + 1), int8_run(b))
    backend.session.run_with_iobinding = lambda b: (calls.__setitem__("float", calls["float"] + 1), float_run(b))
    out = model.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    # 42 prompt tokens: two full chunks of 16 in int8, the last 10 unpadded in float; 7 decode steps in float
    assert calls == {"int8": 2, "float": 1 + 7}
    reference = ondevice.load(int8_bundle)
    assert out.token_ids == reference.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True).token_ids


def test_the_int8_prefill_writes_the_cache_the_float_decode_reads(int8_bundle):
    q = ondevice.load(int8_bundle, int8_prefill=True).backend
    f = ondevice.load(int8_bundle).backend
    n = len(PROMPT)
    q.forward(PROMPT, 0)
    f.forward(PROMPT, 0)
    for mine, theirs in zip(q._kv_arrays, f._kv_arrays):  # the same buffers the decode session is bound to
        assert np.abs(mine[:, :, :n] - theirs[:, :, :n]).max() < 1e-2 * np.abs(theirs[:, :, :n]).max()
    step_q, step_f = q.decode_one(5, n)[0].copy(), f.decode_one(5, n)[0].copy()
    assert np.abs(step_q - step_f).max() < 1e-2 * np.abs(step_f).max()


def test_both_sessions_follow_the_cache_when_it_grows(int8_bundle):
    bundle = read_bundle(int8_bundle)
    backend = OnnxBackend(bundle, capacity=64)
    backend.use_int8_prefill(bundle)
    backend.chunk_size = 128
    long = (PROMPT * 8)[:255]
    # the int8 chunk (128 slots) and then the float rest (255) each grow the cache: new buffers,
    # which both sessions must be bound to
    got = backend.forward(long, 0)[-1]
    assert backend.capacity > 64
    want = ondevice.load(int8_bundle).backend.forward(long, 0)[-1]
    assert got.argmax() == want.argmax() and np.abs(got - want).max() < 1e-2 * np.abs(want).max()
    step = backend.decode_one(int(got.argmax()), len(long))[0]
    reference = OnnxBackend(bundle, capacity=256)
    reference.forward(long, 0)
    assert np.abs(step - reference.decode_one(int(got.argmax()), len(long))[0]).max() < 1e-2 * np.abs(step).max()


def test_asking_for_int8_prefill_without_the_graph_names_the_fix(tiny_bundle):
    with pytest.raises(BundleError, match="--int8-prefill"):
        ondevice.load(tiny_bundle, int8_prefill=True)


def test_cli_converts_with_and_runs_through_the_int8_graph(capsys, tiny_gguf, tmp_path):
    from ondevice.cli import main

    out = tmp_path / "cli-int8.bundle"
    assert main(["convert", str(tiny_gguf), str(out), "--int8-prefill", "a8w8", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    spec = manifest["backends"]["onnx"]["prefill_int8"]
    assert spec["quantization"]["preset"] == "a8w8" and spec["chunk_sizes"] == [128]
    capsys.readouterr()
    assert main(["run", str(out), "--int8-prefill", "--raw", "hello", "--max-tokens", "4", "--temperature", "0",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4
    assert main(["bench", str(out), "--int8-prefill", "--json", "--repeat", "1", "--prompt-lengths", "32",
                 "--decode-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["int8_prefill"] is True
    assert main(["inspect", str(out)]) == 0
    assert "int8 prefill  a8w8: 8 linears on int8 kernels (8-bit activations" in capsys.readouterr().out
    assert ondevice.load(out, int8_prefill=True).backend.chunk_size == 128
