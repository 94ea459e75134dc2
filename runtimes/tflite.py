"""LiteRT (TFLite) backend: one interpreter, the KV cache kept in its input tensors.

The bundle's model.tflite (converters/export_tflite.py) has two signatures, `decode` (1 token) and
`prefill` (a fixed chunk, the last one padded). Both read the cache as inputs [1, kv_heads, slots,
head_dim] per layer and output only the new tokens' rows. Each signature is its own subgraph with
its own input tensors, so each has its own copy of the cache; the runtime writes the new rows into
the copy of the signature that ran, and copies to the other one only the rows written since it
last ran (a prompt's rows into the decode copy, once). A decode step writes the token and its
position into the input tensors, invokes the subgraph and writes 2 x layers small rows: nothing of
cache size is copied and nothing is allocated.

The tensors are reached through the interpreter wrapper (subgraph-level AllocateTensors, Invoke and
tensor views, as the wrapper's own SignatureRunner does), because SignatureRunner.__call__ re-sets
every input on each call, which would copy the whole cache per token. The views stay valid because
every shape is static and tensors are allocated once, here.
"""

from __future__ import annotations

import os

import numpy as np

from ondevice.bundle import Bundle
from ondevice.errors import BundleError, ContextOverflowError, OndeviceError

SIGNATURES = ("decode", "prefill")


def interpreter_class():
    """ai-edge-litert's Interpreter, or tflite_runtime's where only that is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise OndeviceError("backend='tflite' needs the LiteRT interpreter: pip install ai-edge-litert "
                                "(or pip install 'ondevice[tflite]')") from None
    return Interpreter


class _Signature:
    """One signature's subgraph and numpy views of its tensors (valid while shapes stay static)."""

    def __init__(self, interpreter, key: str, layers: int):
        self.wrapper = interpreter._interpreter
        self.subgraph = self.wrapper.GetSubgraphIndexFromSignature(key)
        runner = interpreter.get_signature_runner(key)
        self.inputs = {k: v["index"] for k, v in runner.get_input_details().items()}
        self.outputs = {k: v["index"] for k, v in runner.get_output_details().items()}
        names = {"tokens", "input_pos", "last", "logits", *(f"{c}_{i}" for i in range(layers) for c in "kv")}
        missing = sorted(names - set(self.inputs) - set(self.outputs))
        if missing:
            raise BundleError(f"the TFLite model's {key!r} signature lacks {missing}; re-convert the model")
        self.layers = layers
        self.filled = 0  # cache rows of this copy that are current

    def bind(self) -> None:
        """Views of the tensors (after AllocateTensors)."""
        view = lambda index: self.wrapper.tensor(self.wrapper, index, self.subgraph)  # noqa: E731
        self.tokens, self.pos, self.last = (view(self.inputs[n]) for n in ("tokens", "input_pos", "last"))
        self.logits = view(self.outputs["logits"])
        names = [f"{c}_{i}" for i in range(self.layers) for c in "kv"]
        self.cache = [view(self.inputs[n]) for n in names]
        self.new = [view(self.outputs[n]) for n in names]
        for cache in self.cache:  # arena memory: a NaN in a masked slot would still poison the softmax
            cache.fill(0.0)

    def invoke(self) -> None:
        self.wrapper.Invoke(self.subgraph)

    def write_new_rows(self, start: int, n: int) -> None:
        for cache, new in zip(self.cache, self.new):
            cache[:, :, start:start + n] = new[:, :, :n]
        self.filled = start + n


