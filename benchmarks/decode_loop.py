"""What the in-place KV cache and bound buffers buy: the same bundle, the same graph, two loops.

naive:    session.run with numpy feeds; every step hands the whole KV cache in and gets a new one
          back (ORT allocates the outputs, Python keeps them for the next step).
ondevice: the engine's backend: past and present bound to the same OrtValues, decode inputs and
          logits preallocated, one run_with_iobinding per token.

    python benchmarks/decode_loop.py BUNDLE [--context 1024] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

from ondevice.bundle import read_bundle
from ondevice.runtimes.onnx import OnnxBackend, session_options


def naive_decode(bundle_path: str, prompt: list[int], n: int, capacity: int, threads: int) -> float:
    bundle = read_bundle(bundle_path, verify=False)
    spec = bundle.manifest["backends"]["onnx"]
    kv = spec["kv_cache"]
    sess = ort.InferenceSession(str(bundle.file(spec["graph"])), session_options(threads),
                                providers=["CPUExecutionProvider"])
    shape = (1, kv["num_kv_heads"], capacity, kv["head_dim"])
    cache = {f"past_{kind}.{i}": np.zeros(shape, np.float32)
             for i in range(kv["layers"]) for kind in ("key", "value")}

    def step(ids: list[int], past: int) -> np.ndarray:
        feeds = {"input_ids": np.array([ids], np.int64), "seqlens_k": np.array([past + len(ids) - 1], np.int32),
                 "total_sequence_length": np.array(past + len(ids), np.int32),
                 "logits_from": np.array([len(ids) - 1], np.int64), **cache}
        outs = sess.run(None, feeds)
        names = [o.name for o in sess.get_outputs()]
        for name, value in zip(names, outs):
            if name.startswith("present_"):
                cache[name.replace("present_", "past_")] = value
        return outs[names.index("logits")][0, -1]

    logits = step(prompt, 0)
    past = len(prompt)
    t = time.perf_counter()
    for _ in range(n):
        logits = step([int(np.argmax(logits))], past)
        past += 1
    return n / (time.perf_counter() - t)


def engine_decode(bundle_path: str, prompt: list[int], n: int, capacity: int, threads: int) -> float:
    be = OnnxBackend(read_bundle(bundle_path, verify=False), threads=threads, capacity=capacity)
    logits = be.forward(prompt, 0)[-1]
    past = len(prompt)
    t = time.perf_counter()
    for _ in range(n):
        logits = be.decode_one(int(np.argmax(logits)), past)[0]
        past += 1
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--context", type=int, default=1024, help="KV capacity both loops allocate")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    prompt = list(range(1000, 1064))
    for r in range(args.rounds):
        a = naive_decode(args.bundle, prompt, args.tokens, args.context, args.threads)
        b = engine_decode(args.bundle, prompt, args.tokens, args.context, args.threads)
        print(f"round {r + 1}: naive {a:6.1f} tok/s   ondevice {b:6.1f} tok/s   ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
