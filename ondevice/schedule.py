"""Chunked prefill as a graph of tasks on two processors, its schedules, and a simulator.

mllm-NPU's block-level out-of-order execution (PAPERS.md section 1). A prompt of N chunks through L
decoder layers is a DAG of tasks:

    embed(c)                                                   npu
    pre(c, l)   after post(c, l-1) (embed(c) for l = 0)        npu   norm'd input -> QKV projection
    attn(c, l)  after pre(c, l) and attn(c-1, l)               cpu   attention over the KV cache; chunk c
                                                                     reads the keys chunk c-1 wrote
    post(c, l)  after attn(c, l)                               npu   O proj + MLP + norms
    head(N-1)   after post(N-1, L-1)                           npu   logits of the last token

In order (chunk by chunk, layer by layer) every task waits for the one before: the NPU idles while
the CPU attends and the other way round. Out of order is list scheduling: whenever a processor is
free it takes a ready task, the most critical one first (the longest remaining path to the end, its
"upward rank"), so while the CPU attends over chunk c at layer l, the NPU runs chunk c+1's layers
below l. `simulate` plays either policy with given task latencies: measured on this machine, or
from `DeviceModel`, a cost model of a device profile (every assumption written in `assumptions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

NPU, CPU = "npu", "cpu"
PROCESSORS = (NPU, CPU)
POLICIES = ("in-order", "out-of-order")


@dataclass(frozen=True, order=True)
class Task:
    kind: str  # "embed" | "pre" | "attn" | "post" | "head"
    chunk: int
    layer: int = 0

    @property
    def processor(self) -> str:
        return CPU if self.kind == "attn" else NPU

    def __str__(self) -> str:
        return f"{self.kind}({self.chunk},{self.layer})" if self.kind in ("pre", "attn", "post") else \
            f"{self.kind}({self.chunk})"


Dag = dict[Task, tuple[Task, ...]]  # task -> the tasks it waits for; insertion order = in-order sequence
Latencies = Mapping[Task, float] | Callable[[Task], float]


def prefill_dag(chunks: int, layers: int) -> Dag:
    """Every task of a prefill of `chunks` chunks through `layers` layers and what it waits for, in
    in-order sequence (a topological order)."""
    if chunks < 1 or layers < 1:
        raise ValueError("a prefill has at least one chunk and one layer")
    deps: Dag = {}
    for c in range(chunks):
        deps[Task("embed", c)] = ()
        for layer in range(layers):
            below = Task("embed", c) if layer == 0 else Task("post", c, layer - 1)
            deps[Task("pre", c, layer)] = (below,)
            earlier = (Task("attn", c - 1, layer),) if c else ()
            deps[Task("attn", c, layer)] = (Task("pre", c, layer), *earlier)
            deps[Task("post", c, layer)] = (Task("attn", c, layer),)
    deps[Task("head", chunks - 1)] = (Task("post", chunks - 1, layers - 1),)
    return deps


@dataclass(frozen=True)
class Slot:
    task: Task
    start: float
    end: float


@dataclass
class Schedule:
    """A timed run of a DAG: each task's slot on its processor."""

    slots: list[Slot]  # by start time
    makespan: float
    busy: dict[str, float]
    policy: str = ""

    @property
    def idle(self) -> dict[str, float]:
        return {p: self.makespan - b for p, b in self.busy.items()}

    def order(self, processor: str) -> list[Task]:
        """The tasks the processor runs, in the order it runs them."""
        return [s.task for s in self.slots if s.task.processor == processor]

    def summary(self) -> dict:
        return {"policy": self.policy, "makespan_s": self.makespan, "busy_s": dict(self.busy),
                "idle_s": self.idle, "tasks": len(self.slots)}


def _as_function(latencies: Latencies) -> Callable[[Task], float]:
    return latencies.__getitem__ if isinstance(latencies, Mapping) else latencies


def simulate(tasks: Dag, latencies: Latencies, policy: str = "out-of-order",
             orders: dict[str, list[Task]] | None = None) -> Schedule:
    """Play the DAG on one NPU and one CPU with these task latencies (seconds).

    policy "in-order": each processor takes its tasks in the DAG's sequence (chunk by chunk, layer by
    layer); "out-of-order": list scheduling by upward rank (see the module doc). `orders` replays
    given per-processor orders instead (e.g. one found with other latencies)."""
    lat = _as_function(latencies)
    if orders is not None:
        return _replay(tasks, lat, orders, policy or "replay")
    if policy == "in-order":
        return _replay(tasks, lat, {p: [t for t in tasks if t.processor == p] for p in PROCESSORS}, policy)
    if policy == "out-of-order":
        return _list_schedule(tasks, lat)
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")


