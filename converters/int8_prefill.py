"""The NPU-style prefill graph: static int8 activations, int8 weights, shadow outliers in float.

Every decoder linear layer (q|k|v, o, gate|up, down) runs as QuantizeLinear(x, one calibrated
scale) -> DequantizeLinear -> MatMul <- DequantizeLinear(int8 weight, one scale per output
channel): the QDQ pattern an NPU compiler (and ONNX Runtime's CPU, as MatMulIntegerToFloat)
turns into an int8 kernel. Scales are static, fixed at conversion time from calibration text that
ships with the converter, so every chunk runs the same integer graph.

Shadow outliers (mllm-NPU): the few input channels whose calibration range dwarfs the rest are
taken out of the int8 path (their int8 weight rows are zero, so whatever int8 makes of them adds
nothing) and computed in float on the side: Gather those channels, MatMul with their float weight
rows, Add. Only those rows are kept in float.

Small models are fragile under int8: SmolLM2-135M keeps the float top-1 token at 89.6% of held-out
positions with int8 activations, int8 weights and shadow outliers. `act_bits` / `weight_bits` = 16
carry a tensor as two int8 halves with static scales s and s/254 (the second holds the first's
rounding error); 16-bit activations and weights take three int8 products per linear (hi x hi,
hi x lo, lo x hi) and keep 99.7%. NPUs run 16-bit activations natively (A16W8).

The graph is the architecture's own (`arch.build`) with a GraphBuilder whose `linear` emits the
int8 pattern, so inputs, outputs and the KV cache layout are the float graph's: the engine prefills
with this graph and decodes with the float one over the same cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ondevice.converters import calibrate
from ondevice.converters.export_onnx import GraphBuilder
from ondevice.converters.quantize import Blocks

GRAPH_STEM = "prefill_int8"
CHUNK_SIZE = 256  # the fixed chunk the graph is meant for (the graph itself takes any T); a preset may differ
CALIBRATION_TOKENS = 1024  # from the first half of the calibration text; the second half stays held out
CALIBRATION_WINDOW = 256
# make_plan options by name. On SmolLM2-135M (top-1 agreement with the float graph over held-out text):
# a8w8 ~90% (the int8 NPU graph of the paper), a16w16 ~99.7% (three int8 products per linear).
PRESETS = {"a16w16": {"act_bits": 16, "weight_bits": 16, "headroom": 4.0},
           "a16w8": {"act_bits": 16, "weight_bits": 8, "headroom": 4.0},
           "a8w8": {"act_bits": 8, "weight_bits": 8, "chunk": 128}}  # 128: faster here than 256
DEFAULT_PRESET = "a16w16"

# graph linear name suffix -> the canonical linear whose input it shares
_INPUT_OF = {"self_attn.qkv_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
             "mlp.gate_up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj"}


@dataclass
class LinearPlan:
    ranges: np.ndarray  # the largest |value| of each input channel on the calibration text
    outliers: np.ndarray  # input channels computed in float beside the int8 path


@dataclass
class Int8Plan:
    linears: dict[str, LinearPlan]  # graph linear name (model.layers.3.mlp.down_proj) -> plan
    act_bits: int | dict = 8  # 16: activations as two int8 halves, x ~ s*q_hi + s/254*q_lo (static scales);
    weight_bits: int | dict = 8  # 16: weights as two int8 halves likewise; a dict: bits per kind of linear
                                 # ("mlp.down_proj": 16, ...; kinds not named get 8)
    headroom: float = 1.0  # a 16-bit activation's static scale covers this many times the calibrated range
                           # (an 8-bit one covers the range itself: at 8 bits resolution matters more)
    migrate: float = 0.0  # alpha: input channel k of the weight is divided by (its max / the median)^alpha
                          # and the activation multiplied by it (exact in float; SmoothQuant's direction
                          # reversed: the weights' range moves into the activations)
    settings: dict = field(default_factory=dict)  # what the manifest records about the calibration

    def bits(self, name: str) -> tuple[int, int]:
        """(activation bits, weight bits) of the linear `name`."""
        kind = name.split(".", 3)[-1]  # model.layers.3.mlp.down_proj -> mlp.down_proj
        pick = lambda b: b if isinstance(b, int) else int(b.get(kind, 8))  # noqa: E731
        return pick(self.act_bits), pick(self.weight_bits)

    def summary(self) -> dict:
        per_kind: dict[str, int] = {}
        for name, p in self.linears.items():
            kind = name.split(".", 3)[3]
            per_kind[kind] = per_kind.get(kind, 0) + len(p.outliers)
        return {"int8_linears": len(self.linears), "activation_bits": self.act_bits,
                "weight_bits": self.weight_bits, "headroom": self.headroom, "migrate": self.migrate,
                "outlier_channels": per_kind,
                "outlier_channels_total": sum(per_kind.values()), **self.settings}


def split_int8(x: np.ndarray, scale: np.ndarray | float, parts: int) -> list[np.ndarray]:
    """x ~ sum_i scale/254^i * q_i with int8 q_i (q_0 saturates at +-127; each later part holds
    the previous one's rounding error, at most half its step)."""
    out, rest = [], np.asarray(x, np.float32)
    for i in range(parts):
        step = np.float32(254.0 ** -i) * np.asarray(scale, np.float32)
        q = np.clip(np.round(rest / step), -127, 127)
        out.append(q.astype(np.int8))
        rest = rest - q * step
    return out


def quantize_weight(w: np.ndarray, outliers: np.ndarray, parts: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    """w [N, K] -> (int8 halves [K, N] with the outlier input rows zero, scale per output channel [N])."""
    wt = np.array(w.T, np.float32)
    wt[outliers] = 0.0
    scale = np.abs(wt).max(0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return split_int8(wt, scale, parts), scale


class Int8GraphBuilder(GraphBuilder):
    """A GraphBuilder whose decoder linears (those the plan names) take the int8 + shadow path."""

    def __init__(self, name: str, plan: Int8Plan, accuracy_level: int = 0):
        super().__init__(name, accuracy_level=accuracy_level)
        self.plan = plan

    def linear(self, x: str, w: Blocks | np.ndarray, name: str) -> str:
        p = self.plan.linears.get(name)
        if p is None:  # the LM head
            return super().linear(x, w, name)
        wf = w.dequantize() if isinstance(w, Blocks) else np.asarray(w, np.float32)  # [N, K]
        ranges = p.ranges
        if self.plan.migrate:
            col = np.abs(wf).max(0) + 1e-12
            c = ((col / np.median(col)) ** self.plan.migrate).astype(np.float32)
            c[p.outliers] = 1.0
            x = self.node("Mul", [x, self.const(name + ".migrate", c)], name + ".x_migrated")[0]
            wf, ranges = wf / c, ranges * c
        act_bits, weight_bits = self.plan.bits(name)
        w_parts, w_scale = quantize_weight(wf, p.outliers, weight_bits // 8)
        headroom = self.plan.headroom if act_bits == 16 else 1.0
        x_scale = headroom * float(np.delete(ranges, p.outliers).max()) / 127.0
        zero = self.const("int8.zero", np.array(0, np.int8))
        zeros = self.const(f"int8.zeros.{len(w_scale)}", np.zeros(len(w_scale), np.int8))
        # activation halves: static scales s, s/254 (the second quantizes the first's rounding error).
        # Each QuantizeLinear -> DequantizeLinear pair feeds one node: ORT fuses DQ -> MatMul <- DQ
        # into MatMulIntegerToFloat only when neither has another consumer.
        xs, rest = [], x
        for i in range(act_bits // 8):
            s = self.const(f"{name}.x_scale{i}", np.array(x_scale / 254.0 ** i, np.float32))
            xs.append((rest, s))
            if i + 1 < act_bits // 8:
                q = self.node("QuantizeLinear", [rest, s, zero], f"{name}.x_int8_{i}")[0]
                xd = self.node("DequantizeLinear", [q, s, zero], f"{name}.x_dq{i}")[0]
                rest = self.node("Sub", [rest, xd], f"{name}.x_rest{i}")[0]
        terms = []
        for j, wq in enumerate(w_parts):
            codes = self.const(f"{name}.weight_int8_{j}", wq)
            scale = self.const(f"{name}.weight_scale{j}", (w_scale / np.float32(254.0 ** j)).astype(np.float32))
            for i, (xi, s) in enumerate(xs):
                if i + j > 1:
                    continue  # lo x lo: below 1/254^2 of the product
                q = self.node("QuantizeLinear", [xi, s, zero], f"{name}.x_int8_{i}_{j}")[0]
                xd = self.node("DequantizeLinear", [q, s, zero], f"{name}.x_dq{i}_{j}")[0]
                wd = self.node("DequantizeLinear", [codes, scale, zeros], f"{name}.weight_dq{j}_{i}", axis=1)[0]
                terms.append(self.node("MatMul", [xd, wd], f"{name}.int8_out{j}_{i}")[0])
        if len(p.outliers):  # shadow outliers: those channels of x times their float weight rows
            idx = self.const(name + ".outlier_idx", p.outliers.astype(np.int64))
            xo = self.node("Gather", [x, idx], name + ".outlier_x", axis=2)[0]
            wo = self.const(name + ".outlier_weight", np.ascontiguousarray(wf[:, p.outliers].T))
            terms.append(self.node("MatMul", [xo, wo], name + ".outlier_out")[0])
        y = terms[0]
        for k, t in enumerate(terms[1:]):
            y = self.node("Add", [y, t], f"{name}.sum{k}")[0]
        return y


# --- calibration ------------------------------------------------------------------------------------

def calibration_windows(tokenizer_json: str, tokens: int = CALIBRATION_TOKENS,
                        window: int = CALIBRATION_WINDOW) -> np.ndarray:
    """Windows [n, window] from the first half of the converter's calibration text."""
    ids, _ = calibrate.token_counts(tokenizer_json, calibrate.calibration_text())
    return calibrate.windows(ids[:len(ids) // 2], window, tokens)


def held_out_ids(tokenizer_json: str) -> list[int]:
    """The second half of the calibration text, never seen by the calibration (for evaluation)."""
    ids, _ = calibrate.token_counts(tokenizer_json, calibrate.calibration_text())
    return ids[len(ids) // 2:]


def options(setting: bool | str | dict | None) -> dict | None:
    """convert(int8_prefill=...) -> make_plan options: True (the default preset), a preset name, a dict
    of options, or False/None (no int8 graph)."""
    if not setting:
        return None
    if setting is True:
        setting = DEFAULT_PRESET
    if isinstance(setting, str):
        if setting not in PRESETS:
            raise ValueError(f"unknown int8 prefill preset {setting!r}: use one of {', '.join(PRESETS)}")
        return dict(PRESETS[setting], preset=setting)
    return dict(setting)


def make_plan(weights: dict, cfg, tokenizer_json: str, ratio: float = calibrate.OUTLIER_RATIO,
              act_bits: int | dict = 8, weight_bits: int | dict = 8, headroom: float = 1.0, migrate: float = 0.0,
              tokens: int = CALIBRATION_TOKENS, preset: str | None = None) -> Int8Plan:
    """Static scales and outlier channels of every decoder linear from the calibration text.
    ratio: an input channel whose range exceeds ratio x the median channel's is a shadow outlier
    (0: none). headroom: the static scale of 16-bit activations covers this many times the calibrated
    range (values of new text beyond it saturate). migrate: see Int8Plan."""
    values = lambda b: [b] if isinstance(b, int) else list(b.values())  # noqa: E731
    if not set(values(act_bits) + values(weight_bits)) <= {8, 16}:
        raise ValueError("activation and weight bits must be 8 or 16 (two int8 halves)")
    ids = calibration_windows(tokenizer_json, tokens)
    ranges = calibrate.activation_ranges(weights, cfg, ids)
    linears = {}
    for i in range(cfg.num_layers):
        for suffix, source in _INPUT_OF.items():
            r = ranges[f"model.layers.{i}.{source}"]
            outliers = np.flatnonzero(r > ratio * np.median(r)) if ratio > 0 else np.zeros(0, np.int64)
            linears[f"model.layers.{i}.{suffix}"] = LinearPlan(r, outliers)
    return Int8Plan(linears, act_bits, weight_bits, headroom, migrate,
                    {**({"preset": preset} if preset else {}), "calibration_text": calibrate.CALIBRATION_FILE, "calibration_tokens": int(ids.size),
                     "calibration_window": int(ids.shape[1]), "outlier_ratio": ratio,
                     "activation_scale": "headroom x the max of the non-outlier channels / 127"})
