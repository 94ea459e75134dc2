"""The Core ML target. coremltools converts on Linux but predicts only on Apple platforms, so here:
the exact torch module handed to coremltools computes transformers' logits (and the ONNX path's),
and the converted program has the promised interface (inputs, enumerated token shapes, fp16 KV
states), 4-bit weights (by size and by op) and in-place state updates (by op inventory)."""

import collections
import json

import numpy as np
import pytest
import torch
from models import canonical_weights, reference_logits, reference_model_from_gguf, write_tiny_llama_hf

import ondevice
from ondevice.bundle import read_bundle
from ondevice.cli import main
from ondevice.converters.coreml_weights import package_weights
from ondevice.converters.export_coreml import StatefulDecoder, load_weights, save_weights
from ondevice.errors import BundleError, OndeviceError

PROMPT = [1, 40, 72, 100, 105, 32, 119, 111, 114, 108, 100, 33, 200, 7]
NEEDS_COREMLTOOLS = "needs coremltools: pip install 'ondevice[coreml]'"


def canonical_weights_of(folder):
    """A Hugging Face folder's weights under the converter's canonical names, and its config."""
    from ondevice.converters.arch import get_architecture
    from ondevice.converters.sources import read_source

    ckpt = read_source(folder)
    arch = get_architecture(ckpt.architecture)
    cfg = arch.config_from_hf(ckpt.metadata, ckpt.weights)
    return arch.canonical_from_hf(ckpt.weights, cfg), cfg


def step(module: StatefulDecoder, ids: list[int], position: int) -> np.ndarray:
    """One prediction as Core ML makes it: tokens, first position, row of the logits."""
    with torch.no_grad():
        return module(torch.tensor([ids], dtype=torch.int32), torch.tensor([position], dtype=torch.int32),
                      torch.tensor([len(ids) - 1], dtype=torch.int32))[0].numpy()


def test_the_module_handed_to_coremltools_computes_transformers_logits_prefill_then_decode(tiny_gguf):
    weights, cfg = canonical_weights(tiny_gguf)
    module = StatefulDecoder(cfg, weights, cache_len=32).eval()
    reference = reference_logits(reference_model_from_gguf(tiny_gguf), PROMPT)
    np.testing.assert_allclose(step(module, PROMPT[:10], 0), reference[9], atol=1e-4)
    for pos in range(10, len(PROMPT)):
        np.testing.assert_allclose(step(module, [PROMPT[pos]], pos), reference[pos], atol=1e-4)


def test_the_module_writes_each_tokens_keys_at_its_slot_and_nothing_after(tiny_gguf):
    weights, cfg = canonical_weights(tiny_gguf)
    module = StatefulDecoder(cfg, weights, cache_len=32).eval()
    step(module, PROMPT[:10], 0)
    step(module, [PROMPT[10]], 10)
    written = module.k_cache.abs().sum(dim=(0, 1, 3))
    assert bool((written[:11] > 0).all()) and bool((written[11:] == 0).all())


def test_the_module_computes_the_onnx_paths_logits(tiny_gguf, tiny_bundle):
    weights, cfg = canonical_weights(tiny_gguf)
    module = StatefulDecoder(cfg, weights, cache_len=64).eval()
    onnx = ondevice.load(tiny_bundle, threads=1)
    np.testing.assert_allclose(step(module, PROMPT, 0), onnx.backend.forward(PROMPT, 0)[-1], atol=1e-3)


def test_weights_go_to_the_export_process_and_back_unchanged(tiny_gguf, tmp_path):
    weights, _ = canonical_weights(tiny_gguf)
    save_weights(weights, tmp_path / "w.npz")
    back = load_weights(tmp_path / "w.npz")
    assert list(back) == list(weights)
    for name, w in weights.items():
        np.testing.assert_array_equal(np.asarray(back[name].dequantize() if hasattr(w, "blocks") else back[name]),
                                      w.dequantize() if hasattr(w, "blocks") else w)


def _program(bundle):
    ct = pytest.importorskip("coremltools", reason=NEEDS_COREMLTOOLS)
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = ct.utils.load_spec(str(bundle / manifest["backends"]["coreml"]["graph"]))
    main_fn = spec.mlProgram.functions["main"]
    return manifest, spec, main_fn.block_specializations[main_fn.opset].operations


