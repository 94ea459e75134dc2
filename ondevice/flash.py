"""Flash-resident FFN weights: read neuron records from the bundle's flash store, keep a window in DRAM.

The store (`ffn_flash.bin`, written by converters/flash.py, described by the manifest's "flash"
entry) holds one fixed-size record per FFN neuron: its gate row, up row and down column.

- `FlashReader` reads records with direct I/O (O_DIRECT: the page cache is bypassed, so every byte
  asked for comes from storage), into page-aligned buffers (anonymous mmaps), several reads in flight
  on a thread pool (os.preadv releases the GIL), neighbouring records coalesced into one read.
  `submit(layer, ids)` returns a future: prefetch layer l+1 while layer l computes.
- `NeuronWindow` is one layer's preallocated slot buffer: slots [0, n) hold the neurons active in the
  last k tokens, field by field in the record's format (structure of arrays, e.g. gate codes
  [slots, blocks, 16]) or decoded to rows for computing; a token loads only its missing neurons;
  a neuron leaving the window is replaced in place by a new one, or by the last slot (swap-delete),
  so slots stay dense and nothing is reallocated.
- `FlashWeights` ties them to a DRAM budget: the budget covers the resident weights (everything
  outside the store, from the manifest), the reader's staging buffers, in-flight records and the
  windows; what is left is split evenly across layers. A budget below the fixed part raises
  BudgetTooSmallError.

Decode-time use (one token):

    fw = FlashWeights(bundle, budget_bytes=70_000_000, window_tokens=5)
    fut = fw.prefetch(0, active_ids_layer0)
    for l in range(L):
        view = fw.load(l, active_ids[l], fut)     # waits for the reads, fills missing slots
        if l + 1 < L: fut = fw.prefetch(l + 1, active_ids[l + 1])
        ... FFN over view.fields[...][view.active_slots] (or all slots [0:view.used]) ...
    fw.end_token()
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ondevice.errors import BudgetTooSmallError, FlashStoreError

PAGE = 4096


def record_dtype(entry: dict) -> np.dtype:
    """The structured dtype of one record, from the manifest entry (padding included)."""
    fields = entry["record_fields"]
    return np.dtype({"names": [f[0] for f in fields], "formats": [(f[1], tuple(f[2])) for f in fields],
                     "itemsize": entry["record_size"]})


@dataclass
class IOStats:
    """Counters since the reader opened, and per token (`end_token` closes a token)."""

    bytes_read: int = 0
    reads: int = 0
    records: int = 0
    per_token: list[dict] = field(default_factory=list)
    _mark: tuple[int, int, int] = (0, 0, 0)

    def start_token(self) -> None:
        """Count from here (e.g. after the tables were read at open)."""
        self._mark = (self.bytes_read, self.reads, self.records)

    def end_token(self) -> dict:
        b, r, n = self._mark
        tok = {"bytes_read": self.bytes_read - b, "reads": self.reads - r, "records": self.records - n}
        self.per_token.append(tok)
        self._mark = (self.bytes_read, self.reads, self.records)
        return tok


class FlashReader:
    """Direct-I/O reads of neuron records from a flash store.

    inflight: reads in flight (threads, each with its own aligned staging buffer of max_read bytes).
    max_gap: records this many bytes apart or less are read in one go, the gap read along. Default
    32 KiB: here a read costs ~36 us of issuing (~28k reads/s with 16 in flight, through Python) and
    storage streams ~0.9 GB/s, so a gap under ~32 KB is cheaper to read than to skip
    (benchmarks/flash_io.py: 10% of the neurons at random, 105 ms/token with 8 KiB gaps, 45 ms with
    32 KiB). direct=None (default) uses O_DIRECT where the file system supports it and reads
    through the page cache where it does not (tmpfs); `self.direct` says which. direct=True insists
    (an OSError otherwise), direct=False reads through the page cache (for comparison).
    """

    def __init__(self, path: str | os.PathLike, entry: dict, *, inflight: int = 4, max_read: int = 256 * 1024,
                 max_gap: int = 32768, direct: bool | None = None, use_mmap: bool = False):
        self.path, self.entry = os.fspath(path), entry
        self.dtype = record_dtype(entry)
        self.rec = self.dtype.itemsize
        if max_read % PAGE or max_read < PAGE + self.rec:
            raise ValueError(f"max_read must be a multiple of {PAGE} of at least one record plus a page")
        self.max_read, self.max_gap, self.inflight = max_read, max_gap, inflight
        expected = int(entry["file_bytes"])
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            raise FlashStoreError(f"{self.path}: flash store missing; re-convert with --flash") from None
        if size != expected:
            raise FlashStoreError(f"{self.path}: flash store has {size} bytes, the manifest says {expected}: "
                                  "truncated or modified; re-convert the model with --flash")
        self.direct = direct is not False
        try:
            self.fd = os.open(self.path, os.O_RDONLY | (os.O_DIRECT if self.direct else 0))
        except OSError:
            if direct:
                raise
            self.direct, self.fd = False, os.open(self.path, os.O_RDONLY)
        n_ff = int(entry["intermediate_size"])
        self.positions = []  # per layer: neuron id -> position in the file
        for layer in entry["layers"]:
            order = np.arange(n_ff) if layer["order"] == "identity" else np.asarray(layer["order"], np.int64)
            pos = np.empty(n_ff, np.int64)
            pos[order] = np.arange(n_ff)
            self.positions.append(pos)
        self.stats = IOStats()
        # use_mmap=True (a baseline for benchmarks): records come from a memory map of the store, through
        # the page cache, and its pages count in this process's RSS once touched
        self.mapped = np.memmap(self.path, self.dtype, "r", 0, (size // self.rec,)) if use_mmap else None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._buffers: list[mmap.mmap] = []
        self._pool = ThreadPoolExecutor(max_workers=inflight, thread_name_prefix="flash-read")

    @property
    def staging_bytes(self) -> int:
        """DRAM the reader can hold besides the records it returns: per thread, an aligned staging
        buffer and the copy of the records taken out of it."""
        return 2 * self.inflight * self.max_read

    def tables(self, layer: int) -> dict[str, np.ndarray]:
        """A layer's resident tables (the q4 encoding's down scales and mins), read once."""
        out = {}
        for name, t in self.entry["layers"][layer]["tables"].items():
            dt = np.dtype(t["dtype"])
            n = int(np.prod(t["shape"])) * dt.itemsize
            out[name] = np.frombuffer(self._pread(t["offset"], n), dt).reshape(t["shape"]).copy()
        return out

    def read(self, layer: int, ids) -> np.ndarray:
        """Records of neurons `ids` (in that order) of `layer`, as a structured array."""
        return self.submit(layer, ids).result()

    def submit(self, layer: int, ids) -> Future:
        """Start reading; the future's result is what `read` returns."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if self.mapped is not None:  # the mmap baseline: page faults (and the kernel's readahead) read
            done = Future()
            base = int(self.entry["layers"][layer]["records_offset"]) // self.rec
            done.set_result(self.mapped[base + self.positions[layer][ids]])
            with self._lock:
                self.stats.records += len(ids)
            return done
        pos = self.positions[layer][ids]
        if len(ids) > 1 and pos[-1] - pos[0] == len(ids) - 1 and (np.diff(pos) == 1).all():
            return self._submit_span(layer, int(pos[0]), len(ids))
        out = np.empty(len(ids), self.dtype)
        runs = self.plan(layer, ids)
        # One task per thread, each reading its share of the runs one after the other (a task per
        # read costs more Python time than a 4 KiB read takes); runs dealt round-robin.
        groups = [runs[i::self.inflight] for i in range(min(self.inflight, len(runs)))]
        return _Gather([self._pool.submit(self._read_runs, g, out) for g in groups], out)

    def _submit_span(self, layer: int, first: int, count: int) -> Future:
        """Consecutive records (a whole section, a block of a prompt's stream): read straight into a
        page-aligned array, no staging copy, in max_read pieces spread over the threads."""
        start = int(self.entry["layers"][layer]["records_offset"]) + first * self.rec
        lead = start % PAGE  # direct I/O reads whole aligned pages
        span = _align_up(lead + count * self.rec)
        raw = np.empty(span + PAGE, np.uint8)
        skip = -raw.ctypes.data % PAGE
        buf = raw[skip:skip + span]
        pieces = [(start - lead + at, min(self.max_read, span - at), at) for at in range(0, span, self.max_read)]
        groups = [pieces[i::self.inflight] for i in range(min(self.inflight, len(pieces)))]
        futures = [self._pool.submit(self._read_into, g, buf) for g in groups]
        with self._lock:
            self.stats.records += count
        return _Gather(futures, buf[lead:lead + count * self.rec].view(self.dtype))

    def _read_into(self, pieces: list, buf: np.ndarray) -> None:
        for offset, length, at in pieces:
            with memoryview(buf[at:at + length]) as part:
                got = os.preadv(self.fd, [part], offset)
            if got < length:
                raise FlashStoreError(f"{self.path}: short read at byte {offset} ({got} of {length} bytes): the "
                                      "flash store is truncated; re-convert the model with --flash")
        with self._lock:
            self.stats.bytes_read += sum(p[1] for p in pieces)
            self.stats.reads += len(pieces)

    def plan(self, layer: int, ids: np.ndarray) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """Coalesced reads: (file offset, length, indices into the output, record offsets in the read)."""
        if len(ids) == 0:
            return []
        base = int(self.entry["layers"][layer]["records_offset"])
        starts = base + self.positions[layer][ids] * self.rec
        order = np.argsort(starts, kind="stable")
        s = starts[order]
        # A new run where the gap to the previous record exceeds max_gap, or where the read would pass
        # max_read bytes (a loop over runs, not records: searchsorted finds each run's end).
        breaks = np.flatnonzero(np.diff(s) - self.rec > self.max_gap) + 1
        bounds = np.append(breaks, len(s))
        runs, i, b = [], 0, 0
        while i < len(s):
            run_start = int(s[i]) - int(s[i]) % PAGE
            while bounds[b] <= i:
                b += 1
            j = min(int(bounds[b]), int(np.searchsorted(s, run_start + self.max_read - self.rec, "right")))
            j = max(j, i + 1)
            run_end = _align_up(int(s[j - 1]) + self.rec)
            runs.append((run_start, run_end - run_start, order[i:j], s[i:j] - run_start))
            i = j
        return runs

    def _buffer(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = mmap.mmap(-1, self.max_read)  # anonymous: page-aligned
            with self._lock:
                self._buffers.append(buf)
        return memoryview(buf)

    def _pread(self, offset: int, length: int) -> bytes:
        start = offset - offset % PAGE
        span = _align_up(offset + length) - start
        buf = mmap.mmap(-1, span)
        try:
            with memoryview(buf) as view:
                self._preadv(view, start, span, offset + length - start)
            return bytes(buf[offset - start:offset - start + length])
        finally:
            buf.close()

    def _preadv(self, view: memoryview, offset: int, length: int, need: int, count: bool = True) -> None:
        with view[:length] as part:
            got = os.preadv(self.fd, [part], offset)
        if got < need:
            raise FlashStoreError(f"{self.path}: short read at byte {offset} ({got} of {need} bytes): the flash "
                                  "store is truncated; re-convert the model with --flash")
        if count:
            with self._lock:
                self.stats.bytes_read += length
                self.stats.reads += 1

    def _read_runs(self, runs: list, out: np.ndarray) -> None:
        rows = out.view(np.uint8).reshape(len(out), self.rec)
        n_bytes = n_recs = n_reads = 0
        with self._buffer() as view:
            # Records start at multiples of the record size from a run's start (sections are
            # page-aligned, a record size divides a page or is whole pages).
            recs = np.frombuffer(view, np.uint8, count=self.max_read - self.max_read % self.rec).reshape(-1, self.rec)
            try:
                for start, length, dest, rel in runs:
                    self._preadv(view, start, length, int(rel[-1]) + self.rec, count=False)
                    if len(dest) == 1:
                        rows[dest[0]] = recs[rel[0] // self.rec]
                    else:
                        rows[dest] = recs[rel // self.rec]
                    n_bytes, n_recs, n_reads = n_bytes + length, n_recs + len(dest), n_reads + 1
            finally:
                del recs
                with self._lock:
                    self.stats.bytes_read += n_bytes
                    self.stats.reads += n_reads
                    self.stats.records += n_recs

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for b in self._buffers:
            b.close()
        self._buffers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _align_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


class _Gather(Future):
    """A future over several reads: done when all are, its result the filled record array."""

    def __init__(self, futures: list[Future], out: np.ndarray):
        super().__init__()
        self._parts, self._out = futures, out

    def result(self, timeout=None):
        for f in self._parts:
            f.result(timeout)
        return self._out

    def done(self):
        return all(f.done() for f in self._parts)


class NeuronWindow:
    """One layer's DRAM window: `capacity` preallocated slots, each holding one neuron's fields.

    slot -> neuron in `neuron_of[:used]`, neuron -> slot in `slot_of` (-1 when absent); `last_active`
    is the token at which each slot's neuron was last active. Slots [0, used) are always the resident
    neurons (dense); an evicted neuron's slot takes a new neuron, or else the last slot's.
    """

    def __init__(self, dtype: np.dtype, capacity: int, n_neurons: int, window_tokens: int = 5):
        self.capacity, self.window_tokens = capacity, window_tokens
        self.fields = {name: np.zeros((capacity,) + dtype[name].shape, dtype[name].base)
                       for name in dtype.names}
        self.neuron_of = np.full(capacity, -1, np.int64)
        self.last_active = np.zeros(capacity, np.int64)
        self.slot_of = np.full(n_neurons, -1, np.int64)
        self._seen = np.zeros(n_neurons, bool)
        self.used = 0
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.fields.values())

    def missing(self, ids: np.ndarray) -> np.ndarray:
        ids = self._unique(ids)
        return ids[self.slot_of[ids] < 0]

    def update(self, ids, token: int, records: np.ndarray | None, missing: np.ndarray | None = None) -> np.ndarray:
        """Make `ids` resident for `token`: evict neurons not active in the last `window_tokens` tokens
        (then least recently active ones, if room is still short), put `records` (of `missing`, as
        returned by `missing(ids)`) into free slots; returns the slots of `ids`, in their order."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        uniq = self._unique(ids)
        if len(uniq) > self.capacity:
            raise BudgetTooSmallError(f"a token needs {len(uniq)} neurons in this layer but the window holds "
                                      f"{self.capacity}: raise the DRAM budget or select fewer neurons")
        if missing is None:
            missing = self.missing(uniq)
        n_miss = len(missing)
        self.hits += len(uniq) - n_miss
        self.misses += n_miss
        present = self.slot_of[uniq]
        self.last_active[present[present >= 0]] = token
        gone = np.flatnonzero(self.last_active[:self.used] <= token - self.window_tokens)
        short = self.used - len(gone) + n_miss - self.capacity
        if short > 0:  # least recently active first, never one this token needs
            candidates = np.ones(self.used, bool)
            candidates[present[present >= 0]] = False
            candidates[gone] = False
            slots = np.flatnonzero(candidates)
            gone = np.union1d(gone, slots[np.argsort(self.last_active[slots], kind="stable")[:short]])
        # The new neurons take the lowest freed slots in place; the other freed slots are deleted
        # (swap-delete from the end); what is still missing goes after the last used slot.
        reuse, delete = gone[:n_miss], gone[n_miss:]
        self.slot_of[self.neuron_of[reuse]] = -1
        self._evict(delete)
        if n_miss:
            slots = np.concatenate([reuse, np.arange(self.used, self.used + n_miss - len(reuse))])
            for name, arr in self.fields.items():
                arr[slots] = records[name]
            self.neuron_of[slots] = missing
            self.slot_of[missing] = slots
            self.last_active[slots] = token
            self.used += n_miss - len(reuse)
        return self.slot_of[ids]

    def _unique(self, ids) -> np.ndarray:
        """Sorted distinct ids (a mark per neuron: O(neurons), several times faster than np.unique here)."""
        self._seen[np.asarray(ids, np.int64)] = True
        out = np.flatnonzero(self._seen)
        self._seen[out] = False
        return out

    def _evict(self, slots: np.ndarray) -> None:
        """Free `slots` (sorted, distinct): the resident neurons in the last len(slots) slots move into the freed places
        below (swap-delete, one copy per field for the whole batch), so slots [0, used) stay dense."""
        if len(slots) == 0:
            return
        gone = slots  # sorted, distinct
        used = self.used - len(gone)
        holes = gone[gone < used]
        tail = np.ones(self.used - used, bool)
        tail[gone[gone >= used] - used] = False
        movers = np.flatnonzero(tail) + used  # as many as holes
        self.slot_of[self.neuron_of[gone]] = -1
        for arr in self.fields.values():
            arr[holes] = arr[movers]
        self.neuron_of[holes], self.last_active[holes] = self.neuron_of[movers], self.last_active[movers]
        self.slot_of[self.neuron_of[holes]] = holes
        self.neuron_of[used:self.used] = -1
        self.used = used


@dataclass
class LayerView:
    """What the FFN of one layer computes with: window fields [capacity, ...] (slots [0, used) valid),
    the neuron id in each slot (`neurons` [used]) and the slots of the ids asked for; `tables` are the
    layer's resident tables."""

    fields: dict[str, np.ndarray]
    used: int
    active_slots: np.ndarray
    tables: dict[str, np.ndarray]
    neurons: np.ndarray


def window_dtype(entry: dict, fields=("gate", "up", "down"), dtype: str = "float16") -> np.dtype:
    """A window slot that holds neurons decoded to `dtype`: one row of hidden values per field."""
    return np.dtype([(f, dtype, (int(entry["hidden_size"]),)) for f in fields])


def decode_records(records: np.ndarray, ids: np.ndarray, tables: dict[str, np.ndarray], entry: dict,
                   into: np.dtype) -> dict[str, np.ndarray]:
    """Records of neurons `ids` -> {field: rows [n, hidden]} in `into`'s fields and dtype
    (window_dtype): w = d*q + m per 4-bit block, computed in float32; fp16 records as they are.
    (Contiguous arrays per field: writing float16 into a structured array's field is 4x slower.)"""
    if entry["encoding"] == "fp16":
        return {name: records[name].astype(into[name].base) for name in into.names}
    n, block, out = len(records), int(entry["block_size"]), {}
    for name in into.names:
        if name == "down":  # one code per block of `block` neurons; the blocks' d, m are resident
            q = _nibbles(records["down_codes"])
            groups = np.asarray(ids, np.int64) // block
            d, m = tables["down_scale_t"][groups].astype(np.float32), tables["down_min_t"][groups].astype(np.float32)
        else:
            q = _nibbles(records[f"{name}_codes"])
            d = records[f"{name}_scale"].astype(np.float32)[..., None]
            m = records[f"{name}_min"].astype(np.float32)[..., None]
        q *= d
        q += m
        out[name] = q.reshape(n, -1).astype(into[name].base)
    return out


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[..., K/2] bytes -> [..., K] float32 codes, element 2j from the low nibble."""
    q = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.float32)
    np.bitwise_and(packed, 0x0F, out=q[..., 0::2], casting="unsafe")
    np.right_shift(packed, 4, out=q[..., 1::2], casting="unsafe")
    return q


class FlashWeights:
    """The flash store of a bundle under a DRAM budget: a reader, one window per layer, counters."""

    def __init__(self, bundle, budget_bytes: int, *, window_tokens: int = 5, inflight: int = 4,
                 max_read: int = 256 * 1024, max_gap: int = 32768, direct: bool | None = None,
                 decode_to: np.dtype | None = None, decoder=None, use_mmap: bool = False, reserved_bytes: int = 0):
        """decode_to: slots hold the neurons decoded to this window_dtype (what the MLP computes with),
        the budget counting their size; None: slots hold the records as read. decoder(records, ids,
        tables) -> {field: rows} does the decoding (default: `decode_records`). reserved_bytes: what the
        caller holds besides within the budget (sections read ahead, predictors)."""
        entry = bundle.manifest.get("flash")
        if not isinstance(entry, dict):
            raise FlashStoreError(f"{bundle.path}: the bundle has no flash store; convert with --flash")
        self.entry = entry
        self.reader = FlashReader(bundle.file(entry["file"]), entry, inflight=inflight, max_read=max_read,
                                  max_gap=max_gap, direct=direct, use_mmap=use_mmap)
        try:
            self.layers, n_ff = int(entry["num_layers"]), int(entry["intermediate_size"])
            self.budget = int(budget_bytes)
            self.decode_to = decode_to
            self.decoder = decoder or (lambda rec, ids, tables: decode_records(rec, ids, tables, entry, decode_to))
            slot = self.reader.dtype if decode_to is None else decode_to
            self.reserved_bytes = reserved_bytes
            self.capacity = capacity_for_budget(entry, self.budget, self.reader.staging_bytes + reserved_bytes,
                                                None if decode_to is None else decode_to.itemsize)
            self.tables = [self.reader.tables(i) for i in range(self.layers)]
            if decode_to is not None and entry["encoding"] == "q4":  # rows by block: a gather per neuron
                self.tables = [{f"{k}_t": np.ascontiguousarray(v.T) for k, v in t.items()} for t in self.tables]
            self.reader.stats.start_token()
            self.windows = [NeuronWindow(slot, self.capacity, n_ff, window_tokens) for _ in range(self.layers)]
        except BaseException:
            self.reader.close()
            raise
        self.token = 0
        self.io_wait_s = self.decode_s = 0.0  # waiting for reads; decoding what they brought

    def dram_bytes(self) -> int:
        """What this holds in DRAM at most: resident weights, staging, two layers of records in flight, windows."""
        return (int(self.entry["resident_bytes"]) - int(self.entry["tables_bytes"])
                + sum(t.nbytes for ts in self.tables for t in ts.values()) + self.reader.staging_bytes
                + self.reserved_bytes
                + 2 * self.capacity * self.reader.rec + sum(w.nbytes for w in self.windows))

    def prefetch(self, layer: int, ids) -> Future:
        """Start reading the records of `ids` that the layer's window lacks (do not load the layer in between)."""
        missing = self.windows[layer].missing(ids)
        if len(missing) > self.capacity:
            raise BudgetTooSmallError(f"a token needs {len(missing)} new neurons in layer {layer} but the window "
                                      f"holds {self.capacity}: raise the DRAM budget or select fewer neurons")
        fut = self.reader.submit(layer, missing)
        fut.missing = missing
        return fut

    def prefetch_section(self, layer: int) -> Future:
        """Start reading every record of the layer (large sequential reads): what to do ahead of time
        when a token's missing neurons are spread over most of the section anyway."""
        fut = self.reader.submit(layer, np.arange(int(self.entry["intermediate_size"])))
        fut.missing = None  # the whole section, in neuron id order
        return fut

    def load(self, layer: int, ids, prefetched: Future | None = None) -> LayerView:
        """Make the layer's window hold `ids` (reading what is missing, or taking the records from a
        prefetch of these ids or of the whole section)."""
        fut = prefetched if prefetched is not None else self.prefetch(layer, ids)
        started = time.perf_counter()
        records = fut.result()
        waited = time.perf_counter()
        missing = fut.missing
        if missing is None:
            missing = self.windows[layer].missing(ids)
            records = records[missing]
        if self.decode_to is not None and len(missing):
            records = self.decoder(records, missing, self.tables[layer])
        self.io_wait_s += waited - started
        self.decode_s += time.perf_counter() - waited
        w = self.windows[layer]
        slots = w.update(ids, self.token, records, missing)
        return LayerView(w.fields, w.used, slots, self.tables[layer], w.neuron_of[:w.used])

    def end_token(self) -> dict:
        self.token += 1
        return self.reader.stats.end_token()

    def counters(self) -> dict:
        """What `bench` reports: tokens, mean bytes and reads per token, window hit rate, slots per layer."""
        toks = self.reader.stats.per_token
        n = max(1, len(toks))
        return {"tokens": len(toks), "bytes_read_per_token": sum(t["bytes_read"] for t in toks) / n,
                "reads_per_token": sum(t["reads"] for t in toks) / n, "window_hit_rate": self.hit_rate,
                "slots_per_layer": self.capacity, "dram_bytes": self.dram_bytes(), "budget_bytes": self.budget,
                "direct_io": self.reader.direct, "io_wait_s": self.io_wait_s, "decode_s": self.decode_s}

    @property
    def hit_rate(self) -> float:
        hits = sum(w.hits for w in self.windows)
        total = hits + sum(w.misses for w in self.windows)
        return hits / total if total else 0.0

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def budget_for_capacity(entry: dict, capacity: int, staging_bytes: int, slot_bytes: int | None = None) -> int:
    """The smallest budget with `capacity` slots per layer (the inverse of capacity_for_budget)."""
    slot = int(slot_bytes or entry["record_payload"])
    return (int(entry["resident_bytes"]) + staging_bytes
            + capacity * (int(entry["num_layers"]) * slot + 2 * int(entry["record_size"])))


def capacity_for_budget(entry: dict, budget_bytes: int, staging_bytes: int, slot_bytes: int | None = None) -> int:
    """Neuron slots per layer that a DRAM budget allows: (budget - resident - staging) over the layers'
    windows (slots of slot_bytes, default a record's payload) plus two layers' records in flight;
    BudgetTooSmallError below the fixed part."""
    resident = int(entry["resident_bytes"])
    fixed = resident + staging_bytes
    slot = int(slot_bytes or entry["record_payload"])
    layers, n_ff = int(entry["num_layers"]), int(entry["intermediate_size"])
    if budget_bytes < fixed + layers * slot + 2 * entry["record_size"]:
        raise BudgetTooSmallError(
            f"a DRAM budget of {budget_bytes / 1e6:.1f} MB is below what must stay resident: "
            f"{resident / 1e6:.1f} MB of weights outside the flash store + {staging_bytes / 1e6:.1f} MB of read "
            f"buffers (+ at least one neuron per layer); give at least {(fixed + layers * slot) / 1e6 + 0.1:.1f} MB")
    return min(n_ff, (budget_bytes - fixed) // (layers * slot + 2 * int(entry["record_size"])))
