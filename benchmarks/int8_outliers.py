"""Ablation for the NPU path's int8 activations: how often the model's top-1 next token survives
static per-tensor int8 quantization of every linear layer's input, with and without shadow outliers.

Simulated with the converter's numpy forward (weights as the checkpoint has them, activations
fake-quantized): scales come from the first half of the calibration text, agreement is measured on
the second half. "shadow outliers" keeps the outlier channels (calibrate.outlier_channels) in float
and quantizes the rest with a scale set by the remaining channels, as mllm-NPU does.

    python benchmarks/int8_outliers.py [SOURCE] [--tokens 1024] [--ratio 6]
"""

from __future__ import annotations

import argparse

import numpy as np

from ondevice.converters import calibrate
from ondevice.converters.arch import get_architecture
from ondevice.converters.sources import read_source, resolve_source


def fake_int8(h: np.ndarray, scale, keep: np.ndarray | None) -> np.ndarray:
    q = np.clip(np.round(h / scale), -127, 127) * scale
    if keep is not None and len(keep):
        q[..., keep] = h[..., keep]
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ratio", type=float, default=calibrate.OUTLIER_RATIO)
    args = ap.parse_args()
    ckpt = read_source(resolve_source(args.source))
    arch = get_architecture(ckpt.architecture)
    fmt = ckpt.provenance["format"]
    cfg = (arch.config_from_gguf if fmt == "gguf" else arch.config_from_hf)(ckpt.metadata, ckpt.weights)
    weights = (arch.canonical_from_gguf if fmt == "gguf" else arch.canonical_from_hf)(ckpt.weights, cfg)
    ids, _ = calibrate.token_counts(ckpt.tokenizer_json, calibrate.calibration_text())
    half = len(ids) // 2
    calib = calibrate.windows(ids[:half], 256, args.tokens)
    evaluate = calibrate.windows(ids[half:], 256, args.tokens)
    ranges = calibrate.activation_ranges(weights, cfg, calib)
    outliers = calibrate.outlier_channels(ranges, args.ratio)

    def quantizer(shadow: bool, per_chunk: bool = False):
        def quant(name: str, h: np.ndarray) -> np.ndarray:
            keep = outliers[name] if shadow else None
            if per_chunk:  # one scale per chunk (window) from its own values: same shapes, no calibration
                rest = np.delete(np.abs(h), keep, axis=-1) if keep is not None and len(keep) else np.abs(h)
                scale = rest.max(axis=(1, 2), keepdims=True) / 127.0
            else:
                r = ranges[name]
                rest = np.delete(r, keep) if keep is not None and len(keep) else r
                scale = float(rest.max()) / 127.0
            return fake_int8(h, scale, keep)
        return quant

    # SmoothQuant: divide each input channel by s = sqrt(range_x / range_w) and multiply the weight
    # column by s (exact in float), so activations and weights share the difficulty; then int8
    column_max = {}
    for name in ranges:
        column_max[name] = np.abs(calibrate._float(weights[name + ".weight"])).max(0) + 1e-8

    def smooth(shadow: bool):
        def quant(name: str, h: np.ndarray) -> np.ndarray:
            s = np.sqrt(np.maximum(ranges[name], 1e-8) / column_max[name])
            keep = outliers[name] if shadow else None
            r = ranges[name] / s
            rest = np.delete(r, keep) if keep is not None and len(keep) else r
            return fake_int8(h / s, float(rest.max()) / 127.0, keep) * s
        return quant

    reference = forward_top1(weights, cfg, evaluate, None)
    for label, quant in (("int8, no outliers kept", quantizer(False)), ("int8 + shadow outliers", quantizer(True)),
                         ("per-chunk scale + shadow", quantizer(True, per_chunk=True)),
                         ("smoothquant", smooth(False)), ("smoothquant + shadow", smooth(True))):
        got = forward_top1(weights, cfg, evaluate, quant)
        print(f"{label:24s} top-1 agreement with float {100 * (got == reference).mean():6.2f}% "
              f"over {reference.size} positions")
    n_out = sum(len(v) for v in outliers.values())
    n_all = sum(len(v) for v in ranges.values())
    print(f"outlier channels kept in float: {n_out}/{n_all} ({100 * n_out / n_all:.2f}%), ratio {args.ratio}")


def forward_top1(weights, cfg, ids, quant) -> np.ndarray:
    """Greedy next tokens [B, T]; quant(name, h) replaces every linear layer's input h."""
    x = calibrate.embed(weights, ids)
    for i in range(cfg.num_layers):
        x = calibrate.layer_forward(x, weights, cfg, i, transform=quant)
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    norm = calibrate.rms_norm(x, calibrate._float(weights["model.norm.weight"]), cfg.rms_norm_eps)
    return (norm @ calibrate._float(head).T).argmax(-1)


if __name__ == "__main__":
    main()