def test_the_program_takes_enumerated_token_chunks_and_keeps_the_kv_cache_in_fp16_states(coreml_bundle):
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    manifest, spec, _ = _program(coreml_bundle)
    cfg, entry = manifest["config"], manifest["backends"]["coreml"]
    assert spec.specificationVersion >= 9  # iOS 18 / macOS 15: the first with states
    inputs = {i.name: i.type.multiArrayType for i in spec.description.input}
    assert set(inputs) == {"tokens", "position", "last"}
    assert all(t.dataType == ArrayFeatureType.INT32 for t in inputs.values())
    assert sorted(tuple(s.shape) for s in inputs["tokens"].enumeratedShapes.shapes) == [(1, 1), (1, 64)]
    assert list(inputs["position"].shape) == [1] and list(inputs["last"].shape) == [1]
    slots = min(1024, manifest["max_context"])
    states = {s.name: s.type.stateType.arrayType for s in spec.description.state}
    assert set(states) == {"k_cache", "v_cache"}
    for state in states.values():
        assert state.dataType == ArrayFeatureType.FLOAT16
        assert list(state.shape) == [cfg["num_layers"], cfg["num_kv_heads"], slots, cfg["head_dim"]]
    assert [o.name for o in spec.description.output] == ["logits"]
    assert entry["chunks"] == [1, 64] and entry["kv_cache"]["slots"] == slots


def test_every_linear_weight_is_a_4_bit_constexpr_and_the_cache_is_updated_in_place(coreml_bundle):
    manifest, _, ops = _program(coreml_bundle)
    layers = manifest["config"]["num_layers"]
    count = collections.Counter(op.type for op in ops)
    quantized = {o.name for op in ops if op.type == "constexpr_blockwise_shift_scale" for o in op.outputs}
    linears = [op for op in ops if op.type == "linear"]
    assert len(linears) == 4 * layers + 1  # qkv, o, gate_up, down per layer; the head
    assert all(op.inputs["weight"].arguments[0].name in quantized for op in linears)
    # each layer writes its new keys and values into the states: a slice update, never a full copy
    assert count["slice_update"] == count["write_state"] == 2 * layers
    read = {o.name for op in ops if op.type == "read_state" for o in op.outputs}
    readers = {op.type for op in ops for i in op.inputs.values() for a in i.arguments if a.name in read}
    assert readers == {"slice_by_index", "slice_update"}  # the layer's slice is read; no op takes the whole cache


def _sizes(manifest: dict) -> tuple[int, int]:
    """(linear weight parameters, embedding parameters) of a bundle's model."""
    c = manifest["config"]
    d, q, kv = c["hidden_size"], c["num_heads"] * c["head_dim"], c["num_kv_heads"] * c["head_dim"]
    return c["num_layers"] * (d * (q + 2 * kv) + q * d + 3 * d * c["intermediate_size"]), c["vocab_size"] * d


def test_a_gguf_sources_blocks_are_repacked_not_requantized(coreml_bundle, tiny_gguf):
    """The tiny GGUF's Q4_1 matmuls and Q8_0 embedding become Core ML shift/scale blocks holding the
    same codes: the program's weights are the source's up to fp16 rounding, 4 bits (+ fp16 scale and
    offset per 32) per linear weight, 8 (+ scale) per embedding value."""
    weights, cfg = canonical_weights(tiny_gguf)
    module = StatefulDecoder(cfg, weights, cache_len=64)
    exported = package_weights(coreml_bundle / "model.mlpackage", module)
    assert set(exported) == {name for name, _ in module.named_parameters()}
    for name, w in module.named_parameters():
        assert float((exported[name] - w).abs().max()) <= float(w.abs().max()) * 2**-9, name
    manifest = json.loads((coreml_bundle / "manifest.json").read_text())
    precision = manifest["backends"]["coreml"]["precision"]
    assert len(precision["repacked"]) == 4 * cfg.num_layers + 1 and "Q4_1 repacked" in precision["weights"]
    linear, embedding = _sizes(manifest)
    expected = linear * (0.5 + 4 / 32) + embedding * (1 + 2 / 32)
    weight_bytes = sum(f["bytes"] for n, f in manifest["files"].items() if n.endswith("weight.bin"))
    assert expected * 0.98 < weight_bytes < expected * 1.15  # + norms in fp16, 64-byte aligned blobs


