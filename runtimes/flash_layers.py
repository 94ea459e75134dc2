"""Run a bundle layer by layer with the MLPs computed outside ONNX Runtime (flash-resident FFN).

The flash graphs (converters/flash_graphs.py) are the decoder cut at its MLPs. A step runs the
embed graph, then per layer its graph (input norm, attention over the backend's KV buffer, O
projection, post-attention norm) and `mlp(layer, x)` — the caller's MLP over the neurons it holds in
DRAM, given the layer's gate projection of every neuron to choose them — and finally the head graph. The layer graphs read and write the backend's own KV buffers
(bound as past and present, as the one-shot graph does), so any mix of paths shares one cache.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import onnxruntime as ort

from ondevice.bundle import Bundle
from ondevice.errors import BundleError
from ondevice.runtimes.memory import release_file_pages

Mlp = Callable[[int, np.ndarray, np.ndarray], np.ndarray]  # (layer, x [T, hidden], gate [T, inter]) -> [T, hidden]


class FlashLayers:
    def __init__(self, bundle: Bundle, backend, mlp: Mlp, threads: int | None = None,
                 providers: list | None = None):
        spec = bundle.manifest["backends"].get("onnx", {}).get("flash_graphs")
        if spec is None:
            raise BundleError(f"{bundle.path}: the bundle has no flash graphs; convert it with --flash")
        self.backend, self.mlp = backend, mlp
        self.hidden, self.inter = int(bundle.config["hidden_size"]), int(bundle.config["intermediate_size"])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or min(os.cpu_count() or 1, 4)
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = False  # 32 sessions: an arena each would hold their peak activations
        # the MLP runs between the graphs (numpy's BLAS threads): ORT's threads must not spin meanwhile
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def session(name: str) -> ort.InferenceSession:
            try:
                return ort.InferenceSession(os.fspath(bundle.file(name)), sess_options=opts,
                                            providers=providers or ["CPUExecutionProvider"])
            except Exception as e:  # ORT's own Fail/InvalidGraph types
                raise BundleError(f"{bundle.path}: ONNX Runtime cannot load {name}: {e}") from e

        self.embed = session(spec["embed"])
        self.layers = [session(name) for name in spec["layers"]]
        self.head = session(spec["head"])
        release_file_pages(bundle.path)

    def run(self, token_ids, past_len: int, positions: np.ndarray | None = None, bias: np.ndarray | None = None,
            all_logits: bool = True) -> np.ndarray:
        """T tokens into cache slots past_len..; logits [T, vocab] (all_logits) or [1, vocab] (the
        last). positions and bias as for OnnxBackend.run (token trees)."""
        ids = np.asarray(token_ids, np.int64).reshape(1, -1)
        t = ids.shape[1]
        total = past_len + t
        self.backend.ensure_capacity(total)
        feeds = {"seqlens_k": np.array([total - 1], np.int32), "total_sequence_length": np.array(total, np.int32),
                 "position_ids": (np.arange(past_len, total, dtype=np.int64) if positions is None
                                  else np.asarray(positions, np.int64)).reshape(1, t),
                 "attention_bias": (np.zeros((1, 1, t, total), np.float32) if bias is None
                                    else np.ascontiguousarray(bias, np.float32).reshape(1, 1, t, total)),
                 "query_seqlens": np.array([t], np.int32)}
        residual = self.embed.run(None, {"input_ids": ids})[0]
        delta = np.zeros_like(residual)
        kv = self.backend.kv_cache()
        for i, layer in enumerate(self.layers):
            b = layer.io_binding()
            for name, value in feeds.items():
                b.bind_cpu_input(name, value)
            b.bind_cpu_input("delta", delta)
            b.bind_cpu_input("residual", residual)
            for io, buf in (("key", kv[2 * i]), ("value", kv[2 * i + 1])):
                b.bind_ortvalue_input(f"past_{io}", buf)
                b.bind_ortvalue_output(f"present_{io}", buf)
            mlp_in, residual = np.empty((1, t, self.hidden), np.float32), np.empty((1, t, self.hidden), np.float32)
            gate = np.empty((1, t, self.inter), np.float32)
            b.bind_ortvalue_output("mlp_in", ort.OrtValue.ortvalue_from_numpy(mlp_in))
            b.bind_ortvalue_output("residual_out", ort.OrtValue.ortvalue_from_numpy(residual))
            b.bind_ortvalue_output("gate", ort.OrtValue.ortvalue_from_numpy(gate))
            layer.run_with_iobinding(b)
            delta = np.asarray(self.mlp(i, mlp_in[0], gate[0]), np.float32)[None]
        logits_from = np.array([0 if all_logits else t - 1], np.int64)
        logits = self.head.run(None, {"delta": delta, "residual": residual, "logits_from": logits_from})[0]
        end_step = getattr(self.mlp, "end_step", None)
        if end_step is not None:
            end_step()
        return logits[0]
