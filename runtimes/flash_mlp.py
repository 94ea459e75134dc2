"""The MLP the runtime computes itself when the FFN weights live in a flash store (LLM in a flash).

Per layer and token: the layer graph hands over the MLP input x and the gate projection g of every
neuron (the gate rows stay resident: converters/flash_graphs.py). The token keeps `fraction` of the
neurons: those with the largest |silu(g)| (default; converters/sparsity.py measured the choice),
those over a per-layer threshold calibrated at conversion, or a low-rank predictor's picks. The
window (ondevice/flash.py) makes their up rows and down columns resident, reading from storage only
the ones it lacks (a whole layer section ahead of time when they are dense), and one ONNX Runtime
call computes

    y = (silu(g) * (x @ up.T) * mask) @ down

over the window's slots, `mask` zeroing the slots this token did not select. The slots hold the
neurons decoded to fp16 (or fp32): ONNX Runtime's fp16 MatMul takes weights as inputs at full speed,
while its 4-bit MatMulNBits (and torch's int4 kernel) compute ~30x slower when the weights are not
prepacked constants (measured: 0.9 ms against 0.03 ms for 768 x 576), so 4-bit slots would not pay.
"""

from __future__ import annotations

import os
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from ondevice.errors import BudgetTooSmallError, BundleError
from ondevice.flash import FlashWeights, budget_for_capacity, window_dtype

DEFAULT_FRACTION = 0.8  # converters/sparsity.py DEFAULT_FRACTION: the measured default
SELECTIONS = ("top-k", "threshold", "predictor")
STREAM_BLOCK = 256  # neurons per read when a prompt streams a layer's FFN through (256 KiB of q4 records)
SLOT_DTYPES = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT}