class TFLiteBackend:
    """Runs the bundle's TFLite model: forward (prefill in chunks), decode_one; Backend protocol."""

    def __init__(self, bundle: Bundle, threads: int | None = None):
        spec = bundle.manifest["backends"].get("tflite")
        if not isinstance(spec, dict):
            raise BundleError(f"{bundle.path}: the bundle has no TFLite model; convert with --target onnx,tflite")
        Interpreter = interpreter_class()
        kv = spec["kv_cache"]
        self.layers, self.slots = int(kv["layers"]), int(kv["slots"])
        self.chunk = int(spec["signatures"]["prefill"]["tokens"])
        self.precision = spec.get("precision", {})
        try:
            self.interpreter = Interpreter(model_path=os.fspath(bundle.file(spec["graph"])),
                                           num_threads=threads or min(os.cpu_count() or 1, 4))
        except (ValueError, RuntimeError) as e:
            raise BundleError(f"{bundle.path}: LiteRT cannot load {spec['graph']}: {e}") from e
        missing = set(SIGNATURES) - set(self.interpreter.get_signature_list())
        if missing:
            raise BundleError(f"{bundle.path}: the TFLite model lacks the signatures {sorted(missing)}")
        self._decode, self._prefill = (_Signature(self.interpreter, key, self.layers) for key in SIGNATURES)
        for s in (self._decode, self._prefill):
            s.wrapper.AllocateTensors(s.subgraph)
        for s in (self._decode, self._prefill):
            s.bind()
        self.max_context = min(bundle.max_context, self.slots)
        self.vocab_size = int(self._decode.logits.shape[-1])
        self.capacity = self.slots  # allocated at load: static shapes
        self.providers = ["LiteRT CPU (XNNPACK)"]
        self.chunk_size = self.chunk

    def ensure_capacity(self, needed: int) -> None:
        if needed > self.max_context:
            raise ContextOverflowError(f"{needed} tokens do not fit the TFLite model's context of {self.max_context}")

    def _ready(self, s: _Signature, past_len: int) -> None:
        """Make s's cache copy current up to past_len (rows at and after past_len are rewritten)."""
        other = self._prefill if s is self._decode else self._decode
        s.filled, other.filled = min(s.filled, past_len), min(other.filled, past_len)
        if s.filled < past_len:
            for mine, theirs in zip(s.cache, other.cache):
                mine[:, :, s.filled:past_len] = theirs[:, :, s.filled:past_len]
            s.filled = past_len

    def decode_one(self, token_id: int, past_len: int) -> np.ndarray:
        """One token at position past_len; a view of the logits [1, vocab] (overwritten by the next step)."""
        self.ensure_capacity(past_len + 1)
        s = self._decode
        self._ready(s, past_len)
        s.tokens[0, 0], s.pos[0], s.last[0] = token_id, past_len, 0
        s.invoke()
        s.write_new_rows(past_len, 1)
        return s.logits

    def forward(self, token_ids: np.ndarray | list[int], past_len: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions past_len..; logits [1, vocab] of the last one (all_logits: [T, vocab],
        token by token through the decode signature, which returns one row per call)."""
        ids = np.asarray(token_ids, np.int64).reshape(-1)
        t = len(ids)
        self.ensure_capacity(past_len + t)
        if all_logits:
            return np.stack([self.decode_one(int(tok), past_len + j)[0].copy() for j, tok in enumerate(ids)])
        if t == 1:
            return self.decode_one(int(ids[0]), past_len)
        s = self._prefill
        for start in range(0, t, self.chunk):
            chunk = ids[start:start + self.chunk]
            n, at = len(chunk), past_len + start
            self._ready(s, at)
            s.tokens[0, :n], s.tokens[0, n:] = chunk, 0
            s.pos[:] = np.arange(at, at + self.chunk, dtype=np.int32)  # padding rows come after: never attended
            s.last[0] = n - 1
            s.invoke()
            s.write_new_rows(at, n)
        return s.logits

    def run(self, token_ids, past_len: int, positions=None, bias=None, all_logits: bool = True) -> np.ndarray:
        if positions is not None or bias is not None:
            raise OndeviceError("token-tree verification (speculative decoding) needs the ONNX backend")
        return self.forward(token_ids, past_len, all_logits=all_logits)
