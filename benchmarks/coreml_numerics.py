"""What the Core ML export does to the model's numbers, measured without a Mac.

    python benchmarks/coreml_numerics.py BUNDLE [--text-tokens 512]

BUNDLE converted with --target onnx,coreml (from smollm2-135m unless --source says otherwise). Core ML
predicts only on Apple platforms, so this runs the exact torch module handed to coremltools three
ways: with the source's float weights in fp32 (the reference; the ONNX path's numbers), with the
weights read back from the bundle's model.mlpackage (int4 blocks decompressed as Core ML does) in
fp32, and both in fp16 (Core ML's compute precision; torch's CPU fp16 kernels, not the ANE's).
Prints top-1 agreement with the reference on held-out text (teacher-forced, every position) and
greedy agreement on chat and raw prompts (32 tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

import ondevice
from ondevice.converters.calibrate import calibration_text
from ondevice.converters.coreml_weights import package_weights
from ondevice.converters.export_coreml import StatefulDecoder, prompt_logits

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
           "Explain photosynthesis in one sentence.", "Translate to French: The weather is nice today."]
RAW = ["Once upon a time, in a small village,", "def fibonacci(n):\n    ",
       "1. Preheat the oven to 180 degrees.\n2.", "The three largest planets of the solar system are"]


def canonical(source: str):
    from ondevice.converters.arch import get_architecture
    from ondevice.converters.sources import read_source, resolve_source

    ckpt = read_source(resolve_source(source))
    arch = get_architecture(ckpt.architecture)
    cfg = arch.config_from_gguf(ckpt.metadata, ckpt.weights)
    return arch.canonical_from_gguf(ckpt.weights, cfg), cfg


def greedy(module: StatefulDecoder, ids: list[int], n: int = 32) -> list[int]:
    module.k_cache.zero_()
    module.v_cache.zero_()
    step = lambda t, pos: module(torch.tensor([t], dtype=torch.int32), torch.tensor([pos], dtype=torch.int32),  # noqa: E731
                                 torch.tensor([len(t) - 1], dtype=torch.int32))
    out, logits = [], step(ids, 0)
    for i in range(n):
        out.append(int(logits.argmax()))
        logits = step([out[-1]], len(ids) + i)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--source", default="smollm2-135m")
    p.add_argument("--text-tokens", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(2)
    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    slots = manifest["backends"]["coreml"]["kv_cache"]["slots"]
    weights, cfg = canonical(args.source)
    model = ondevice.load(args.bundle)
    text = calibration_text()
    text_ids = model.tokenizer.encode(text[len(text) // 2:])[:args.text_tokens]
    prompts = [model.encode_prompt(q) for q in PROMPTS] + [model.encode_prompt(q, raw=True) for q in RAW]

    reference = StatefulDecoder(cfg, weights, slots).eval()
    exported = StatefulDecoder(cfg, weights, slots).eval()
    exported.load_state_dict(package_weights(Path(args.bundle) / manifest["backends"]["coreml"]["graph"], exported),
                             strict=False)
    rows = []
    with torch.no_grad():
        ref_top1 = prompt_logits(reference, text_ids).argmax(-1)
        ref_greedy = [greedy(reference, ids) for ids in prompts]
        for name, module in (("source weights, fp16", copy.deepcopy(reference).half()),
                             ("exported weights, fp32", exported), ("exported weights, fp16", copy.deepcopy(exported).half())):
            top1 = float(np.mean(prompt_logits(module, text_ids).argmax(-1) == ref_top1))
            outs = [greedy(module, ids) for ids in prompts]
            firsts = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), 32) for o, r in zip(outs, ref_greedy)]
            rows.append((name, top1, sum(f == 32 for f in firsts), float(np.mean(firsts)) / 32))
    print(f"| Core ML module ({manifest['backends']['coreml']['precision']['weights']}) | top-1 agreement, "
          f"{len(text_ids)} held-out tokens | greedy identical (32 tokens) | greedy prefix share |")
    print("|---|---|---|---|")
    for name, top1, same, share in rows:
        print(f"| {name} | {top1:.1%} | {same}/{len(prompts)} | {share:.0%} |")


if __name__ == "__main__":
    main()