def _replay(tasks: Dag, lat: Callable[[Task], float], orders: dict[str, list[Task]], policy: str) -> Schedule:
    """Each processor runs its list in order, a task as soon as the processor is free and its inputs are done."""
    if sorted(t for o in orders.values() for t in o) != sorted(tasks):
        raise ValueError("the orders must hold every task of the DAG exactly once")
    end: dict[Task, float] = {}
    free = dict.fromkeys(orders, 0.0)
    pos = dict.fromkeys(orders, 0)
    slots: list[Slot] = []
    while len(end) < len(tasks):
        moved = False
        for p, order in orders.items():
            while pos[p] < len(order) and all(d in end for d in tasks[order[pos[p]]]):
                t = order[pos[p]]
                start = max([free[p], *(end[d] for d in tasks[t])])
                end[t] = free[p] = start + lat(t)
                slots.append(Slot(t, start, end[t]))
                pos[p] += 1
                moved = True
        if not moved:
            raise ValueError("the orders deadlock: a processor's next task waits for one queued behind another")
    return _schedule(slots, policy)


def upward_ranks(tasks: Dag, lat: Callable[[Task], float]) -> dict[Task, float]:
    """Each task's latency plus the longest chain of latencies after it (its critical path to the end)."""
    successors: dict[Task, list[Task]] = {t: [] for t in tasks}
    for t, deps in tasks.items():
        for d in deps:
            successors[d].append(t)
    rank: dict[Task, float] = {}
    for t in reversed(list(tasks)):  # the DAG's sequence is topological
        rank[t] = lat(t) + max((rank[s] for s in successors[t]), default=0.0)
    return rank


def _list_schedule(tasks: Dag, lat: Callable[[Task], float]) -> Schedule:
    rank = upward_ranks(tasks, lat)
    sequence = {t: i for i, t in enumerate(tasks)}
    waiting = {t: len(deps) for t, deps in tasks.items()}
    successors: dict[Task, list[Task]] = {t: [] for t in tasks}
    for t, deps in tasks.items():
        for d in deps:
            successors[d].append(t)
    available: dict[str, dict[Task, float]] = {p: {} for p in PROCESSORS}  # ready task -> when its inputs are done
    for t, n in waiting.items():
        if n == 0:
            available[t.processor][t] = 0.0
    end: dict[Task, float] = {}
    free = dict.fromkeys(PROCESSORS, 0.0)
    slots: list[Slot] = []
    while len(end) < len(tasks):
        # the processor that can start something soonest takes the most critical task ready by then
        best = None
        for p in PROCESSORS:
            if available[p]:
                at = max(free[p], min(available[p].values()))
                if best is None or at < best[0]:
                    best = (at, p)
        if best is None:
            raise ValueError("the DAG has a cycle")
        at, p = best
        ready = [t for t, when in available[p].items() if when <= at]
        t = max(ready, key=lambda t: (rank[t], -sequence[t]))
        del available[p][t]
        end[t] = free[p] = at + lat(t)
        slots.append(Slot(t, at, end[t]))
        for s in successors[t]:
            waiting[s] -= 1
            if waiting[s] == 0:
                available[s.processor][s] = max(end[d] for d in tasks[s])
    return _schedule(slots, "out-of-order")


def _schedule(slots: list[Slot], policy: str) -> Schedule:
    slots.sort(key=lambda s: (s.start, s.end))
    busy = dict.fromkeys(PROCESSORS, 0.0)
    for s in slots:
        busy[s.task.processor] += s.end - s.start
    return Schedule(slots, max((s.end for s in slots), default=0.0), busy, policy)


# ------------------------------------------------------------------------------------ cost model

@dataclass(frozen=True)
class ModelShape:
    """The dimensions that set a decoder's prefill work (a bundle manifest's config)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, c: dict) -> "ModelShape":
        return cls(c["num_layers"], c["hidden_size"], c["intermediate_size"], c["num_heads"], c["num_kv_heads"],
                   c["head_dim"], c["vocab_size"])

    def weights(self, kind: str) -> int:
        """Weights a task of this kind multiplies by, per token."""
        q = self.heads * self.head_dim
        return {"pre": self.hidden * (q + 2 * self.kv_heads * self.head_dim),
                "post": q * self.hidden + 3 * self.hidden * self.intermediate,
                "head": self.vocab * self.hidden, "embed": 0, "attn": 0}[kind]

    def attention_flops(self, chunk: int, past: int) -> float:
        """QK^T and PV of `chunk` queries over the past plus the chunk's own keys (causal: half of them)."""
        keys = past + (chunk + 1) / 2
        return 4.0 * chunk * keys * self.heads * self.head_dim