def test_float_sources_get_symmetric_int4_blocks_of_32(tmp_path):
    pytest.importorskip("coremltools", reason=NEEDS_COREMLTOOLS)
    folder = write_tiny_llama_hf(tmp_path / "hf", tie_embeddings=True)
    bundle = ondevice.convert(folder, tmp_path / "hf.bundle", target="onnx,coreml", progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    precision = manifest["backends"]["coreml"]["precision"]
    assert "repacked" not in precision and "int4 blocks of 32" in precision["weights"]
    weights, cfg = canonical_weights_of(folder)
    module = StatefulDecoder(cfg, weights, cache_len=64)
    exported = package_weights(bundle / "model.mlpackage", module)
    for name, w in module.named_parameters():
        error, top = float((exported[name] - w).abs().max()), float(w.abs().max())
        if name.endswith("norm.weight"):  # small vectors stay fp16
            assert error <= top * 2**-10
        else:  # symmetric int4: a step of at most max|w| / 7 per block, so at most half of that off
            assert top * 2**-9 < error <= top / 14 * 1.01, name
    linear, embedding = _sizes(manifest)
    weight_bytes = sum(f["bytes"] for n, f in manifest["files"].items() if n.endswith("weight.bin"))
    assert weight_bytes < (linear + embedding) * (0.5 + 2 / 32) * 1.25  # fp16 would be 3.6x


def test_every_file_inside_the_package_is_checksummed(coreml_bundle, copy_bundle):
    manifest = json.loads((coreml_bundle / "manifest.json").read_text())
    package = [name for name in manifest["files"] if name.startswith("model.mlpackage/")]
    assert {"model.mlpackage/Manifest.json", "model.mlpackage/Data/com.apple.CoreML/model.mlmodel",
            "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"} <= set(package)
    read_bundle(coreml_bundle)
    damaged = copy_bundle(coreml_bundle)
    weights = damaged / "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for model.mlpackage/Data"):
        read_bundle(damaged)
    (damaged / "model.mlpackage/Manifest.json").unlink()
    with pytest.raises(BundleError, match="missing file model.mlpackage/Manifest.json"):
        read_bundle(damaged, verify=False)


def test_inspect_describes_the_core_ml_model(coreml_bundle, capsys):
    main(["inspect", str(coreml_bundle)])
    out = capsys.readouterr().out
    assert "coreml        model.mlpackage: the source's blocks (Q4_1 repacked, Q8_0 repacked)" in out
    assert "iOS 18 / macOS 15" in out


def test_next_to_tflite_the_core_ml_export_runs_in_a_child_process_with_the_same_result(tiny_gguf, coreml_bundle,
                                                                                       tmp_path):
    pytest.importorskip("litert_torch", reason="needs litert-torch: pip install 'ondevice[tflite]'")
    both = ondevice.convert(tiny_gguf, tmp_path / "all.bundle", target="onnx,coreml,tflite", progress=False)
    manifest, alone = (json.loads((b / "manifest.json").read_text()) for b in (both, coreml_bundle))
    assert set(manifest["backends"]) == {"onnx", "coreml", "tflite"}
    package = {n: f["sha256"] for n, f in manifest["files"].items() if n.startswith("model.mlpackage/")}
    assert package["model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"] == \
        alone["files"]["model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"]["sha256"]
    read_bundle(both)


def test_a_missing_coremltools_is_a_clear_error_before_any_work(tiny_gguf, tmp_path, hide_module):
    hide_module("coremltools")
    with pytest.raises(OndeviceError, match="pip install 'ondevice\\[coreml\\]'"):
        ondevice.convert(tiny_gguf, tmp_path / "b", target="onnx,coreml", progress=False)
    assert not (tmp_path / "b").exists()
