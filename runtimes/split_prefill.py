"""Prefill through the split graphs (converters/split_prefill.py) on two workers, in a schedule's order.

One worker thread plays the NPU (embed, per-layer pre/post linear graphs, head), the other the CPU
(the attention graph over each layer's KV buffer). Each runs its share of the prefill DAG
(ondevice/schedule.py) in the order a schedule gives it, starting a task once the tasks it needs are
done. ONNX Runtime releases the GIL while a graph runs, so the two really overlap; every session has
one intra-op thread (here both "processors" are cores of the same CPU).

The attention graph writes the keys and values into the backend's own KV buffers (bound as past and
present, as the one-shot graph does), so decoding continues from them unchanged; the logits equal
the one-shot prefill's.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from ondevice.bundle import Bundle
from ondevice.errors import BundleError
from ondevice.schedule import (CPU, NPU, POLICIES, ModelShape, Schedule, Slot, Task, chunks_for, flop_latencies,
                               prefill_dag, simulate)


class SplitPrefill:
    """Runs a prefill through the bundle's split graphs, writing `backend`'s KV cache.

    policy: "out-of-order" (the default) or "in-order"; `latencies` (a Task -> seconds mapping or
    function, e.g. measured with `measure=True` runs) decide the out-of-order order; by default
    each task costs its arithmetic (`schedule.flop_latencies`)."""

    def __init__(self, bundle: Bundle, backend, policy: str = "out-of-order", providers: list | None = None):
        spec = bundle.manifest["backends"].get("onnx", {}).get("split_prefill")
        if spec is None:
            raise BundleError(f"{bundle.path}: the bundle has no split prefill graphs; convert it with "
                              "--split-prefill (ondevice.convert(..., split_prefill=True))")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        self.backend, self.policy = backend, policy
        self.chunk = int(spec["chunk"])
        self.shape = ModelShape.from_config(bundle.config)
        self.layers = self.shape.layers
        self.latencies = None  # None: flop_latencies
        providers = providers or ["CPUExecutionProvider"]

        def session(name: str) -> ort.InferenceSession:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = 1  # one core per worker: the two workers are the parallelism
            opts.inter_op_num_threads = 1
            try:
                return ort.InferenceSession(os.fspath(bundle.file(name)), sess_options=opts, providers=providers)
            except Exception as e:  # ORT's own Fail/InvalidGraph types
                raise BundleError(f"{bundle.path}: ONNX Runtime cannot load {name}: {e}") from e

        self.embed = session(spec["embed"]["graph"])
        self.attention = session(spec["attention"]["graph"])
        self.head = session(spec["head"]["graph"])
        self.pre = [session(layer["pre"]) for layer in spec["layers"]]
        self.post = [session(layer["post"]) for layer in spec["layers"]]
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="split-prefill")
        self._orders: dict[tuple, dict[str, list[Task]]] = {}
        self.last: Schedule | None = None  # the measured timeline of the last run

    def fits(self, tokens: int, past_len: int) -> bool:
        """Whether the padded chunks fit the context (otherwise the backend prefills as usual)."""
        return past_len + chunks_for(tokens, self.chunk) * self.chunk <= self.backend.max_context

    def orders(self, chunks: int) -> dict[str, list[Task]]:
        """Each worker's task order for a prefill of `chunks` chunks under this policy."""
        key = (chunks, self.policy, id(self.latencies))
        if key not in self._orders:
            dag = prefill_dag(chunks, self.layers)
            latencies = self.latencies or flop_latencies(self.shape, self.chunk)
            schedule = simulate(dag, latencies, self.policy)
            self._orders[key] = {p: schedule.order(p) for p in (NPU, CPU)}
        return self._orders[key]

    def run(self, token_ids, past_len: int) -> np.ndarray:
        """Prefill token_ids at positions past_len..; returns the last position's logits [1, vocab].
        The timeline of the run is kept in `self.last`."""
        ids = np.asarray(token_ids, np.int64).reshape(-1)
        n, size = len(ids), self.chunk
        chunks = chunks_for(n, size)
        self.backend.ensure_capacity(past_len + chunks * size)
        kv = self.backend.kv_cache()
        dag = prefill_dag(chunks, self.layers)
        values: dict[tuple, np.ndarray] = {}  # a task's outputs, until the task that needs them takes them
        done = {t: threading.Event() for t in dag}
        failed: list[BaseException] = []
        slots: list[Slot] = []
        t0 = time.perf_counter()

        def rows(c: int) -> int:  # real tokens in chunk c
            return min(size, n - c * size)

        def execute(task: Task) -> None:
            c, i = task.chunk, task.layer
            if task.kind == "embed":
                padded = np.zeros((1, size), np.int64)
                padded[0, :rows(c)] = ids[c * size:c * size + rows(c)]
                values["normed", c, -1], values["residual", c, -1] = self.embed.run(None, {"input_ids": padded})
            elif task.kind == "pre":
                values["qkv", c, i] = self.pre[i].run(None, {"normed": values.pop(("normed", c, i - 1))})[0]
            elif task.kind == "attn":
                values["attn", c, i] = self._attend(values.pop(("qkv", c, i)), kv[2 * i], kv[2 * i + 1],
                                                    past_len + c * size, rows(c))
            elif task.kind == "post":
                values["normed", c, i], values["residual", c, i] = self.post[i].run(
                    None, {"attn": values.pop(("attn", c, i)), "residual": values.pop(("residual", c, i - 1))})
            else:  # head: the last real row of the last chunk
                values["logits"] = self.head.run(None, {"normed": values.pop(("normed", c, self.layers - 1)),
                                                        "logits_from": np.array([rows(c) - 1], np.int64)})[0]

        def worker(order: list[Task]) -> None:
            for task in order:
                for d in dag[task]:
                    done[d].wait()
                if failed:
                    return
                start = time.perf_counter()
                try:
                    execute(task)
                except BaseException as e:  # wake the other worker, report in the caller
                    failed.append(e)
                    for event in done.values():
                        event.set()
                    return
                slots.append(Slot(task, start - t0, time.perf_counter() - t0))
                done[task].set()

        orders = self.orders(chunks)
        futures = [self._pool.submit(worker, orders[p]) for p in (NPU, CPU)]
        for f in futures:
            f.result()
        if failed:
            raise failed[0]
        busy = {p: sum(s.end - s.start for s in slots if s.task.processor == p) for p in (NPU, CPU)}
        self.last = Schedule(sorted(slots, key=lambda s: s.start), time.perf_counter() - t0, busy, self.policy)
        return values["logits"][0, :1]  # rows from the last real token on: the padding's rows follow

    def _attend(self, qkv: np.ndarray, key: ort.OrtValue, value: ort.OrtValue, past: int, n: int) -> np.ndarray:
        """The attention graph over one layer's cache: the chunk's keys/values land in slots past..;
        padded rows beyond n are written too and overwritten later (or ignored: past seqlens_k)."""
        size = self.chunk
        total = past + size
        positions = np.minimum(np.arange(past, total, dtype=np.int64), self.backend.max_context - 1)
        out = np.empty((1, size, self.shape.heads * self.shape.head_dim), np.float32)
        b = self.attention.io_binding()
        b.bind_cpu_input("qkv", qkv)
        b.bind_cpu_input("seqlens_k", np.array([past + n - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        b.bind_cpu_input("position_ids", positions.reshape(1, size))
        b.bind_cpu_input("attention_bias", np.zeros((1, 1, size, total), np.float32))
        b.bind_cpu_input("query_seqlens", np.array([n], np.int32))
        b.bind_ortvalue_input("past_key", key)
        b.bind_ortvalue_input("past_value", value)
        b.bind_ortvalue_output("present_key", key)
        b.bind_ortvalue_output("present_value", value)
        b.bind_ortvalue_output("attn", ort.OrtValue.ortvalue_from_numpy(out))
        self.attention.run_with_iobinding(b)
        return out
