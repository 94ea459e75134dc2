"""Core ML backend (macOS 15 / iOS 18): the bundle's model.mlpackage with its KV cache in Core ML states.

The model (converters/export_coreml.py) takes `tokens` [1, T] for T in its enumerated chunk sizes,
`position` (the first token's position) and `last` (the row whose logits to return), and writes the
tokens' keys and values into its states itself: a decode step passes three small arrays and
nothing of cache size crosses the API. Prompts run in the largest chunk, the last one padded (the
padding's cache rows sit after the prompt, masked until real tokens overwrite them).

Core ML predicts only on Apple platforms. Anything with coremltools' `make_state()` /
`predict(inputs, state=...)` can stand in for the model (the tests run the exact torch module
handed to coremltools that way on Linux).
"""

from __future__ import annotations

import sys

import numpy as np

from ondevice.bundle import Bundle
from ondevice.errors import BundleError, ContextOverflowError, OndeviceError

COMPUTE_UNITS = ("all", "cpu_and_ne", "cpu_and_gpu", "cpu_only")


def load_mlmodel(path, compute_units: str = "all"):
    """The compiled Core ML model at path (an .mlpackage); macOS only."""
    if compute_units not in COMPUTE_UNITS:
        raise ValueError(f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, not {compute_units!r}")
    if sys.platform != "darwin":
        raise OndeviceError(f"backend='coreml' runs on macOS 15+ (Core ML predicts only on Apple platforms), "
                            f"not on {sys.platform}; use backend='onnx' (every bundle carries the ONNX graph)")
    try:
        import coremltools as ct
    except ImportError as e:
        raise OndeviceError("backend='coreml' needs coremltools: pip install 'ondevice[coreml]'") from e
    try:
        return ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units.upper()))
    except Exception as e:  # coremltools raises plain Exception/RuntimeError for unloadable packages
        raise BundleError(f"Core ML cannot load {path}: {e}") from e


class CoreMLBackend:
    """Runs the bundle's Core ML model: forward (prefill in chunks), decode_one; Backend protocol."""

    def __init__(self, bundle: Bundle, model=None, compute_units: str = "all"):
        spec = bundle.manifest["backends"].get("coreml")
        if not isinstance(spec, dict):
            raise BundleError(f"{bundle.path}: the bundle has no Core ML model; convert with --target onnx,coreml")
        self.model = model if model is not None else load_mlmodel(bundle.file(spec["graph"]), compute_units)
        self.state = self.model.make_state()
        self.slots = int(spec["kv_cache"]["slots"])
        self.chunks = sorted(int(c) for c in spec["chunks"])
        if self.chunks[0] != 1:
            raise BundleError(f"{bundle.path}: the Core ML model has no single-token input; re-convert it")
        self.max_context = min(bundle.max_context, self.slots)
        self.vocab_size = int(bundle.config["vocab_size"])
        self.capacity = self.slots  # the states are allocated with the model: static shapes
        self.providers = [f"Core ML ({compute_units})"]
        self.chunk_size = self.chunks[-1]
        self.precision = spec.get("precision", {})
        self._position = np.zeros(1, np.int32)
        self._last = np.zeros(1, np.int32)
        self._decode_tokens = np.zeros((1, 1), np.int32)

    def ensure_capacity(self, needed: int) -> None:
        if needed > self.max_context:
            raise ContextOverflowError(f"{needed} tokens do not fit the Core ML model's context of {self.max_context}")

    def _predict(self, tokens: np.ndarray, position: int, last: int) -> np.ndarray:
        self._position[0], self._last[0] = position, last
        out = self.model.predict({"tokens": tokens, "position": self._position, "last": self._last}, state=self.state)
        return np.asarray(out["logits"], np.float32).reshape(1, -1)

    def decode_one(self, token_id: int, past_len: int) -> np.ndarray:
        """One token at position past_len; logits [1, vocab]."""
        self.ensure_capacity(past_len + 1)
        self._decode_tokens[0, 0] = token_id
        return self._predict(self._decode_tokens, past_len, 0)

    def forward(self, token_ids: np.ndarray | list[int], past_len: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions past_len..; logits [1, vocab] of the last one (all_logits: [T, vocab],
        token by token, since the model returns one row per call)."""
        ids = np.asarray(token_ids, np.int64).reshape(-1)
        self.ensure_capacity(past_len + len(ids))
        if all_logits:
            return np.concatenate([self.decode_one(int(t), past_len + j) for j, t in enumerate(ids)])
        logits, start = None, 0
        while start < len(ids):
            at, left = past_len + start, len(ids) - start
            # the smallest chunk that holds what is left, else the largest; padding must fit the slots
            size = next((c for c in self.chunks if c >= left), self.chunks[-1])
            if at + size > self.slots:
                size = max(c for c in self.chunks if c <= min(left, self.slots - at))
            n = min(size, left)
            tokens = np.zeros((1, size), np.int32)
            tokens[0, :n] = ids[start:start + n]
            logits = self._predict(tokens, at, n - 1)
            start += n
        return logits

    def run(self, token_ids, past_len: int, positions=None, bias=None, all_logits: bool = True) -> np.ndarray:
        if positions is not None or bias is not None:
            raise OndeviceError("token-tree verification (speculative decoding) needs the ONNX backend")
        return self.forward(token_ids, past_len, all_logits=all_logits)
