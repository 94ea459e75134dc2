"""ONNX Runtime backend: one session, a KV cache preallocated and updated in place.

Past and present KV are bound to the same OrtValues (GroupQueryAttention's shared buffer), so a
step writes its new keys/values into the cache and nothing is copied. The decode step's inputs
and its logits output are preallocated OrtValues over numpy arrays that are rewritten in place:
a decode step is one `run_with_iobinding` with no allocation of cache size.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from ondevice.bundle import Bundle
from ondevice.errors import BundleError, ContextOverflowError, InvalidArgumentError, ProviderError
from ondevice.runtimes.memory import release_file_pages


# The decoder-graph contract (the manifest lists each graph's inputs and outputs).
REQUIRED_INPUTS = {"input_ids", "seqlens_k", "total_sequence_length", "logits_from", "position_ids",
                   "attention_bias", "query_seqlens"}
PREFILL_CHUNK = 512  # longer prompts run in chunks: bounds the [T, past + T] attention bias


# Two sessions that take turns (a draft and its target) must not keep each other's cores busy:
# "shared" runs both on one process-wide thread pool (possible only before ORT's first session),
# "sleep" gives each its own pool whose threads sleep between runs; "spin" (one model) keeps them hot.
_process = {"sessions": 0, "shared_threads": None}


def share_thread_pool(threads: int | None) -> bool:
    """Make one thread pool for every session created from now on, if ORT can still do so."""
    threads = threads or min(os.cpu_count() or 1, 4)
    if _process["shared_threads"] is None and _process["sessions"] == 0:
        ort.capi.onnxruntime_pybind11_state.set_global_thread_pool_sizes(threads, 1)
        _process["shared_threads"] = threads
    return _process["shared_threads"] == threads


def session_options(threads: int | None, threading: str = "spin", profile_prefix: str | None = None
                    ) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    if profile_prefix:  # ORT writes a JSON trace of every node run (with the provider that ran it)
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ORT caches a memory plan per distinct set of input shapes, and every decode position and prompt
    # length is a new one: the cache and its blocks grew RSS for as long as a model ran (SmolLM2,
    # 300 varied calls: +11.4 MB of heap with it, +2.8 MB without; decode and prefill speed the same)
    opts.enable_mem_pattern = False
    if threading == "shared":
        opts.use_per_session_threads = False
        return opts
    opts.intra_op_num_threads = threads or min(os.cpu_count() or 1, 4)
    opts.inter_op_num_threads = 1
    if threading == "sleep":
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts



# -- execution providers: ORT itself only warns about one it lacks and runs on the CPU -------------

def provider_names(providers: list) -> list[str]:
    """The names in a provider list whose entries are names or (name, options) pairs."""
    return [p[0] if isinstance(p, (tuple, list)) else p for p in providers]


def check_providers(providers: list | None) -> None:
    """Refuse a provider list that names a provider ONNX Runtime does not know or this build lacks:
    ProviderError, listing the providers this build has."""
    if providers is None:
        return
    if isinstance(providers, str) or not isinstance(providers, (list, tuple)):
        raise InvalidArgumentError(f"providers must be a list of execution provider names such as "
                                   f"['CPUExecutionProvider'], not {providers!r}")
    available = ort.get_available_providers()
    for name in provider_names(providers):
        if name not in available:
            raise ProviderError(_not_available(name, available))


def _not_available(name: object, available: list[str]) -> str:
    have = ", ".join(available)
    known = ort.get_all_providers()
    if name in known:
        return (f"execution provider {name} is not available in this onnxruntime build, which has {have}: "
                "install an onnxruntime package built with it, or ask for one of these")
    by_lower = {k.lower(): k for k in known}  # 'cuda', 'QnnExecutionProvider' -> the real name
    key = str(name).lower()
    guess = by_lower.get(key) or by_lower.get(key + "executionprovider")
    hint = f" (did you mean {guess!r}?)" if guess else ""
    return f"{name!r} is not an ONNX Runtime execution provider{hint}; this build has {have}"


def dropped_providers(session: ort.InferenceSession | None, providers: list | None) -> list[str]:
    """The requested providers a session does not run on: ORT leaves out one that fails to start (it
    prints a note and goes on with the CPU)."""
    if session is None or not providers:
        return []
    used = set(session.get_providers())
    return [name for name in provider_names(providers) if name not in used]


class OnnxBackend:
    """Runs the bundle's decoder graph over T new tokens at a time."""

    def __init__(self, bundle: Bundle, threads: int | None = None, providers: list | None = None,
                 capacity: int = 256, threading: str = "spin", profile_prefix: str | None = None,
                 main_graph: bool = True):
        """main_graph=False: no session of the one-shot graph (it holds the whole FFN); every step then
        runs through `flash_layers`, which the caller sets (ondevice.load with a DRAM budget)."""
        spec = bundle.manifest["backends"].get("onnx")
        if spec is None:
            raise BundleError(f"{bundle.path}: the bundle has no ONNX graph")
        kv = spec["kv_cache"]  # read_bundle checked the types and ranges of what is read here
        inputs = {i["name"] for i in spec.get("inputs", [])}
        missing = sorted(REQUIRED_INPUTS - inputs)
        if missing or not kv.get("shared_past_present"):
            raise BundleError(f"{bundle.path}: the ONNX graph's signature is not one this runtime drives "
                              f"(missing inputs {missing}); re-convert the model with this version")
        self.layers, self.kv_heads, self.head_dim = kv["layers"], kv["num_kv_heads"], kv["head_dim"]
        self.max_context = bundle.max_context
        self.vocab_size = bundle.logits_width() or int(bundle.config["vocab_size"])  # a draft's head may be trimmed
        self.session: ort.InferenceSession | None = None
        if main_graph:
            try:
                self.session = ort.InferenceSession(os.fspath(bundle.file(spec["graph"])),
                                                    sess_options=session_options(threads, threading, profile_prefix),
                                                    providers=providers or ["CPUExecutionProvider"])
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise BundleError(f"{bundle.path}: ONNX Runtime cannot load the graph: {e}") from e
            _process["sessions"] += 1
            release_file_pages(bundle.path)  # prepacking read every weight; the packed copies are what runs
        if self.session is not None:
            check_graph_signature(bundle, self.session, self.layers, self.kv_heads, self.head_dim, self.vocab_size)
        # the execution providers that ran it
        self.providers: list[str] = self.session.get_providers() if self.session else ["CPUExecutionProvider"]
        self.requested_providers = providers
        self.chunk_size: int | None = None  # set: prefill runs in fixed-size padded chunks
        self.static_shapes = False  # chunks' attention spans the whole cache: identical shapes every call
        self._chunk_bias: np.ndarray | None = None
        self.split_prefill = None  # set: prompts prefill through the split graphs (runtimes/split_prefill.py)
        self.flash_layers = None  # set: every step runs layer by layer, the MLPs outside (runtimes/flash_layers.py)
        self.int8_session: ort.InferenceSession | None = None  # set by use_int8_prefill: chunks run on it
        self._int8: ort.IOBinding | None = None
        self.capacity = 0
        self._kv_arrays: list[np.ndarray] = []  # the cache; ORT reads and writes them in place
        self._kv: list[ort.OrtValue] = []
        # Decode-step buffers: ORT reads and writes these numpy arrays directly.
        self._ids = np.zeros((1, 1), np.int64)
        self._seqlens = np.zeros((1,), np.int32)
        self._total = np.zeros((), np.int32)
        self._from = np.zeros((1,), np.int64)
        self._pos = np.zeros((1, 1), np.int64)
        self._one = np.ones((1,), np.int32)
        self._no_bias = np.zeros((1, 1, 1, 0), np.float32)  # grown with the capacity; a view per step
        self._logits = np.zeros((1, 1, self.vocab_size), np.float32)
        self._decode = self._prefill = None
        if self.session is not None:
            self._decode = self.session.io_binding()
            self._prefill = self.session.io_binding()
            for name, arr in (("input_ids", self._ids), ("seqlens_k", self._seqlens),
                              ("total_sequence_length", self._total), ("logits_from", self._from),
                              ("position_ids", self._pos), ("query_seqlens", self._one)):
                self._decode.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
            self._decode.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits))
        self.ensure_capacity(min(capacity, self.max_context))

    def ensure_capacity(self, needed: int) -> None:
        """Grow the KV buffers to hold `needed` positions (rare: sized up front, doubled on growth)."""
        if needed <= self.capacity:
            return
        if needed > self.max_context:
            raise ContextOverflowError(f"{needed} tokens do not fit the context of {self.max_context}")
        new_cap = min(self.max_context, max(needed, 2 * self.capacity, 64))
        old, old_cap = self._kv_arrays, self.capacity
        self._kv_arrays = []
        for i in range(2 * self.layers):
            buf = np.zeros((1, self.kv_heads, new_cap, self.head_dim), np.float32)
            if old:
                buf[:, :, :old_cap] = old[i][:, :, :old_cap]
            self._kv_arrays.append(buf)
        self._kv = [ort.OrtValue.ortvalue_from_numpy(buf) for buf in self._kv_arrays]
        self._no_bias = np.zeros((1, 1, 1, new_cap), np.float32)
        self.capacity = new_cap
        for binding in (b for b in (self._decode, self._prefill, self._int8) if b is not None):
            for i in range(self.layers):
                k, v = self._kv[2 * i], self._kv[2 * i + 1]
                binding.bind_ortvalue_input(f"past_key.{i}", k)
                binding.bind_ortvalue_input(f"past_value.{i}", v)
                binding.bind_ortvalue_output(f"present_key.{i}", k)
                binding.bind_ortvalue_output(f"present_value.{i}", v)

    def kv_cache(self) -> list[ort.OrtValue]:
        """The cache buffers: layer i's keys at 2i, its values at 2i + 1 (replaced when the cache grows)."""
        return self._kv

    def use_int8_prefill(self, bundle: Bundle, threads: int | None = None, providers: list | None = None,
                         threading: str = "spin") -> None:
        """Prefill chunks through the bundle's int8 graph (converted with --int8-prefill) from now on;
        decoding and token-tree verification stay on the float graph. Both sessions read and write
        the same KV buffers (the int8 graph has the float graph's signature and cache layout)."""
        spec = bundle.manifest["backends"]["onnx"].get("prefill_int8")
        if spec is None:
            raise BundleError(f"{bundle.path}: the bundle has no int8 prefill graph; re-convert it with "
                              "--int8-prefill")
        try:
            # the graph repeats QuantizeLinear per consumer so each QDQ MatMul fuses into an int8 kernel;
            # common-subexpression elimination would merge the copies back and undo the fusion
            self.int8_session = ort.InferenceSession(os.fspath(bundle.file(spec["graph"])),
                                                     sess_options=session_options(threads, threading),
                                                     providers=providers or ["CPUExecutionProvider"],
                                                     disabled_optimizers=["CommonSubexpressionElimination"])
        except Exception as e:
            raise BundleError(f"{bundle.path}: ONNX Runtime cannot load the int8 prefill graph: {e}") from e
        _process["sessions"] += 1
        release_file_pages(bundle.path)  # as for the float graph: the prepacked copies are what runs
        self._int8 = self.int8_session.io_binding()
        for i in range(self.layers):
            k, v = self._kv[2 * i], self._kv[2 * i + 1]
            self._int8.bind_ortvalue_input(f"past_key.{i}", k)
            self._int8.bind_ortvalue_input(f"past_value.{i}", v)
            self._int8.bind_ortvalue_output(f"present_key.{i}", k)
            self._int8.bind_ortvalue_output(f"present_value.{i}", v)
        self.chunk_size = self.chunk_size or int(spec.get("chunk_sizes", [PREFILL_CHUNK])[0])

    def forward(self, token_ids: np.ndarray | list[int], past_len: int, all_logits: bool = False) -> np.ndarray:
        """Run len(token_ids) tokens at positions past_len..; returns logits [L, vocab]
        (L = 1, the last position, unless all_logits). Writes their KV into the cache."""
        ids = np.asarray(token_ids, np.int64).reshape(-1)
        t = len(ids)
        self.ensure_capacity(past_len + t)
        if t == 1 and not all_logits:
            return self.decode_one(int(ids[0]), past_len)
        if self.split_prefill is not None and not all_logits and self.split_prefill.fits(t, past_len):
            return self.split_prefill.run(ids, past_len)
        size = self.chunk_size or PREFILL_CHUNK
        outs = []
        for start in range(0, t, size):
            chunk = ids[start:start + size]
            wanted = all_logits or start + len(chunk) == t
            # with the int8 graph, a partial chunk (a short prompt's only one) runs on the float graph
            # unpadded: cheaper on a CPU than a padded int8 chunk, and exact
            partial_int8 = self.int8_session is not None and len(chunk) < size
            if self.chunk_size and past_len + start + size <= self.max_context and not partial_int8:
                logits = self.run_chunk(chunk, past_len + start, size, all_logits)
            else:
                logits = self.run(chunk, past_len + start, all_logits=all_logits)
            if wanted:
                outs.append(logits)
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def run_chunk(self, token_ids: np.ndarray, past_len: int, size: int, all_logits: bool = False) -> np.ndarray:
        """Up to `size` tokens through the graph with static shapes: the chunk is padded to `size` rows
        (query_seqlens says how many are real), the attention bias spans the whole cache capacity.
        Every call has the same input shapes, as an NPU's precompiled graph needs; the padding rows'
        cache slots are overwritten by the next chunk or ignored (past seqlens_k)."""
        n = len(token_ids)
        self.ensure_capacity(past_len + size)
        ids = np.zeros((1, size), np.int64)
        ids[0, :n] = token_ids
        positions = np.minimum(np.arange(past_len, past_len + size, dtype=np.int64), self.max_context - 1)
        # static: attention spans the whole cache (one shape for every chunk, for NPU graphs);
        # otherwise only past + size keys, which is cheaper on a CPU
        total = self.capacity if self.static_shapes else past_len + size
        if self._chunk_bias is None or self._chunk_bias.shape[-1] < total or self._chunk_bias.shape[2] != size:
            self._chunk_bias = np.zeros((1, 1, size, self.capacity), np.float32)
        session, b = (self.int8_session, self._int8) if self.int8_session else (self.session, self._prefill)
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("seqlens_k", np.array([past_len + n - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        b.bind_cpu_input("logits_from", np.array([0 if all_logits else n - 1], np.int64))
        b.bind_cpu_input("position_ids", positions.reshape(1, size))
        b.bind_cpu_input("attention_bias", np.ascontiguousarray(self._chunk_bias[..., :total]))
        b.bind_cpu_input("query_seqlens", np.array([n], np.int32))
        rows = size if all_logits else size - n + 1
        logits = np.empty((1, rows, self.vocab_size), np.float32)
        b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        session.run_with_iobinding(b)
        return logits[0, :n] if all_logits else logits[0, :1]

    def run(self, token_ids: np.ndarray, past_len: int, positions: np.ndarray | None = None,
            bias: np.ndarray | None = None, all_logits: bool = True) -> np.ndarray:
        """One graph call over T tokens written to cache slots past_len..past_len+T-1.

        positions [T] (default: the slots' own positions) and bias [T, past_len + T] (added to the
        attention scores; default zeros; the graph applies causality by slot on top) let T tree nodes
        be verified at once: a node's position is its depth, its bias row -inf off its ancestors."""
        if self.flash_layers is not None:
            return self.flash_layers.run(token_ids, past_len, positions, bias, all_logits)
        t = len(token_ids)
        total = past_len + t
        self.ensure_capacity(total)
        if positions is None:
            positions = np.arange(past_len, total, dtype=np.int64)
        if bias is None:
            bias = np.zeros((t, total), np.float32)
        b = self._prefill
        b.bind_cpu_input("input_ids", np.asarray(token_ids, np.int64).reshape(1, t))
        b.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        b.bind_cpu_input("logits_from", np.array([0 if all_logits else t - 1], np.int64))
        b.bind_cpu_input("position_ids", np.asarray(positions, np.int64).reshape(1, t))
        b.bind_cpu_input("attention_bias", np.ascontiguousarray(bias, np.float32).reshape(1, 1, t, total))
        b.bind_cpu_input("query_seqlens", np.array([t], np.int32))
        logits = np.empty((1, t if all_logits else 1, self.vocab_size), np.float32)
        b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(b)
        return logits[0]

    def move_kv(self, src: list[int], dst: list[int]) -> None:
        """Copy the cache entries of slots src to slots dst (the accepted path of a verified tree);
        a few positions per layer, in place."""
        pairs = [(s, d) for s, d in zip(src, dst) if s != d]
        if not pairs:
            return
        s_idx, d_idx = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        for buf in self._kv_arrays:
            buf[:, :, d_idx] = buf[:, :, s_idx]

    def decode_one(self, token_id: int, past_len: int) -> np.ndarray:
        """One token at position past_len; returns a view of the logits buffer [1, vocab]
        (overwritten by the next step)."""
        if self.flash_layers is not None:
            return self.flash_layers.run([token_id], past_len, all_logits=False)
        self.ensure_capacity(past_len + 1)
        self._ids[0, 0] = token_id
        self._seqlens[0] = past_len
        self._total[()] = past_len + 1
        self._pos[0, 0] = past_len
        self._decode.bind_cpu_input("attention_bias", self._no_bias[..., :past_len + 1])
        self.session.run_with_iobinding(self._decode)
        return self._logits[0]


def check_graph_signature(bundle: Bundle, session: ort.InferenceSession, layers: int, kv_heads: int,
                          head_dim: int, vocab: int) -> None:
    """Refuse a manifest that disagrees with its graph (layers, cache shape, logits width, inputs): the
    cache is allocated from the manifest's numbers, and a mismatch would fail inside ORT at the first step."""
    try:
        inputs = {i.name: i.shape for i in session.get_inputs()}
        outputs = {o.name: o.shape for o in session.get_outputs()}
    except UnicodeDecodeError as e:  # a damaged graph that ORT still loads: a name in it is not text
        raise BundleError(f"{bundle.path}: the ONNX graph is corrupt (a name in its signature is not UTF-8: {e}); "
                          "re-convert the model") from e
    problems = []
    past = [n for n in inputs if n.startswith(("past_key.", "past_value."))]
    if len(past) != 2 * layers:
        problems.append(f"the graph has {len(past) // 2} cache layers, the manifest says {layers}")
    else:
        for i in range(layers):
            for kind in ("key", "value"):
                shapes = [inputs.get(f"past_{kind}.{i}"), outputs.get(f"present_{kind}.{i}")]
                if any(s is None or len(s) != 4 or s[1] != kv_heads or s[3] != head_dim for s in shapes):
                    problems.append(f"past_{kind}.{i}/present_{kind}.{i} are not [1, {kv_heads}, capacity, "
                                    f"{head_dim}] as the manifest says")
    unknown = sorted(set(inputs) - REQUIRED_INPUTS - set(past))
    if unknown or REQUIRED_INPUTS - set(inputs):
        problems.append(f"its inputs {sorted(inputs)} are not the decoder's")
    logits = outputs.get("logits")
    if not logits or (isinstance(logits[-1], int) and logits[-1] != vocab):
        problems.append(f"its logits {logits} are not {vocab} wide as the manifest says")
    if problems:
        raise BundleError(f"{bundle.path}: the manifest does not match its ONNX graph ({'; '.join(problems[:3])}); "
                          "re-convert the model")


def node_placement(bundle: Bundle, providers: list | None = None, threads: int | None = None) -> dict[str, int]:
    """Which execution provider ran how many nodes of the graph: one profiled prefill + decode step
    in a separate session (ORT's trace names each node's provider)."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        backend = OnnxBackend(bundle, threads=threads, providers=providers, capacity=64,
                              profile_prefix=os.path.join(tmp, "placement"))
        backend.forward([0, 1], 0)
        backend.decode_one(2, 2)
        events = json.loads(open(backend.session.end_profiling()).read())
    nodes: dict[str, set] = {}
    for e in events:
        provider = e.get("args", {}).get("provider")
        if e.get("cat") == "Node" and provider:
            nodes.setdefault(provider, set()).add(e["name"].rsplit("_kernel_time", 1)[0])
    return {provider: len(names) for provider, names in nodes.items()}
