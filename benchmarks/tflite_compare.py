"""The TFLite export against the float model and the ONNX backend, side by side.

    python benchmarks/tflite_compare.py Q4_BUNDLE FP32_BUNDLE [--rounds 3] [--tokens 64]

Both bundles converted with --target onnx,tflite (the second with --quant fp32). Prints:
- top-1 agreement of Q4's tflite model with FP32's on held-out text (teacher-forced, every position);
- greedy agreement on chat and raw prompts (32 tokens): identical continuations, and the share of
  tokens before the first difference;
- decode tok/s of Q4 on the tflite and the onnx backend, each round a fresh process per backend,
  backends interleaved, medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import numpy as np

import ondevice
from ondevice.converters.calibrate import calibration_text

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
           "Explain photosynthesis in one sentence.", "Translate to French: The weather is nice today."]
RAW = ["Once upon a time, in a small village,", "def fibonacci(n):\n    ",
       "1. Preheat the oven to 180 degrees.\n2.", "The three largest planets of the solar system are"]


def quality(q4: str, fp32: str, n_text: int) -> dict:
    quant = ondevice.load(q4, backend="tflite", threads=2)
    ref = ondevice.load(fp32, backend="tflite", threads=2)
    text = calibration_text()
    ids = quant.tokenizer.encode(text[len(text) // 2:])[:n_text]
    a = quant.backend.forward(ids, 0, all_logits=True).argmax(-1)
    b = ref.backend.forward(ids, 0, all_logits=True).argmax(-1)
    prompts = [quant.encode_prompt(p) for p in PROMPTS] + [quant.encode_prompt(p, raw=True) for p in RAW]
    same, prefix = 0, []
    for p in prompts:
        outs = []
        for m in (quant, ref):
            m.reset()
            outs.append(m.generate(p, max_tokens=32, temperature=0, ignore_eos=True).token_ids)
        first = next((i for i, (x, y) in enumerate(zip(*outs)) if x != y), 32)
        same += first == 32
        prefix.append(first / 32)
    return {"top1_agreement": float(np.mean(a == b)), "positions": len(ids),
            "greedy_identical": f"{same}/{len(prompts)}", "greedy_prefix_share": float(np.mean(prefix))}


def decode_speed(bundle: str, backend: str, tokens: int) -> float:
    code = (f"import ondevice; m = ondevice.load({bundle!r}, backend={backend!r}, threads=2); "
            f"ids = m.encode_prompt('Tell me a story about a robot.'); m.generate(ids, max_tokens=8); m.reset(); "
            f"print(m.generate(ids, max_tokens={tokens}, temperature=0, ignore_eos=True).decode_tok_s)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("q4")
    ap.add_argument("fp32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--text-tokens", type=int, default=512)
    args = ap.parse_args()
    report = {"quality": quality(args.q4, args.fp32, args.text_tokens)}
    speeds: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for bundle, backend in ((args.q4, "tflite"), (args.q4, "onnx"), (args.fp32, "tflite")):
            speeds.setdefault(f"{backend} ({bundle})", []).append(decode_speed(bundle, backend, args.tokens))
    report["decode_tok_s"] = {k: {"median": statistics.median(v), "runs": v} for k, v in speeds.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