def swiglu(gate: np.ndarray, up: np.ndarray, down: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x [T, H] through the neurons given: gate/up [N, H] (a neuron per row), down [H, N] -> [T, H].
    With every neuron this is the model's MLP; with a subset, the others count as zero."""
    g = x @ gate.T
    return ((g / (1.0 + np.exp(-g))) * (x @ up.T)) @ down.T


def mlp_graph(dtype: str) -> bytes:
    """The masked MLP over slots: x [T, H] f32, gate [T, N] f32, up/down [N, H] (dtype), mask [T, N]
    f32 -> y [T, H] f32."""
    dt = SLOT_DTYPES[dtype]
    f32 = TensorProto.FLOAT
    nodes = [helper.make_node("Cast", ["x"], ["xc"], to=dt),
             helper.make_node("Gemm", ["xc", "up"], ["u"], transB=1),
             helper.make_node("Cast", ["u"], ["uf"], to=f32),
             helper.make_node("Sigmoid", ["gate"], ["sg"]),
             helper.make_node("Mul", ["sg", "gate"], ["silu"]),
             helper.make_node("Mul", ["silu", "uf"], ["h_all"]),
             helper.make_node("Mul", ["h_all", "mask"], ["h"]),
             helper.make_node("Cast", ["h"], ["hc"], to=dt),
             helper.make_node("MatMul", ["hc", "down"], ["yc"]),
             helper.make_node("Cast", ["yc"], ["y"], to=f32)]
    io = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "flash-mlp",
                              [io("x", f32, ["T", "H"]), io("gate", f32, ["T", "N"]), io("up", dt, ["N", "H"]),
                               io("down", dt, ["N", "H"]), io("mask", f32, ["T", "N"])],
                              [io("y", f32, ["T", "H"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()


def decode_graph(hidden: int, block: int, dtype: str) -> bytes:
    """4-bit records -> rows: up_codes [N, H/block, block/2] u8, up_scale/up_min [N, H/block] f16,
    down_codes [N, H/2] u8, down_scale/down_min [N, H] f16 (the resident tables gathered per neuron) ->
    up, down [N, H] (dtype), w = d*q + m in float32 (ondevice.flash.decode_records in numpy: its fp16
    conversion alone costs ~5 ns a value there)."""
    dt, f32, u8, f16 = SLOT_DTYPES[dtype], TensorProto.FLOAT, TensorProto.UINT8, TensorProto.FLOAT16
    nodes = [helper.make_node("Constant", [], ["c15"], value=helper.make_tensor("c15", u8, [], [15])),
             helper.make_node("Constant", [], ["c4"], value=helper.make_tensor("c4", u8, [], [4])),
             helper.make_node("Constant", [], ["last"], value=helper.make_tensor("last", TensorProto.INT64, [1], [-1])),
             helper.make_node("Constant", [], ["rows"], value=helper.make_tensor("rows", TensorProto.INT64, [2], [0, hidden])),
             helper.make_node("Constant", [], ["blocks"],
                              value=helper.make_tensor("blocks", TensorProto.INT64, [3], [0, hidden // block, block]))]
    for name in ("up", "down"):
        nodes += [helper.make_node("BitwiseAnd", [f"{name}_codes", "c15"], [f"{name}_lo"]),
                  helper.make_node("BitShift", [f"{name}_codes", "c4"], [f"{name}_hi"], direction="RIGHT"),
                  helper.make_node("Unsqueeze", [f"{name}_lo", "last"], [f"{name}_lo1"]),
                  helper.make_node("Unsqueeze", [f"{name}_hi", "last"], [f"{name}_hi1"]),
                  helper.make_node("Concat", [f"{name}_lo1", f"{name}_hi1"], [f"{name}_q2"], axis=-1),
                  helper.make_node("Cast", [f"{name}_q2"], [f"{name}_qf"], to=f32)]
    # up: blocks of `block` values along hidden, a scale and min per block
    nodes += [helper.make_node("Reshape", ["up_qf", "blocks"], ["up_qb"]),
              helper.make_node("Cast", ["up_scale"], ["up_d"], to=f32),
              helper.make_node("Cast", ["up_min"], ["up_m"], to=f32),
              helper.make_node("Unsqueeze", ["up_d", "last"], ["up_d1"]),
              helper.make_node("Unsqueeze", ["up_m", "last"], ["up_m1"]),
              helper.make_node("Mul", ["up_qb", "up_d1"], ["up_w0"]),
              helper.make_node("Add", ["up_w0", "up_m1"], ["up_w"]),
              helper.make_node("Reshape", ["up_w", "rows"], ["up_rows"]),
              helper.make_node("Cast", ["up_rows"], ["up"], to=dt),
              helper.make_node("Reshape", ["down_qf", "rows"], ["down_q"]),
              helper.make_node("Cast", ["down_scale"], ["down_d"], to=f32),
              helper.make_node("Cast", ["down_min"], ["down_m"], to=f32),
              helper.make_node("Mul", ["down_q", "down_d"], ["down_w0"]),
              helper.make_node("Add", ["down_w0", "down_m"], ["down_w"]),
              helper.make_node("Cast", ["down_w"], ["down"], to=dt)]
    io = helper.make_tensor_value_info
    nb = hidden // block
    graph = helper.make_graph(nodes, "flash-decode",
                              [io("up_codes", u8, ["N", nb, block // 2]), io("up_scale", f16, ["N", nb]),
                               io("up_min", f16, ["N", nb]), io("down_codes", u8, ["N", hidden // 2]),
                               io("down_scale", f16, ["N", hidden]), io("down_min", f16, ["N", hidden])],
                              [io("up", dt, ["N", hidden]), io("down", dt, ["N", hidden])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()


def top_k(score: np.ndarray, k: int) -> np.ndarray:
    """[T, k] ids: each row's k largest scores (all, in order, when k is every column)."""
    t, n = score.shape
    if k >= n:
        return np.broadcast_to(np.arange(n), (t, n))
    return np.argpartition(-score, k - 1, axis=1)[:, :k]


def silu_scores(gate: np.ndarray) -> np.ndarray:
    """|silu(g)|: how much each neuron's gate lets through."""
    return np.abs(gate / (1.0 + np.exp(-gate)))


def top_neurons(gate: np.ndarray, k: int) -> np.ndarray:
    """[T, k] neuron ids: each token's k largest |silu(g)|."""
    return top_k(silu_scores(gate), k)


def budget_for(entry: dict, fraction: float, dtype: str = "float16", prefetch: bool = True,
               select: str = "top-k", inflight: int = 4, max_read: int = 256 * 1024) -> int:
    """The DRAM budget (bytes) whose window holds `fraction` of each layer's neurons (FlashMlp's
    slots, the reader's buffers with its defaults, what FlashMlp reserves besides)."""
    return budget_for_capacity(entry, int(round(fraction * int(entry["intermediate_size"]))),
                               2 * inflight * max_read + reserved_bytes(entry, prefetch, select),
                               window_dtype(entry, ("up", "down"), dtype).itemsize)


def reserved_bytes(entry: dict, prefetch: bool, select: str) -> int:
    """DRAM a FlashMlp holds outside the window: two layer sections read ahead, the predictors."""
    sections = 2 * int(entry["intermediate_size"]) * int(entry["record_size"]) if prefetch else 0
    return sections + (int(entry["predictor"]["bytes"]) if select == "predictor" else 0)


class FlashMlp:
    """mlp(layer, x [T, H], gate [T, N]) -> [T, H] over a DRAM window of the flash store.

    budget_bytes: the DRAM budget for the resident weights plus the windows (ondevice/flash.py);
    fraction: share of the neurons each token keeps (1.0: all, the dense MLP); select: how they are
    chosen ("top-k", "threshold", "predictor": see `choose`); dtype: what the slots
    hold ("float16", or "float32" at twice the bytes). Baselines for benchmarks: naive=True streams
    every layer's whole FFN from storage for every token (no window); use_mmap=True reads records
    through a memory map of the store instead of direct I/O. prefetch: read a layer's whole section
    while the layer before it computes, where the last token's misses were dense (see __call__)."""

    def __init__(self, bundle, budget_bytes: int, *, fraction: float = DEFAULT_FRACTION, select: str = "top-k",
                 window_tokens: int = 5, dtype: str = "float16", threads: int | None = None,
                 direct: bool | None = None, naive: bool = False, use_mmap: bool = False, prefetch: bool = True):
        if dtype not in SLOT_DTYPES:
            raise ValueError(f"slot dtype must be one of {', '.join(SLOT_DTYPES)}, not {dtype!r}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"the FFN fraction must be in (0, 1], not {fraction}")
        entry = bundle.manifest["flash"]
        self.select, self.thresholds, self.predictors = select, None, None
        if select == "threshold":
            table = entry.get("selection") or {}
            if fraction not in table.get("fractions", []):
                raise ValueError(f"threshold selection is calibrated for fractions {table.get('fractions')}, "
                                 f"not {fraction}; re-convert with --flash for thresholds, or pick one of those")
            self.thresholds = [layer[table["fractions"].index(fraction)] for layer in table["gate_thresholds"]]
        elif select == "predictor":
            if not isinstance(entry.get("predictor"), dict):
                raise BundleError(f"{bundle.path}: no neuron predictors; convert with --flash --flash-predictor")
            from ondevice.converters.sparsity import load_predictors

            self.predictors = load_predictors(bundle.path)["layers"]
        elif select != "top-k":
            raise ValueError(f"ffn selection must be one of {', '.join(SELECTIONS)}, not {select!r}")
        opts = ort.SessionOptions()
        # one thread: ORT's fp16 MatMul gains nothing from a second one here (0.42 against 0.61 ms
        # for 1536 neurons of SmolLM2), and the float32 one little
        opts.intra_op_num_threads = threads or 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        cpu = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(mlp_graph(dtype), sess_options=opts, providers=cpu)
        decoder = None
        if entry.get("encoding") == "q4":
            self.decoder = ort.InferenceSession(decode_graph(int(entry["hidden_size"]), int(entry["block_size"]), dtype),
                                                sess_options=opts, providers=cpu)
            decoder, self.block = self._decode, int(entry["block_size"])
        self.weights = FlashWeights(bundle, budget_bytes, window_tokens=window_tokens, direct=direct,
                                    decode_to=window_dtype(entry, ("up", "down"), dtype), decoder=decoder,
                                    use_mmap=use_mmap,
                                    reserved_bytes=reserved_bytes(entry, prefetch and not naive, select))
        n = int(entry["intermediate_size"])
        self.fraction, self.k = fraction, max(1, min(n, int(round(fraction * n))))
        if self.k > self.weights.capacity and not naive:
            self.weights.close()
            raise BudgetTooSmallError(
                f"a DRAM budget of {budget_bytes / 1e6:.1f} MB leaves room for {self.weights.capacity} neurons per "
                f"layer, but keeping {fraction:.0%} of the FFN needs {self.k}: raise the budget or lower the fraction")
        self.naive, self.prefetch = naive, prefetch and not naive
        self.neurons = n
        # per layer: the last token's missing neurons were dense enough to read the whole section ahead
        self.dense = np.full(self.weights.layers, self.prefetch)
        self.ahead: dict = {}  # layer -> its section being read
        self.gap_records = 1 + self.weights.reader.max_gap // self.weights.reader.rec
        self.streamed: list[bool] = []  # per step: whether it streamed the layers (a prompt) or used the window
        self._streaming = False

    def _decode(self, records: np.ndarray, ids: np.ndarray, tables: dict) -> dict[str, np.ndarray]:
        groups = ids // self.block
        up, down = self.decoder.run(None, {
            "up_codes": np.ascontiguousarray(records["up_codes"]), "up_scale": np.ascontiguousarray(records["up_scale"]),
            "up_min": np.ascontiguousarray(records["up_min"]), "down_codes": np.ascontiguousarray(records["down_codes"]),
            "down_scale": tables["down_scale_t"][groups], "down_min": tables["down_min_t"][groups]})
        return {"up": up, "down": down}

    def choose(self, layer: int, x: np.ndarray, gate: np.ndarray) -> list[np.ndarray]:
        """Each token's neuron ids: its top-k |silu(g)| ("top-k"), those above the layer's calibrated
        threshold ("threshold", at most the window's capacity), or the predictor's top-k scores."""
        if self.select == "predictor":
            p = self.predictors[layer]
            return list(top_k((x @ p["a"]) @ p["b"] + p["c"], self.k))
        if self.select == "top-k":
            return list(top_neurons(gate, self.k))
        chosen = []
        for row in silu_scores(gate):
            ids = np.flatnonzero(row > self.thresholds[layer])
            if len(ids) > self.weights.capacity:
                ids = ids[top_k(row[ids][None], self.weights.capacity)[0]]
            chosen.append(ids)
        return chosen

    def __call__(self, layer: int, x: np.ndarray, gate: np.ndarray) -> np.ndarray:
        chosen = self.choose(layer, x, gate)
        self._streaming = len(x) > 1
        if len(x) > 1 or self.naive:
            return self._stream(layer, x, gate, chosen)
        w = self.weights
        nxt = (layer + 1) % w.layers
        if self.dense[nxt] and nxt not in self.ahead:
            self.ahead[nxt] = w.prefetch_section(nxt)
        misses = w.windows[layer].misses
        view = w.load(layer, chosen[0], self.ahead.pop(layer, None))
        # Missing neurons closer than the reader's gap are read along with everything between them:
        # past that density, reading the whole section ahead of time costs the same bytes, off the
        # critical path.
        self.dense[layer] = self.prefetch and (w.windows[layer].misses - misses) * self.gap_records >= self.neurons
        used = view.used
        mask = np.zeros((1, used), np.float32)
        mask[0, view.active_slots] = 1.0
        return self.session.run(None, {"x": x, "gate": gate[:, view.neurons], "up": view.fields["up"][:used],
                                       "down": view.fields["down"][:used], "mask": mask})[0]

    def _stream(self, layer: int, x: np.ndarray, gate: np.ndarray, chosen: list[np.ndarray]) -> np.ndarray:
        """Several tokens (a prompt): together they use nearly every neuron, so the layer's whole store
        section streams through in blocks of STREAM_BLOCK neurons (large reads, the next block read
        while this one computes), each token masked to its own neurons; the window is left as it is."""
        mask = np.zeros(gate.shape, np.float32)
        for t, ids in enumerate(chosen):
            mask[t, ids] = 1.0
        n, reader, tables = gate.shape[1], self.weights.reader, self.weights.tables[layer]
        blocks = [np.arange(s, min(n, s + STREAM_BLOCK)) for s in range(0, n, STREAM_BLOCK)]
        out = np.zeros_like(x)
        pending = reader.submit(layer, blocks[0])
        for i, ids in enumerate(blocks):
            waited = time.perf_counter()
            records = pending.result()
            self.weights.io_wait_s += time.perf_counter() - waited
            if i + 1 < len(blocks):
                pending = reader.submit(layer, blocks[i + 1])
            rows = self.weights.decoder(records, ids, tables)
            out += self.session.run(None, {"x": x, "gate": np.ascontiguousarray(gate[:, ids]), "up": rows["up"],
                                           "down": rows["down"], "mask": np.ascontiguousarray(mask[:, ids])})[0]
        return out

    def end_step(self) -> None:
        """A forward step is over: the window's recency counts steps."""
        self.weights.end_token()
        self.streamed.append(self._streaming)
        self._streaming = False

    def counters(self) -> dict:
        """The window's counters, and the reads of decode steps alone (prompts stream whole layers)."""
        steps = [t for t, s in zip(self.weights.reader.stats.per_token, self.streamed) if not s]
        n = max(1, len(steps))
        return dict(self.weights.counters(), fraction=self.fraction, neurons_per_token=self.k,
                    decode_steps=len(steps), decode_bytes_per_token=sum(t["bytes_read"] for t in steps) / n,
                    decode_reads_per_token=sum(t["reads"] for t in steps) / n)

    def close(self) -> None:
        self.weights.close()
