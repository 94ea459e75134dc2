"""Flash-resident FFN weights (ondevice/flash.py): direct-I/O reads return the file's bytes, the window
behaves like a plain set of recently active neurons with dense swap-deleted slots, the DRAM budget
is never exceeded, and bad stores or budgets give clear errors."""

import json
import os

import numpy as np
import pytest

from ondevice.bundle import read_bundle
from ondevice.converters.convert import convert
from ondevice.converters.flash import FLASH_FILE, decode_records
from ondevice.errors import BudgetTooSmallError, BundleError, FlashStoreError
from ondevice.flash import FlashReader, FlashWeights, NeuronWindow, capacity_for_budget, record_dtype


@pytest.fixture(scope="module")
def entry(flash_bundle):
    return json.loads((flash_bundle / "manifest.json").read_text())["flash"]


def plain_records(bundle, entry, layer, ids) -> np.ndarray:
    """Records read the simple way: the whole file through the page cache, sliced."""
    raw = np.fromfile(bundle / FLASH_FILE, np.uint8)
    start, size = entry["layers"][layer]["records_offset"], entry["record_size"]
    return np.stack([raw[start + i * size:start + (i + 1) * size] for i in ids])


# --- reader ------------------------------------------------------------------------------------------

def o_direct_works(path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("inflight,max_read,max_gap", [(1, 8192, 0), (4, 8192, 4096), (16, 65536, 1 << 20)])
def test_direct_coalesced_reads_return_the_same_bytes_as_plain_reads(flash_bundle, entry, inflight, max_read,
                                                                     max_gap, direct):
    if direct and not o_direct_works(flash_bundle / FLASH_FILE):
        pytest.skip("this file system has no O_DIRECT (e.g. tmpfs)")
    rng = np.random.default_rng(inflight)
    with FlashReader(flash_bundle / FLASH_FILE, entry, inflight=inflight, max_read=max_read, max_gap=max_gap,
                     direct=direct) as r:
        assert r.direct == direct
        for layer in range(entry["num_layers"]):
            for n in (1, 7, 40, 128):
                ids = rng.choice(entry["intermediate_size"], n, replace=False)
                got = r.read(layer, ids).view(np.uint8).reshape(n, -1)
                np.testing.assert_array_equal(got, plain_records(flash_bundle, entry, layer, ids))


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("first,count", [(0, 128), (3, 5), (31, 2), (100, 28), (0, 2)])
def test_consecutive_records_are_read_straight_into_place_with_the_same_bytes(flash_bundle, entry, first, count,
                                                                              direct):
    if direct and not o_direct_works(flash_bundle / FLASH_FILE):
        pytest.skip("this file system has no O_DIRECT (e.g. tmpfs)")
    with FlashReader(flash_bundle / FLASH_FILE, entry, inflight=3, max_read=8192, direct=direct) as r:
        for layer in range(entry["num_layers"]):
            ids = np.arange(first, first + count)
            got = r.read(layer, ids)
            assert got.ctypes.data % 4096 == (first * entry["record_size"]) % 4096  # in the aligned read buffer
            np.testing.assert_array_equal(got.view(np.uint8).reshape(count, -1),
                                          plain_records(flash_bundle, entry, layer, ids))


def test_neighbouring_records_coalesce_into_fewer_reads(flash_bundle, entry):
    ids = np.arange(entry["intermediate_size"])  # 128 records of 128 bytes: 4 pages
    with FlashReader(flash_bundle / FLASH_FILE, entry, max_gap=0) as r:
        r.read(0, ids)
        assert r.stats.reads == 1 and r.stats.bytes_read == 4 * 4096
        r.read(0, [0, 127])  # far apart, gap above max_gap=0: two reads of a page each
        assert r.stats.reads == 3 and r.stats.bytes_read == 6 * 4096
    with FlashReader(flash_bundle / FLASH_FILE, entry, max_gap=1 << 20) as r:
        r.read(0, [0, 127])  # the gap is read along: one read
        assert r.stats.reads == 1
    with FlashReader(flash_bundle / FLASH_FILE, entry, max_gap=1 << 20, max_read=8192) as r:
        runs = r.plan(0, np.arange(entry["intermediate_size"])[::-1])
        assert [length for _, length, _, _ in runs] == [8192, 8192]  # split at max_read, page-aligned
        assert sorted(np.concatenate([run[2] for run in runs]).tolist()) == list(range(128))


def test_a_prefetch_future_gives_what_a_read_gives_and_counters_split_per_token(flash_bundle, entry):
    with FlashReader(flash_bundle / FLASH_FILE, entry) as r:
        fut = r.submit(1, [9, 3, 77])
        sync = r.read(1, [9, 3, 77])
        assert fut.result().tobytes() == sync.tobytes()
        first = r.stats.end_token()
        r.read(0, [1])
        second = r.stats.end_token()
    assert first["records"] == 6 and first["reads"] >= 2 and second == {"bytes_read": 4096, "reads": 1, "records": 1}


def test_a_truncated_store_is_refused_at_open(flash_bundle, entry, copy_bundle):
    damaged = copy_bundle(flash_bundle)
    with open(damaged / FLASH_FILE, "r+b") as f:
        f.truncate(entry["file_bytes"] - 4096)
    with pytest.raises(FlashStoreError, match="truncated or modified"):
        FlashReader(damaged / FLASH_FILE, entry)
    with pytest.raises(BundleError, match="truncated or modified"):  # and by the bundle's size check
        read_bundle(damaged)


def test_a_store_shrunk_after_open_gives_a_short_read_error(flash_bundle, entry, copy_bundle):
    damaged = copy_bundle(flash_bundle)
    with FlashReader(damaged / FLASH_FILE, entry) as r:
        with open(damaged / FLASH_FILE, "r+b") as f:
            f.truncate(entry["layers"][1]["records_offset"])
        with pytest.raises(FlashStoreError, match="short read"):
            r.read(1, [5])


def test_a_corrupt_store_fails_load_verification(flash_bundle, copy_bundle):
    damaged = copy_bundle(flash_bundle)
    with open(damaged / FLASH_FILE, "r+b") as f:
        f.seek(5000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="checksum mismatch for ffn_flash.bin"):
        read_bundle(damaged)


def test_a_bundle_without_a_store_is_a_clear_error(tiny_bundle):
    with pytest.raises(FlashStoreError, match="--flash"):
        FlashWeights(read_bundle(tiny_bundle, verify=False), 10**9)


# --- window ------------------------------------------------------------------------------------------

class ReferenceWindow:
    """The window as a plain dict neuron -> last active token, without slots."""

    def __init__(self, capacity, k):
        self.capacity, self.k, self.last = capacity, k, {}

    def step(self, ids, token):
        for n in ids:
            if n in self.last:
                self.last[n] = token
        self.last = {n: t for n, t in self.last.items() if t > token - self.k}
        missing = sorted(set(ids) - set(self.last))
        return missing


def tiny_dtype(width=3):
    return np.dtype([("a", "<f4", (width,)), ("b", "u1", (2,))])


def records_for(ids, dtype):
    rec = np.zeros(len(ids), dtype)
    rec["a"] = np.asarray(ids, np.float32)[:, None] * np.array([1, 10, 100], np.float32)
    rec["b"] = (np.asarray(ids)[:, None] % 256).astype(np.uint8)
    return rec


def check_dense(w: NeuronWindow):
    used = w.used
    assert (w.neuron_of[:used] >= 0).all() and (w.neuron_of[used:] == -1).all()
    assert len(set(w.neuron_of[:used].tolist())) == used
    assert (w.slot_of[w.neuron_of[:used]] == np.arange(used)).all()
    assert (w.slot_of >= 0).sum() == used
    # Each slot holds its neuron's data.
    np.testing.assert_array_equal(w.fields["a"][:used], records_for(w.neuron_of[:used], tiny_dtype())["a"])


@pytest.mark.parametrize("seed", range(6))
def test_window_matches_a_reference_set_of_recently_active_neurons(seed):
    rng = np.random.default_rng(seed)
    n, k = 60, int(rng.integers(1, 6))
    w = NeuronWindow(tiny_dtype(), capacity=n, n_neurons=n, window_tokens=k)
    ref = ReferenceWindow(n, k)
    buffers = {name: a.ctypes.data for name, a in w.fields.items()}
    for token in range(80):
        ids = rng.choice(n, int(rng.integers(0, 15)), replace=False)
        missing = w.missing(ids)
        assert missing.tolist() == ref.step(ids.tolist(), token)
        slots = w.update(ids, token, records_for(missing, tiny_dtype()), missing)
        for m in missing:
            ref.last[m] = token
        for i in ids:
            ref.last[i] = token
        assert set(w.neuron_of[:w.used].tolist()) == set(ref.last)
        assert (w.neuron_of[slots] == ids).all()
        check_dense(w)
    assert {name: a.ctypes.data for name, a in w.fields.items()} == buffers  # never reallocated


def test_a_new_token_loads_only_the_missing_neurons_and_counts_hits():
    w = NeuronWindow(tiny_dtype(), capacity=10, n_neurons=20, window_tokens=2)
    w.update([1, 2, 3], 0, records_for([1, 2, 3], tiny_dtype()))
    assert w.missing([2, 3, 4]).tolist() == [4]
    w.update([2, 3, 4], 1, records_for([4], tiny_dtype()))
    assert (w.hits, w.misses) == (2, 4)


def test_eviction_moves_the_last_slot_into_the_freed_one():
    w = NeuronWindow(tiny_dtype(), capacity=8, n_neurons=10, window_tokens=1)
    w.update([4, 5, 6], 0, records_for([4, 5, 6], tiny_dtype()))
    assert w.neuron_of[:3].tolist() == [4, 5, 6]
    w.update([5, 6], 1, records_for([], tiny_dtype()), np.array([], np.int64))  # 4 leaves the window
    assert w.neuron_of[:2].tolist() == [6, 5] and w.used == 2  # 6 moved from slot 2 into slot 0
    check_dense(w)


@pytest.mark.parametrize("seed", range(4))
def test_under_pressure_the_least_recently_active_neurons_go_and_the_needed_ones_stay(seed):
    rng = np.random.default_rng(seed)
    n, cap = 50, 12
    w = NeuronWindow(tiny_dtype(), capacity=cap, n_neurons=n, window_tokens=5)
    for token in range(60):
        ids = rng.choice(n, int(rng.integers(1, cap + 1)), replace=False)
        before = {int(x): int(t) for x, t in zip(w.neuron_of[:w.used], w.last_active[:w.used])}
        missing = w.missing(ids)
        w.update(ids, token, records_for(missing, tiny_dtype()), missing)
        after = set(w.neuron_of[:w.used].tolist())
        assert set(ids.tolist()) <= after and w.used <= cap
        evicted = {x: t for x, t in before.items() if x not in after and t > token - 5}
        kept = [t for x, t in before.items() if x in after and x not in set(ids.tolist())]
        if evicted and kept:
            assert max(evicted.values()) <= min(kept)  # LRU among the neurons not needed now
        check_dense(w)


def test_a_token_needing_more_neurons_than_the_window_holds_is_a_clear_error():
    w = NeuronWindow(tiny_dtype(), capacity=4, n_neurons=10)
    with pytest.raises(BudgetTooSmallError, match="raise the DRAM budget"):
        w.update(np.arange(5), 0, records_for(np.arange(5), tiny_dtype()))


# --- budget ------------------------------------------------------------------------------------------

def test_a_budget_below_the_resident_part_is_a_clear_error(flash_bundle, entry):
    bundle = read_bundle(flash_bundle)
    with pytest.raises(BudgetTooSmallError, match="below what must stay resident"):
        FlashWeights(bundle, entry["resident_bytes"] - 1)
    with pytest.raises(BudgetTooSmallError, match="give at least"):
        capacity_for_budget(entry, entry["resident_bytes"] + 1000, staging_bytes=1 << 20)


@pytest.mark.parametrize("seed", range(5))
def test_the_budget_is_never_exceeded_over_random_token_sequences(flash_bundle, entry, seed):
    rng = np.random.default_rng(seed)
    bundle = read_bundle(flash_bundle, verify=False)
    n_ff, layers = entry["intermediate_size"], entry["num_layers"]
    staging = 2 * 4 * 256 * 1024
    floor = entry["resident_bytes"] + staging
    per_neuron = layers * entry["record_payload"] + 2 * entry["record_size"]
    budget = floor + int(rng.integers(1, n_ff + 20)) * per_neuron + int(rng.integers(0, per_neuron))
    with FlashWeights(bundle, budget, window_tokens=int(rng.integers(1, 6))) as fw:
        assert 1 <= fw.capacity <= n_ff and fw.dram_bytes() <= budget
        decoded_ok = True
        for _ in range(25):
            active = [rng.choice(n_ff, int(rng.integers(0, fw.capacity + 1)), replace=False) for _ in range(layers)]
            fut = fw.prefetch(0, active[0])
            for layer, ids in enumerate(active):
                view = fw.load(layer, ids, fut)
                fut = fw.prefetch(layer + 1, active[layer + 1]) if layer + 1 < layers else None
                assert view.used <= fw.capacity and fw.dram_bytes() <= budget
                # The slots hold the neurons' weights.
                rec = np.zeros(len(ids), fw.reader.dtype)
                for name in rec.dtype.names:
                    rec[name] = view.fields[name][view.active_slots]
                gate, _, down = decode_records(rec, ids, view.tables, entry["encoding"])
                want = decode_records(fw.reader.read(layer, ids), ids, view.tables, entry["encoding"])
                decoded_ok &= np.array_equal(gate, want[0]) and np.array_equal(down, want[2])
            fw.end_token()
        assert decoded_ok
        c = fw.counters()
        assert c["tokens"] == 25 and 0.0 <= c["window_hit_rate"] <= 1.0 and c["dram_bytes"] <= c["budget_bytes"]
        assert c["bytes_read_per_token"] >= 0 and c["slots_per_layer"] == fw.capacity


def test_more_budget_gives_more_slots_up_to_the_whole_ffn(flash_bundle, entry):
    caps = [capacity_for_budget(entry, entry["resident_bytes"] + (1 << 21) + extra, 1 << 21)
            for extra in (10_000, 50_000, 100_000, 10**9)]
    assert caps == sorted(caps) and caps[-1] == entry["intermediate_size"] and caps[0] < caps[-1]


def test_record_dtype_from_the_manifest_matches_the_converter(entry):
    from ondevice.converters.flash import record_dtype as converter_dtype

    assert record_dtype(entry) == converter_dtype(entry["encoding"], entry["hidden_size"])


# --- interfaces --------------------------------------------------------------------------------------

def test_convert_flash_on_the_command_line_and_inspect_shows_resident_and_flash_sizes(tiny_gguf, tmp_path, capsys):
    from ondevice.cli import main

    out = tmp_path / "cli.bundle"
    assert main(["convert", str(tiny_gguf), str(out), "--flash", "fp16", "--quiet"]) == 0
    assert json.loads((out / "manifest.json").read_text())["flash"]["encoding"] == "fp16"
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "flash store   ffn_flash.bin: fp16" in text and "resident" in text and "in flash" in text


def test_convert_refuses_an_unknown_flash_encoding(tiny_gguf, tmp_path):
    with pytest.raises(ValueError, match="flash must be"):
        convert(tiny_gguf, tmp_path / "x.bundle", progress=False, flash="q8")
