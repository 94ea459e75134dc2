"""Quality against FFN sparsity: which neurons a flash-resident FFN may skip, and at what cost.

With the converter's numpy forward over the checkpoint's weights: thresholds and predictors come
from the first half of the shipped calibration text; quality is measured on the second half (held
out). Every layer's FFN keeps a fraction of its neurons per token, chosen by (converters/sparsity.py)

- oracle:    the token's top |h| (needs gate + up rows of all neurons: an upper bound, no saving)
- h-thresh:  |h| above the layer's calibration threshold (same reads as oracle; count varies by token)
- gate:      the token's top |silu(gate)| (needs every gate row resident: 1/3 of the FFN)
- predictor: the token's top scores of the rank-r low-rank predictor (reads only the chosen neurons)

and the columns are: perplexity and its change against dense, teacher-forced top-1 agreement with
dense, the first 16 greedy tokens on chat prompts that match dense's, the share of a layer's FFN
bytes each token needs from storage-or-DRAM (the method's own reads, predictor excluded), and the
union of the neurons chosen over the last k tokens as a share of all neurons (what a DRAM window of
k tokens holds; top-k methods hold `fraction` at k = 1).

    python benchmarks/ffn_sparsity.py [SOURCE] [--tokens 1024] [--rank 64] [--fractions 0.1 0.25 0.5 0.75 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ondevice.converters import calibrate
from ondevice.converters import sparsity as sp
from ondevice.converters.arch import get_architecture
from ondevice.converters.sources import read_source, resolve_source

WINDOW = 256
PROMPTS = ["What are some good habits for staying healthy while working from home?",
           "Explain how a bicycle stays upright when it is moving.",
           "Write a Python function that returns the n-th Fibonacci number."]
GREEDY = 16
KS = (1, 4, 8)


def load(source: str):
    """(float32 canonical weights, config, tokenizer json, chat template) of a checkpoint."""
    ckpt = read_source(resolve_source(source))
    arch = get_architecture(ckpt.architecture)
    fmt = ckpt.provenance["format"]
    cfg = (arch.config_from_gguf if fmt == "gguf" else arch.config_from_hf)(ckpt.metadata, ckpt.weights)
    weights = (arch.canonical_from_gguf if fmt == "gguf" else arch.canonical_from_hf)(ckpt.weights, cfg)
    return {k: calibrate._float(v) for k, v in weights.items()}, cfg, ckpt


def chooser(method: str, fraction: float, calib: dict, ffn: list):
    """mask(i, x, h) -> the neurons [N, inter] layer i keeps for FFN inputs x and dense activations h."""
    j = calib["fractions"].index(fraction) if fraction in calib["fractions"] else None

    def mask(i: int, x: np.ndarray, h: np.ndarray) -> np.ndarray:
        if fraction >= 1.0:
            return np.ones(h.shape, bool)
        if method == "oracle":
            return sp.select(np.abs(h), fraction)
        if method == "h-thresh":
            return sp.threshold_masks(np.abs(h), calib["layers"][i]["h_thresholds"][j])
        if method == "gate":
            return sp.select(sp.gate_scores(x, ffn[i][0]), fraction)
        return sp.select(sp.predictor_scores(calib["layers"][i], x), fraction)
    return mask


def forward_logits(weights, cfg, ids: np.ndarray, mask=None, record=None, last: bool = False) -> np.ndarray:
    """Logits [B, T, vocab] of the numpy forward with each layer's FFN restricted to mask(i, x, h);
    record(i, m) sees every mask [B, T, inter]; last: the last position's logits only."""
    x = calibrate.embed(weights, np.atleast_2d(ids))
    for i in range(cfg.num_layers):
        seen = {}

        def transform(name: str, h: np.ndarray, i=i) -> np.ndarray:
            if mask is None:
                return h
            if name.endswith("mlp.gate_proj"):
                seen["x"] = h
            elif name.endswith("mlp.down_proj"):  # h = silu(gate) * up: zero the neurons not kept
                m = mask(i, seen["x"], h)
                if record is not None:
                    record(i, m)
                return h * m
            return h
        x = calibrate.layer_forward(x, weights, cfg, i, transform=transform)
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    x = x[:, -1:] if last else x
    return calibrate.rms_norm(x, weights["model.norm.weight"], cfg.rms_norm_eps) @ head.T


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    z = logits[:, :-1].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)
    return float(np.exp(nll.mean()))


def greedy(weights, cfg, prompt: list[int], mask) -> list[int]:
    """GREEDY tokens after the prompt (no KV cache: the whole sequence again at each step)."""
    ids = list(prompt)
    for _ in range(GREEDY):
        ids.append(int(forward_logits(weights, cfg, np.array([ids]), mask, last=True)[0, -1].argmax()))
    return ids[len(prompt):]


