"""Which FFN neurons a token needs: the neuron selection of flash-resident weight windowing.

SmolLM2's FFN is SwiGLU: out = W_down (silu(W_gate x) * (W_up x)); neuron j contributes
h_j * W_down[:, j] with h_j = silu(g_j) * u_j, so a neuron with small |h_j| can be skipped. Unlike
ReLU, h_j is almost never exactly 0, so every selection is an approximation; how good is measured by
benchmarks/ffn_sparsity.py. Three ways to pick the neurons of a token, and what each must read:

- **oracle** (`oracle_scores`): the largest |h_j|. Needs the gate and up rows of *every* neuron
  (2/3 of the FFN bytes) before it knows which down columns to read: an upper bound on quality,
  never a saving on reads.
- **gate threshold** (`gate_scores`): the largest |silu(g_j)|. Needs every gate row (1/3 of the FFN,
  kept resident) and then the up row and down column of the chosen neurons only.
- **predictor** (`predictor_scores`): LLM in a flash's low-rank predictor, sigmoid(B (A x) + c) with
  rank r, trained here at conversion time on calibration activations to say which neurons land in
  the token's top |h|. Its (hidden + intermediate) * r weights per layer are resident; the gate row,
  up row and down column of the chosen neurons are all that is read.

`token_neurons` gives one token's neuron indices by any of them (default: the gate's top 80%, chosen
from the measurement: the only selection within 3% of dense perplexity that reads less than all of
the FFN, and only 13% less). Per token, `select` keeps the k best-scored neurons (a fixed count per token, what a DRAM window of
neuron slots holds) and `sparse_ffn` computes the FFN over only those; `threshold_masks` keeps those
above a per-layer threshold instead (the count then varies by token), with thresholds from
calibration for a target fraction (`thresholds_for`).

Predictors and thresholds are saved as one raw little-endian float32 file plus a JSON description
(`save_predictors` / `load_predictors`): no pickle, no npz.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ondevice.converters import calibrate

PREDICTOR_RANK = 64
PREDICTOR_TARGET = 0.25  # fraction of neurons labelled "active" (the token's top |h|) when training
PREDICTOR_FILE = "ffn_predictors.bin"
PREDICTOR_JSON = "ffn_predictors.json"
FORMAT_VERSION = 1
CALIBRATION_WINDOW = 256
# The default from benchmarks/ffn_sparsity.py on SmolLM2 (held-out perplexity within 3% of dense):
# the top 80% of |silu(gate)| per token, +1.6% (75%: +2.9%). Oracle |h| needs 75% too once its reads
# are counted (+3.6% at 50%), and the rank-64 predictor 95% (+1.6%; +21% at 80%).
DEFAULT_METHOD = "gate"
DEFAULT_FRACTION = 0.8
METHODS = ("oracle", "h-thresh", "gate", "predictor")
CALIBRATION_TOKENS = 2048  # the first half of the shipped text: the second half stays held out


def _w(weights, i: int, name: str) -> np.ndarray:
    return calibrate._float(weights[f"model.layers.{i}.mlp.{name}.weight"])


def ffn_weights(weights, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W_gate [inter, hidden], W_up [inter, hidden], W_down [hidden, inter]) of layer i, as float32."""
    return _w(weights, i, "gate_proj"), _w(weights, i, "up_proj"), _w(weights, i, "down_proj")


def silu(g: np.ndarray) -> np.ndarray:
    return g / (1.0 + np.exp(-g))


def gated_activation(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray) -> np.ndarray:
    """h = silu(x W_gate^T) * (x W_up^T): [..., inter] for the FFN input x [..., hidden] (after the norm)."""
    return silu(x @ w_gate.T) * (x @ w_up.T)


def ffn_inputs(weights, cfg, ids: np.ndarray) -> list[np.ndarray]:
    """The FFN input (post-attention norm) of every layer over the windows ids [B, T], from the dense
    forward: a list of num_layers arrays [B*T, hidden]."""
    seen: dict[int, np.ndarray] = {}

    x = calibrate.embed(weights, np.atleast_2d(ids))
    for i in range(cfg.num_layers):
        def observe(name: str, h: np.ndarray, i=i) -> None:
            if name.endswith("mlp.gate_proj"):
                seen[i] = h.reshape(-1, h.shape[-1]).copy()
        x = calibrate.layer_forward(x, weights, cfg, i, observe)
    return [seen[i] for i in range(cfg.num_layers)]


