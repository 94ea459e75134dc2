"""Quality against size for the converter's trimming pass (--trim-layers, --trim-ffn, --trim-vocab).

Converts the model once per setting and reports the bundle size, held-out quality and agreement:

- bits per byte on held-out text (the second half of the shipped calibration text, which trimming
  never saw): the summed negative log-likelihood over windows of 256 tokens divided by the bytes it
  covers, so that models with different tokenizers (vocabulary trimming) compare fairly;
- greedy agreement with the untrimmed model: of the first 32 greedy tokens of each chat prompt, the
  share equal position by position up to the first difference (decoded text, since token ids differ
  after vocabulary trimming).

    python benchmarks/trim_quality.py [SOURCE] [--settings none vocab=16384 layers=26 ffn=1280 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

import ondevice
from ondevice.converters import calibrate
from ondevice.evaluate import window_nll

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
           "Give me three tips for writing clear code.", "Explain photosynthesis in one sentence."]
DEFAULT_SETTINGS = ["none", "vocab=32768", "vocab=16384", "vocab=8192", "layers=28", "layers=26", "layers=24", "heads=6",
                    "ffn=1280", "ffn=1024", "layers=26,ffn=1280,vocab=16384"]
WINDOW = 256


def bits_per_byte(model: ondevice.Model, text: str) -> float:
    nll, covered = 0.0, 0
    for chunk, chunk_nll in window_nll(model, model.encode_prompt(text, raw=True), WINDOW):
        nll += chunk_nll
        covered += len(model.tokenizer.decode(chunk[1:]).encode("utf-8"))
    return nll / covered / math.log(2)


def greedy_texts(model: ondevice.Model) -> list[str]:
    out = []
    for p in PROMPTS:
        out.append(model.generate(p, max_tokens=32, temperature=0, ignore_eos=True).text)
        model.reset()
    return out


def agreement(a: list[str], b: list[str]) -> float:
    """Mean share of the reference text's characters matched before the first difference."""
    shares = []
    for x, y in zip(a, b):
        n = next((i for i, (c, d) in enumerate(zip(x, y)) if c != d), min(len(x), len(y)))
        shares.append(n / max(1, len(y)))
    return float(np.mean(shares))


def parse(setting: str) -> dict:
    if setting == "none":
        return {}
    return {f"trim_{k}": int(v) for k, v in (part.split("=") for part in setting.split(","))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", nargs="?", default="smollm2-135m")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    p.add_argument("--json")
    args = p.parse_args()
    text = calibrate.calibration_text()
    held_out = text[len(text) // 2:]
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            started = time.perf_counter()
            out = ondevice.convert(args.source, Path(tmp) / "b.bundle", force=True, progress=False, **parse(setting))
            seconds = time.perf_counter() - started
            size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
            model = ondevice.load(out, threads=2)
            texts = greedy_texts(model)
            reference = texts if reference is None else reference
            row = {"setting": setting, "bundle_mb": round(size, 1), "convert_s": round(seconds, 1),
                   "bits_per_byte": round(bits_per_byte(model, held_out), 4),
                   "greedy_agreement": round(agreement(texts, reference), 3), "answer": texts[0][:60]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| setting | bundle MB | bits/byte held out | greedy agreement | convert s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['bundle_mb']} | {r['bits_per_byte']} | {r['greedy_agreement']:.0%} "
              f"| {r['convert_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