def reads(method: str, fraction: float) -> float:
    """Share of a layer's FFN bytes (gate, up, down alike) one token needs."""
    return {"oracle": 2 / 3 + fraction / 3, "h-thresh": 2 / 3 + fraction / 3,
            "gate": 1 / 3 + 2 * fraction / 3}.get(method, fraction) if fraction < 1 else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens (and at most 2048 calibration tokens)")
    ap.add_argument("--rank", type=int, default=sp.PREDICTOR_RANK)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--methods", nargs="+", default=["oracle", "h-thresh", "gate", "predictor"])
    ap.add_argument("--no-greedy", action="store_true")
    ap.add_argument("--load", help="use the predictors and thresholds --save wrote (same source, rank, fractions)")
    ap.add_argument("--save", help="also write the predictors and thresholds to this folder (sparsity.save_predictors)")
    args = ap.parse_args()
    weights, cfg, ckpt = load(args.source)
    ids, _ = calibrate.token_counts(ckpt.tokenizer_json, calibrate.calibration_text())
    half = len(ids) // 2
    calib_ids = calibrate.windows(ids[:half], WINDOW, 2048)
    held_out = calibrate.windows(ids[half:], WINDOW, args.tokens)
    started = time.perf_counter()
    calib = sp.load_predictors(args.load) if args.load else sp.calibrate_predictors(
        weights, cfg, calib_ids, args.rank, fractions=[f for f in args.fractions if f < 1])
    if args.save:
        sp.save_predictors(args.save, calib)
    ffn = [sp.ffn_weights(weights, i) for i in range(cfg.num_layers)]
    rec = np.array([layer["recall"] for layer in calib["layers"]])
    pred_params = sum(layer["a"].size + layer["b"].size + layer["c"].size for layer in calib["layers"])
    ffn_params = sum(w.size for f in ffn for w in f)
    print(f"calibration: {calib_ids.size} tokens, predictors + thresholds in {time.perf_counter() - started:.0f} s; "
          f"predictor rank {calib['rank']}: {pred_params / 1e6:.2f} M parameters ({100 * pred_params / ffn_params:.1f}% "
          f"of the FFN's {ffn_params / 1e6:.1f} M; {2 * pred_params / 1e6:.1f} MB at fp16), recall of the top "
          f"{calib['target']:.0%} on calibration tokens {rec.mean():.3f} (layers {rec.min():.3f}-{rec.max():.3f})", flush=True)

    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(ckpt.tokenizer_json)
    prompts = [tok.encode(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
               for p in PROMPTS]
    dense = forward_logits(weights, cfg, held_out)
    dense_top1, dense_ppl = dense.argmax(-1), perplexity(dense, held_out)
    dense_greedy = [] if args.no_greedy else [greedy(weights, cfg, p, None) for p in prompts]
    print(f"held out: {held_out.size} tokens, dense perplexity {dense_ppl:.3f}\n")
    print("| method | FFN neurons kept | ppl | ppl vs dense | top-1 agreement | greedy 16 same | FFN bytes needed "
          "per token | held by k=1 / 4 / 8 token window | predictor recall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        for fraction in args.fractions:
            if fraction >= 1 and method != args.methods[0]:
                continue
            mask = chooser(method, fraction, calib, ffn)
            kept, unions, recall = [], {k: [] for k in KS}, []

            def record(i, m, _f=fraction):
                kept.append(m.mean())
                for k in KS:
                    unions[k].append(np.mean([sp.window_union(w, k) for w in m]))

            logits = forward_logits(weights, cfg, held_out, mask, record)
            ppl = perplexity(logits, held_out)
            agree = float((logits.argmax(-1) == dense_top1).mean())
            same = "-"
            if not args.no_greedy:
                got = [greedy(weights, cfg, p, mask) for p in prompts]
                same = f"{np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(got, dense_greedy)]):.2f}"
            label = "dense" if fraction >= 1 else method
            print(f"| {label} | {np.mean(kept):.2f} | {ppl:.3f} | {100 * (ppl / dense_ppl - 1):+.1f}% | {agree:.3f} "
                  f"| {same} | {reads(method, fraction):.2f} | "
                  f"{' / '.join(f'{np.mean(unions[k]):.2f}' for k in KS)} | "
                  f"{'-' if method != 'predictor' or fraction >= 1 else f'{predicted_recall(calib, ffn, weights, cfg, held_out, fraction):.3f}'} |",
                  flush=True)


def predicted_recall(calib, ffn, weights, cfg, held_out, fraction) -> float:
    """Mean over layers of the predictor's recall of the dense top-|h| set on held-out tokens."""
    xs = sp.ffn_inputs(weights, cfg, held_out)
    out = []
    for i, x in enumerate(xs):
        truth = sp.select(np.abs(sp.gated_activation(x, ffn[i][0], ffn[i][1])), fraction)
        out.append(sp.recall_precision(sp.select(sp.predictor_scores(calib["layers"][i], x), fraction), truth)[0])
    return float(np.mean(out))


if __name__ == "__main__":
    main()