# --- scores and selections ----------------------------------------------------------------------------

def oracle_scores(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray) -> np.ndarray:
    return np.abs(gated_activation(x, w_gate, w_up))


def gate_scores(x: np.ndarray, w_gate: np.ndarray) -> np.ndarray:
    return np.abs(silu(x @ w_gate.T))


def n_keep(fraction: float, n: int) -> int:
    return max(1, min(n, int(round(fraction * n))))


def select(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask [..., n]: the round(fraction * n) best-scored neurons of each token."""
    n = scores.shape[-1]
    k = n_keep(fraction, n)
    mask = np.zeros(scores.shape, bool)
    if k == n:
        mask[...] = True
        return mask
    top = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    np.put_along_axis(mask, top, True, axis=-1)
    return mask


def thresholds_for(scores: np.ndarray, fraction: float) -> float:
    """The per-layer threshold t with fraction of the calibration scores [N, n] above it."""
    if fraction >= 1.0:
        return float("-inf")
    return float(np.quantile(scores, 1.0 - fraction))


def threshold_masks(scores: np.ndarray, threshold: float) -> np.ndarray:
    return scores > threshold


def neurons(mask: np.ndarray) -> np.ndarray:
    """The neuron indices of one token's mask [n]."""
    return np.flatnonzero(mask)


def token_neurons(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray | None = None, layer: dict | None = None,
                  method: str = DEFAULT_METHOD, fraction: float = DEFAULT_FRACTION) -> np.ndarray:
    """The neuron indices one token (FFN input x [hidden]) uses in a layer, by `method` (METHODS):
    "gate" needs w_gate, "oracle" w_gate and w_up, "predictor" the layer's calibration entry (a, b, c),
    "h-thresh" w_gate, w_up and the entry's h_thresholds (fraction must be one of its fractions)."""
    if method == "gate":
        scores = gate_scores(x, w_gate)
    elif method == "predictor":
        scores = predictor_scores(layer, x)
    elif method in ("oracle", "h-thresh"):
        scores = oracle_scores(x, w_gate, w_up)
    else:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "h-thresh":
        return neurons(threshold_masks(scores, layer["h_thresholds"][list(layer["fractions"]).index(fraction)]))
    return neurons(select(scores, fraction))


def sparse_ffn(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray,
               idx: np.ndarray) -> np.ndarray:
    """The FFN output [hidden] of one token x [hidden] over only neurons idx (gate and up rows, down
    columns of those neurons: what a window of neuron slots holds); the others count as 0."""
    h = silu(w_gate[idx] @ x) * (w_up[idx] @ x)
    return w_down[:, idx] @ h


def masked_ffn(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray,
               mask: np.ndarray) -> np.ndarray:
    """sparse_ffn for many tokens at once: x [N, hidden], mask [N, inter] -> [N, hidden]."""
    return (gated_activation(x, w_gate, w_up) * mask) @ w_down.T


def window_union(masks: np.ndarray, k: int) -> float:
    """Mean over positions of |union of the neurons chosen at the last k positions| / n, for masks
    [T, n] of consecutive tokens: the share of a layer's neurons a window of k tokens must hold."""
    sums = np.cumsum(masks, axis=0, dtype=np.int32)
    before = np.zeros_like(sums)
    before[k:] = sums[:-k]
    cum = sums - before  # how often each neuron was chosen at positions s-k+1..s
    return float((cum > 0).mean())


# --- the low-rank predictor -----------------------------------------------------------------------

def train_predictor(x: np.ndarray, h: np.ndarray, rank: int = PREDICTOR_RANK, target: float = PREDICTOR_TARGET,
                    epochs: int = 30, lr: float = 0.05, seed: int = 0) -> dict[str, np.ndarray]:
    """A rank-`rank` predictor of which neurons are in a token's top `target` |h|, from the FFN input.

    x [N, hidden], h [N, inter] (dense gated activations). Initialised by reduced-rank least squares
    on standardised |h| (the rank-r projection of the ridge solution), then fitted to the top-|h|
    labels with a logistic loss by full-batch Adam. Returns {"a": [hidden, r], "b": [r, inter],
    "c": [inter]}: scores = x @ a @ b + c (logits; sigmoid > 0.5 means "active")."""
    x = np.asarray(x, np.float32)
    y = select(np.abs(h), target).astype(np.float32)
    mag = np.abs(h)
    mag = (mag - mag.mean(0)) / (mag.std(0) + 1e-6)
    # reduced-rank regression: ridge solution W, then keep the top-r directions of the fitted values
    gram = x.T @ x + 1e-3 * np.trace(x.T @ x) / x.shape[1] * np.eye(x.shape[1], dtype=np.float32)
    w = np.linalg.solve(gram, x.T @ mag)
    _, _, vt = np.linalg.svd(x @ w, full_matrices=False)
    v = vt[:rank].T  # [inter, r]
    a, b = (w @ v).astype(np.float32), v.T.astype(np.float32)
    c = np.zeros(h.shape[1], np.float32)
    # the scale of the regression is arbitrary for a logistic loss: start near the label logits
    s = x @ a @ b
    scale = 1.0 / (s.std() + 1e-6)
    a *= np.sqrt(scale)
    b *= np.sqrt(scale)
    c += np.log(target / (1 - target))
    params = [a, b, c]
    m = [np.zeros_like(p) for p in params]
    v2 = [np.zeros_like(p) for p in params]
    n = x.shape[0]
    for step in range(1, epochs + 1):
        xa = x @ a
        z = xa @ b + c
        g = (1.0 / (1.0 + np.exp(-np.clip(z, -30, 30))) - y) / n  # d(mean BCE)/dz, summed over neurons
        grads = [x.T @ (g @ b.T), xa.T @ g, g.sum(0)]
        for p, gp, mp, vp in zip(params, grads, m, v2):
            mp *= 0.9
            mp += 0.1 * gp
            vp *= 0.999
            vp += 0.001 * gp * gp
            p -= lr * (mp / (1 - 0.9 ** step)) / (np.sqrt(vp / (1 - 0.999 ** step)) + 1e-8)
    return {"a": a, "b": b, "c": c}


def predictor_scores(pred: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return (x @ pred["a"]) @ pred["b"] + pred["c"]


def recall_precision(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(share of the true neurons predicted, share of the predicted neurons true), over all tokens."""
    hit = float((predicted & truth).sum())
    return hit / max(1.0, float(truth.sum())), hit / max(1.0, float(predicted.sum()))


def calibrate_predictors(weights, cfg, ids: np.ndarray, rank: int = PREDICTOR_RANK,
                         target: float = PREDICTOR_TARGET, fractions=(0.1, 0.25, 0.5, 0.75, 0.8, 0.9),
                         epochs: int = 30) -> dict:
    """What the converter stores for neuron selection, from the dense forward over calibration windows
    ids [B, T]: per layer a predictor (a, b, c), and per layer the thresholds on |h| and on |silu(gate)|
    that keep each of `fractions` of the neurons on the calibration tokens. Returns
    {"rank", "target", "fractions", "layers": [{"a", "b", "c", "h_thresholds", "gate_thresholds",
    "recall", "precision"}]} (recall/precision of the predictor's top-`target` set, on the
    calibration tokens)."""
    xs = ffn_inputs(weights, cfg, ids)
    layers = []
    for i, x in enumerate(xs):
        w_gate, w_up, _ = ffn_weights(weights, i)
        h = gated_activation(x, w_gate, w_up)
        pred = train_predictor(x, h, rank, target, epochs)
        r, p = recall_precision(select(predictor_scores(pred, x), target), select(np.abs(h), target))
        gs = gate_scores(x, w_gate)
        layers.append(dict(pred, fractions=list(fractions), h_thresholds=np.array([thresholds_for(np.abs(h), f) for f in fractions], np.float32),
                           gate_thresholds=np.array([thresholds_for(gs, f) for f in fractions], np.float32),
                           recall=r, precision=p))
    return {"rank": rank, "target": target, "fractions": list(fractions), "layers": layers}


def for_bundle(folder: str | Path, weights, cfg, tokenizer_json: str, rank: int = PREDICTOR_RANK,
               tokens: int = CALIBRATION_TOKENS, epochs: int = 30) -> dict:
    """What the converter calls to ship neuron selection in a bundle: calibrate on the first
    `tokens` tokens of the shipped calibration text (windows of CALIBRATION_WINDOW), write the two
    files into folder, return their manifest entry (file names, bytes, sha256, rank, fractions,
    mean predictor recall). Cost: a dense numpy forward plus a few seconds of training per layer."""
    ids, _ = calibrate.token_counts(tokenizer_json, calibrate.calibration_text())
    calib = calibrate_predictors(weights, cfg, calibrate.windows(ids[:tokens], CALIBRATION_WINDOW, tokens),
                                 rank, epochs=epochs)
    save_predictors(folder, calib)
    meta = json.loads((Path(folder) / PREDICTOR_JSON).read_text())
    return {"file": PREDICTOR_FILE, "description": PREDICTOR_JSON, "bytes": meta["bytes"], "sha256": meta["sha256"],
            "rank": rank, "target": calib["target"], "fractions": calib["fractions"],
            "recall": float(np.mean([layer["recall"] for layer in calib["layers"]]))}


def selection_entry(weights, cfg, tokenizer_json: str, fractions=(0.1, 0.25, 0.5, 0.75, 0.8, 0.9),
                    tokens: int = CALIBRATION_TOKENS) -> dict:
    """What a flash bundle's manifest carries for choosing neurons by threshold: per layer, the
    |silu(gate)| above which each of `fractions` of the neurons fall on the calibration text (its
    first `tokens` tokens). Cost: the converter's dense numpy forward over those tokens."""
    ids, _ = calibrate.token_counts(tokenizer_json, calibrate.calibration_text())
    xs = ffn_inputs(weights, cfg, calibrate.windows(ids[:tokens], CALIBRATION_WINDOW, tokens))
    return {"fractions": list(fractions), "calibration_tokens": min(tokens, len(ids)),
            "gate_thresholds": [[thresholds_for(gate_scores(x, _w(weights, i, "gate_proj")), f) for f in fractions]
                                for i, x in enumerate(xs)]}


# --- storage: one raw float32 file and its JSON description ------------------------------------------

_ARRAYS = ("a", "b", "c", "h_thresholds", "gate_thresholds")


def save_predictors(folder: str | Path, calibration: dict) -> tuple[Path, Path]:
    """Write calibrate_predictors' result as PREDICTOR_FILE (the arrays, float32 little-endian, back
    to back) and PREDICTOR_JSON (offset, shape of each array per layer, the scalars, sha256)."""
    folder = Path(folder)
    entries, offset = [], 0
    bin_path, json_path = folder / PREDICTOR_FILE, folder / PREDICTOR_JSON
    digest = hashlib.sha256()
    with open(bin_path, "wb") as f:
        for layer in calibration["layers"]:
            entry = {"recall": float(layer["recall"]), "precision": float(layer["precision"]), "arrays": {}}
            for name in _ARRAYS:
                data = np.ascontiguousarray(layer[name], dtype="<f4").tobytes()
                f.write(data)
                digest.update(data)
                entry["arrays"][name] = {"offset": offset, "shape": list(np.shape(layer[name]))}
                offset += len(data)
            entries.append(entry)
    meta = {"format_version": FORMAT_VERSION, "file": PREDICTOR_FILE, "dtype": "float32-le", "bytes": offset,
            "sha256": digest.hexdigest(), "rank": calibration["rank"], "target": calibration["target"],
            "fractions": list(calibration["fractions"]), "layers": entries}
    json_path.write_text(json.dumps(meta, indent=1))
    return bin_path, json_path


def load_predictors(folder: str | Path) -> dict:
    """The dict save_predictors wrote (arrays as float32), checked against its size and sha256."""
    folder = Path(folder)
    meta = json.loads((folder / PREDICTOR_JSON).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / PREDICTOR_JSON}: format version {meta.get('format_version')}, "
                         f"expected {FORMAT_VERSION}")
    data = (folder / meta["file"]).read_bytes()
    if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ValueError(f"{folder / meta['file']}: size or sha256 differs from {PREDICTOR_JSON}; re-convert")
    layers = []
    for entry in meta["layers"]:
        layer = {"recall": entry["recall"], "precision": entry["precision"], "fractions": meta["fractions"]}
        for name, a in entry["arrays"].items():
            count = int(np.prod(a["shape"], dtype=np.int64))
            layer[name] = np.frombuffer(data, "<f4", count, a["offset"]).reshape(a["shape"]).astype(np.float32)
        layers.append(layer)
    return {"rank": meta["rank"], "target": meta["target"], "fractions": meta["fractions"], "layers": layers}
