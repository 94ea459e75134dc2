"""Malformed manifests (found by scripts/fuzz.py): every one is refused by read_bundle with a
BundleError naming the entry, before a runtime indexes it, allocates from it or hands it to ORT."""

import json
from pathlib import Path

import pytest

import ondevice
from ondevice.bundle import MANIFEST, MAX_MANIFEST_BYTES, read_bundle
from ondevice.errors import BundleError
from ondevice.tokenizer import load_tokenizer


def edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def onnx(m: dict) -> dict:
    return m["backends"]["onnx"]


def logits(m: dict) -> dict:
    return next(o for o in onnx(m)["outputs"] if o["name"] == "logits")


# --- entries of the wrong type: the runtime indexed them unchecked (KeyError, TypeError, AttributeError) ---

@pytest.mark.parametrize("change, entry", [
    (lambda m: onnx(m)["inputs"].__setitem__(4, {}), r"backends.onnx.inputs\[4\].name"),
    (lambda m: onnx(m)["inputs"].__setitem__(0, float("nan")), r"backends.onnx.inputs\[0\]"),
    (lambda m: m["backends"]["onnx"].update({"inputs": 1}), "backends.onnx.inputs"),
    (lambda m: onnx(m)["outputs"].__setitem__(3, "."), r"backends.onnx.outputs\[3\]"),
    (lambda m: logits(m).update({"shape": 10**30}), r"backends.onnx.outputs\[4\].shape"),
    (lambda m: onnx(m).pop("kv_cache"), "backends.onnx.kv_cache"),
    (lambda m: onnx(m)["kv_cache"].update({"head_dim": "../../../etc/passwd"}), "backends.onnx.kv_cache.head_dim"),
    (lambda m: onnx(m).update({"data": float("nan")}), "backends.onnx.data"),
    (lambda m: m["backends"].update({"onnx": 2**63}), "backends.onnx"),
    (lambda m: m["tokenizer"].update({"bos_token_id": [False]}), "tokenizer.bos_token_id"),
    (lambda m: m["tokenizer"].update({"eos_token_ids": 2**63}), "tokenizer.eos_token_ids"),
    (lambda m: m["tokenizer"].update({"chat_template": 0.5}), "tokenizer.chat_template"),
    (lambda m: m.update({"generation": -1e308}), "generation"),
    (lambda m: m["generation"].update({"min_p": ["a"]}), "generation.min_p"),
    (lambda m: m["generation"].update({"top_p": "C:\\x"}), "generation.top_p"),
    (lambda m: m["files"]["model.onnx"].update({"sha256": None}), "files.model.onnx.sha256"),
], ids=["input-without-name", "input-not-object", "inputs-not-list", "output-not-object", "shape-not-list",
        "no-kv-cache", "kv-size-text", "data-not-name", "backend-not-object", "bos-list", "eos-not-list",
        "template-number", "generation-number", "min-p-list", "top-p-text", "sha256-null"])
def test_a_manifest_entry_of_the_wrong_type_is_a_bundle_error_naming_it(tiny_bundle, copy_bundle, change, entry):
    bundle = copy_bundle(tiny_bundle)
    edit_manifest(bundle, change)
    with pytest.raises(BundleError, match=f"manifest entry {entry} should be .*re-convert the model"):
        ondevice.load(bundle, verify=False)


@pytest.mark.parametrize("key, value", [("top_p", -1e308), ("top_p", 0), ("repetition_penalty", False),
                                        ("temperature", -1), ("min_p", 1.0), ("top_k", 0.5), ("max_tokens", 0)])
def test_generation_defaults_outside_what_the_sampler_accepts_are_refused_when_loading(tiny_bundle, copy_bundle,
                                                                                       key, value):
    bundle = copy_bundle(tiny_bundle)  # they used to fail only in generate(), with a ValueError
    edit_manifest(bundle, lambda m: m["generation"].update({key: value}))
    with pytest.raises(BundleError, match=f"generation.{key} should be"):
        read_bundle(bundle, verify=False)


def test_a_token_id_past_the_vocabulary_is_refused_by_read_bundle_and_load_tokenizer(tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)  # 2**63 overflowed inside tokenizers when the chat template was rendered
    edit_manifest(bundle, lambda m: m["tokenizer"].update({"bos_token_id": 2**63}))
    with pytest.raises(BundleError, match=r"tokenizer.bos_token_id should be a token id in 0..319"):
        read_bundle(bundle, verify=False)
    with pytest.raises(BundleError, match="tokenizer.bos_token_id should be a token id"):
        load_tokenizer(bundle)


