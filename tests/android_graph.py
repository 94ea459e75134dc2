"""Drives a bundle's android.onnx (converters/export_android.py) from Python the way the app's C
bridge does: a cache [1, kv_heads, capacity, head_dim] per layer, read by the graph, new rows
written back at past_length. For checking the graph against the bundle's own engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


class AndroidGraph:
    def __init__(self, bundle: Path, capacity: int = 256, threads: int = 2):
        record = json.loads((Path(bundle) / "manifest.json").read_text())["backends"]["android"]
        kv = record["kv_cache"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(Path(bundle) / record["graph"]), opts,
                                            providers=["CPUExecutionProvider"])
        self.layers = kv["layers"]
        self.cache = [np.zeros((1, kv["num_kv_heads"], capacity, kv["head_dim"]), np.float32)
                      for _ in range(2 * self.layers)]

    def step(self, ids: list[int], past: int) -> np.ndarray:
        """Logits of the last of ids (at positions past..), their keys/values written into the cache."""
        feed = {"input_ids": np.array([ids], np.int64), "past_length": np.array([past], np.int64)}
        for i in range(self.layers):
            feed[f"past_key.{i}"], feed[f"past_value.{i}"] = self.cache[2 * i], self.cache[2 * i + 1]
        logits, *new = self.session.run(None, feed)
        for buf, rows in zip(self.cache, new):
            buf[:, :, past:past + len(ids)] = rows
        return logits[0, 0]

    def greedy(self, prompt: list[int], n: int, chunk: int = 128) -> tuple[list[int], list[np.ndarray]]:
        """n greedy tokens after prompt (prefilled in chunks), and the logits that chose each."""
        for start in range(0, len(prompt), chunk):
            logits = self.step(prompt[start:start + chunk], start)
        out, seen, pos = [], [], len(prompt)
        for _ in range(n):
            seen.append(logits)
            out.append(int(np.argmax(logits)))
            logits = self.step([out[-1]], pos)
            pos += 1
        return out, seen