@dataclass(frozen=True)
class DeviceModel:
    """Task latencies of a device, from a roofline per task: max(work / compute rate, bytes / bandwidth)
    plus a fixed cost per subgraph call. Linear subgraphs run on the NPU (int8), attention on the CPU
    (float). `assumptions` says where every figure comes from."""

    npu_ops_per_s: float
    cpu_flops_per_s: float
    memory_bytes_per_s: float
    npu_call_s: float
    cpu_call_s: float
    npu_weight_bytes: float = 1.0  # int8 weights on the NPU (W8A8, as mllm-NPU)
    kv_bytes: float = 4.0  # float32 cache, as the ONNX graph keeps it
    assumptions: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_profile(cls, profile: dict, *, npu_utilisation: float = 0.25, cpu_core_gflops: float = 50.0,
                     cpu_utilisation: float = 0.2, attention_cores: int | None = None,
                     memory_efficiency: float = 0.6, npu_call_ms: float = 0.1, cpu_call_ms: float = 0.02
                     ) -> "DeviceModel":
        """The cost model of a device profile (profiles/*.json); the keywords are the assumptions the
        profile has no figure for (defaults: estimates, stated in `assumptions`)."""
        npu = profile.get("npu") or {}
        if not npu.get("int8_tops"):
            raise ValueError(f"profile {profile.get('name')} has no NPU int8 TOPS figure to simulate with")
        cores = attention_cores or profile["cpu"]["cores"]["big"]
        bandwidth = profile.get("memory_bandwidth_gb_s")
        if not bandwidth:
            raise ValueError(f"profile {profile.get('name')} has no memory bandwidth figure to simulate with")
        sources = profile.get("sources", {})

        def cite(key: str) -> str:
            s = sources.get(key, {})
            return f"{s.get('kind', '?')}: {s.get('ref', '?')}"

        return cls(
            npu_ops_per_s=npu["int8_tops"] * 1e12 * npu_utilisation,
            cpu_flops_per_s=cores * cpu_core_gflops * 1e9 * cpu_utilisation,
            memory_bytes_per_s=bandwidth * 1e9 * memory_efficiency,
            npu_call_s=npu_call_ms / 1e3, cpu_call_s=cpu_call_ms / 1e3,
            assumptions={
                "npu.int8_tops": f"{npu['int8_tops']} TOPS ({cite('npu.int8_tops')})",
                "npu_utilisation": f"{npu_utilisation:g} of peak on the linear subgraphs (estimate)",
                "attention_cores": f"{cores} cores run attention ({'profile cpu.cores.big: ' + cite('cpu.cores') if attention_cores is None else 'given'})",
                "cpu_core_gflops": f"{cpu_core_gflops:g} fp32 GFLOP/s peak per core (estimate: ~3 GHz x 16 FLOP/cycle, "
                                   "two 128-bit FMA pipes)",
                "cpu_utilisation": f"{cpu_utilisation:g} of peak in attention (estimate: softmax and small head_dim matmuls)",
                "memory_bandwidth": f"{bandwidth} GB/s x {memory_efficiency:g} sustained "
                                    f"({cite('memory_bandwidth_gb_s')}; the factor is an estimate)",
                "npu_call": f"{npu_call_ms:g} ms per NPU subgraph call: launch and CPU-NPU sync (estimate)",
                "cpu_call": f"{cpu_call_ms:g} ms per CPU attention call (estimate)",
                "weights": "int8 weights on the NPU (1 byte each), float32 KV cache read by the CPU",
            })

    def latency(self, task: Task, shape: ModelShape, chunk: int, past: int = 0) -> float:
        """Seconds for `task` of a prefill in chunks of `chunk` tokens after `past` cached tokens."""
        if task.kind == "attn":
            before = past + task.chunk * chunk
            flops = shape.attention_flops(chunk, before)
            kv = 2 * (before + chunk) * shape.kv_heads * shape.head_dim * self.kv_bytes
            acts = chunk * (shape.heads + 2 * shape.kv_heads + shape.heads) * shape.head_dim * 4
            return self.cpu_call_s + max(flops / self.cpu_flops_per_s, (kv + acts) / self.memory_bytes_per_s)
        rows = 1 if task.kind == "head" else chunk
        weights = shape.weights(task.kind)
        ops = 2.0 * rows * weights
        moved = weights * self.npu_weight_bytes + 2 * chunk * shape.hidden * 4  # weights + activations in/out
        return self.npu_call_s + max(ops / self.npu_ops_per_s, moved / self.memory_bytes_per_s)

    def latencies(self, shape: ModelShape, chunk: int, past: int = 0) -> Callable[[Task], float]:
        return lambda task: self.latency(task, shape, chunk, past)


def flop_latencies(shape: ModelShape, chunk: int, past: int = 0) -> Callable[[Task], float]:
    """Latencies proportional to each task's arithmetic (same rate for both processors, a small cost
    per call): the default when nothing was measured, good enough to rank tasks by criticality."""
    def latency(task: Task) -> float:
        if task.kind == "attn":
            work = shape.attention_flops(chunk, past + task.chunk * chunk)
        else:
            work = 2.0 * (1 if task.kind == "head" else chunk) * shape.weights(task.kind)
        return 20e-6 + work / 20e9
    return latency


def chunks_for(tokens: int, chunk: int) -> int:
    return max(1, math.ceil(tokens / chunk))