# --- sizes the cache is allocated from ------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("head_dim", 2**31), ("num_kv_heads", 2**63), ("layers", -1),
                                        ("layers", 0)])
def test_kv_cache_sizes_out_of_range_are_refused_before_allocating(tiny_bundle, copy_bundle, key, value):
    bundle = copy_bundle(tiny_bundle)  # a 4 TiB cache (MemoryError), or ORT failing at the first step
    edit_manifest(bundle, lambda m: onnx(m)["kv_cache"].update({key: value}))
    with pytest.raises(BundleError, match=f"backends.onnx.kv_cache.{key} should be an integer in 1..2147483647"):
        ondevice.load(bundle, verify=False)


def test_kv_cache_sizes_that_disagree_with_the_config_are_refused(tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)
    edit_manifest(bundle, lambda m: onnx(m)["kv_cache"].update({"layers": 1}))
    with pytest.raises(BundleError, match=r"kv_cache.layers should be config.num_layers \(2\)"):
        ondevice.load(bundle, verify=False)


@pytest.mark.parametrize("change, problem", [
    (lambda m: (onnx(m)["kv_cache"].update({"layers": 1}), m["config"].update({"num_layers": 1})),
     "the graph has 2 cache layers, the manifest says 1"),
    (lambda m: (onnx(m)["kv_cache"].update({"head_dim": 8}), m["config"].update({"head_dim": 8})),
     r"are not \[1, 2, capacity, 8\]"),
    (lambda m: (logits(m).update({"shape": [1, "L", 300]})), "logits .* are not 300 wide"),
], ids=["layers", "head-dim", "logits-width"])
def test_a_manifest_that_disagrees_with_its_graph_is_refused_before_the_first_step(tiny_bundle, copy_bundle,
                                                                                   change, problem):
    bundle = copy_bundle(tiny_bundle)  # consistent in itself, but ORT failed inside run_with_iobinding
    edit_manifest(bundle, change)
    with pytest.raises(BundleError, match=f"does not match its ONNX graph .*{problem}"):
        ondevice.load(bundle, verify=False)


def test_a_logits_width_beyond_the_vocabulary_is_refused(tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)
    edit_manifest(bundle, lambda m: logits(m).update({"shape": [1, "L", 2**31 - 1]}))
    with pytest.raises(BundleError, match=r"shape\[-1\] should be a width in 1..320"):
        read_bundle(bundle, verify=False)


# --- the manifest file itself ----------------------------------------------------------------------

def test_a_manifest_nested_deeper_than_the_json_parser_recurses_is_a_bundle_error(tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)  # json.loads raised RecursionError, which is not a ValueError
    (bundle / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="corrupt manifest.*RecursionError"):
        read_bundle(bundle)
    with pytest.raises(BundleError, match="corrupt manifest.*RecursionError"):
        load_tokenizer(bundle)


def test_a_manifest_larger_than_any_manifest_is_refused_before_parsing(tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)
    (bundle / MANIFEST).write_bytes(b"[" + b"1," * (MAX_MANIFEST_BYTES // 2) + b"1]")
    with pytest.raises(BundleError, match="is not a manifest"):
        read_bundle(bundle)


def test_a_damaged_graph_that_onnx_runtime_still_loads_is_a_bundle_error(tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)  # a dimension name that is not UTF-8: reading the signature raised
    graph = bundle / "model.onnx"
    graph.write_bytes(graph.read_bytes().replace(b"\x08capacity", b"\x08capa\x8bity"))
    with pytest.raises(BundleError, match="ONNX graph is corrupt .*not UTF-8"):
        ondevice.load(bundle, verify=False)


@pytest.mark.parametrize("entry", ["graph", "data"])
def test_a_file_name_with_a_nul_byte_is_an_invalid_path_not_a_crash_of_path_resolution(tiny_bundle, copy_bundle,
                                                                                         entry):
    bundle = copy_bundle(tiny_bundle)
    edit_manifest(bundle, lambda m: onnx(m).update({entry: "model\x00.onnx"}))
    with pytest.raises(BundleError, match="invalid path"):
        ondevice.load(bundle, verify=False)
