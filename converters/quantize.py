"""Weights -> MatMulNBits blocks (4- or 8-bit, group-wise), losslessly where the source already is.

A `Blocks` value holds what ONNX Runtime's MatMulNBits (and GatherBlockQuantized) consume for a
weight of shape [N out, K in]: codes [N, K/block, block] (one byte per code, packed for 4-bit),
float32 scales [N, K/block], optional integer zero points, and optional per-block float offsets
("mins"): w = (q - zero_point) * scale + min.

GGUF's Q4_1 (`w = d*q + m`) is carried exactly as codes q, scales d, zero point 0 and mins m; the
graph adds the `m` term as (block sums of x) @ m^T, the same split llama.cpp's Q4_1 dot product
uses. (MatMulNBits' own float zero points could express it too, but take a path ~20x slower.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ondevice.converters.canonical import QTensor


@dataclass
class Blocks:
    codes: np.ndarray  # uint8 [N, n_blocks, block] (unpacked, 0..2^bits-1)
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, n_blocks]; None = symmetric (2^(bits-1))
    bits: int
    source: str  # how the blocks were made: "Q4_1 repacked", "rtn asym g32", ...
    mins: np.ndarray | None = None  # float32 [N, n_blocks] added to every weight of the block

    @property
    def shape(self) -> tuple[int, int]:
        n, nb, bs = self.codes.shape
        return n, nb * bs

    @property
    def block_size(self) -> int:
        return self.codes.shape[2]

    def packed(self) -> np.ndarray:
        """Codes in MatMulNBits layout: 4-bit pairs share a byte, element 2i in the low nibble."""
        if self.bits == 8:
            return self.codes
        lo, hi = self.codes[..., 0::2], self.codes[..., 1::2]
        return (lo | (hi << 4)).astype(np.uint8)

    def packed_zero_points(self) -> np.ndarray | None:
        """Zero points in MatMulNBits layout: for 4-bit, two blocks per byte, each row padded."""
        if self.zero_points is None or self.bits == 8:
            return self.zero_points
        zp = self.zero_points
        if zp.shape[1] % 2:
            zp = np.pad(zp, ((0, 0), (0, 1)))
        return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)

    def explicit_zero_points(self) -> np.ndarray:
        """The zero points, with symmetric blocks' implied 2^(bits-1) written out."""
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 2 ** (self.bits - 1), np.uint8)

    def dequantize(self) -> np.ndarray:
        """Float32 [N, K]: for GGUF sources, bit for bit what gguf/llama.cpp dequantize to."""
        zp = self.explicit_zero_points()
        q = self.codes.astype(np.float32) - zp[..., None].astype(np.float32)
        w = q * self.scales[..., None]
        if self.mins is not None:
            w = w + self.mins[..., None]
        return w.reshape(self.shape)


def concat_rows(parts: list[Blocks]) -> Blocks:
    """Fuse weights that share an input (q|k|v, gate|up) into one MatMulNBits; lossless."""
    first = parts[0]
    if any(p.bits != first.bits or p.block_size != first.block_size for p in parts):
        raise ValueError("cannot fuse blocks of different bit widths or block sizes")
    zps = None
    if any(p.zero_points is not None for p in parts):
        zps = np.concatenate([p.explicit_zero_points() for p in parts])
    mins = None
    if any(p.mins is not None for p in parts):
        mins = np.concatenate([p.mins if p.mins is not None else np.zeros_like(p.scales) for p in parts])
    return Blocks(
        codes=np.concatenate([p.codes for p in parts]),
        scales=np.concatenate([p.scales for p in parts]),
        zero_points=zps,
        bits=first.bits,
        source=" | ".join(sorted({p.source for p in parts})),
        mins=mins,
    )


# --- GGUF blocks, carried over without loss -------------------------------------------------

def _gguf_fields(t: QTensor, header: list[tuple[str, int]], n_codes_bytes: int):
    rows, k = t.shape
    nb = k // 32
    raw = t.blocks.reshape(rows, nb, -1)
    out, at = {}, 0
    for name, size in header:
        out[name] = raw[..., at:at + size].copy().view(np.float16)[..., 0].astype(np.float32)
        at += size
    return out, raw[..., at:at + n_codes_bytes]


def _unpack_gguf_nibbles(qs: np.ndarray) -> np.ndarray:
    # GGUF: byte j holds element j (low nibble) and element j + 16 (high nibble).
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint8)


def from_gguf_q4_1(t: QTensor) -> Blocks:
    f, qs = _gguf_fields(t, [("d", 2), ("m", 2)], 16)
    zero = np.zeros(f["d"].shape, np.uint8)
    return Blocks(_unpack_gguf_nibbles(qs), f["d"], zero, 4, "Q4_1 repacked", mins=f["m"])


def from_gguf_q4_0(t: QTensor) -> Blocks:
    f, qs = _gguf_fields(t, [("d", 2)], 16)
    return Blocks(_unpack_gguf_nibbles(qs), f["d"], None, 4, "Q4_0 repacked")


def from_gguf_q8_0(t: QTensor) -> Blocks:
    f, qs = _gguf_fields(t, [("d", 2)], 32)
    codes = (qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return Blocks(codes, f["d"], None, 8, "Q8_0 repacked")


def from_gguf_q5_0(t: QTensor) -> Blocks:
    """w = d * (q - 16) with 5-bit q: exact as 8-bit codes with zero point 16."""
    f, rest = _gguf_fields(t, [("d", 2)], 20)
    high = rest[..., :4].copy().view(np.uint32)  # bit j: the fifth bit of element j
    high = (high >> np.arange(32, dtype=np.uint32)) & 1
    codes = _unpack_gguf_nibbles(rest[..., 4:]) | (high.astype(np.uint8) << 4)
    return Blocks(codes, f["d"], np.full(f["d"].shape, 16, np.uint8), 8, "Q5_0 repacked")


_QK_K = 256  # a K-quant super-block


def _super_blocks(t: QTensor) -> np.ndarray:
    rows, k = t.shape
    return t.blocks.reshape(rows, k // _QK_K, -1)


def _fp16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16)[..., 0].astype(np.float32)


def from_gguf_q4_k(t: QTensor) -> Blocks:
    """Super-blocks of 8 sub-blocks of 32, w = (d * sc) * q - dmin * m with 6-bit sc, m: per block of
    32, scale d * sc and min -dmin * m, both exact in float32 (an fp16 times a 6-bit integer)."""
    raw = _super_blocks(t)
    d, dmin = _fp16(raw[..., 0:2]), _fp16(raw[..., 2:4])
    s = raw[..., 4:16]
    lo, hi, mix = s[..., 0:4], s[..., 4:8], s[..., 8:12]  # gguf.quants.Q4_K.get_scale_min
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    m = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    qs = raw[..., 16:].reshape(*raw.shape[:2], 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
    codes = (qs & 0x0F).reshape(t.shape[0], -1, 32)  # sub-block pairs share 32 bytes: low, then high nibbles
    scales = (d[..., None] * sc.astype(np.float32)).reshape(t.shape[0], -1)
    mins = -(dmin[..., None] * m.astype(np.float32)).reshape(t.shape[0], -1)
    return Blocks(codes.astype(np.uint8), scales, np.zeros(scales.shape, np.uint8), 4, "Q4_K repacked", mins=mins)


def from_gguf_q6_k(t: QTensor) -> Blocks:
    """Super-blocks of 16 sub-blocks of 16, w = (d * sc) * (q - 32) with 6-bit q and int8 sc: exact
    as 8-bit blocks of 16 with zero point 32 and scale d * sc."""
    raw = _super_blocks(t)
    rows, nsb = raw.shape[:2]
    ql, qh = raw[..., :128], raw[..., 128:192]
    sc, d = raw[..., 192:208].view(np.int8).astype(np.float32), _fp16(raw[..., 208:210])
    low = (ql.reshape(rows, nsb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)) & 0x0F
    high = (qh.reshape(rows, nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 0x03
    codes = low.reshape(rows, nsb, 8, 32) | (high.reshape(rows, nsb, 8, 32) << 4)  # gguf.quants.Q6_K
    scales = (d[..., None] * sc).reshape(rows, -1)
    return Blocks(codes.reshape(rows, -1, 16).astype(np.uint8), scales, np.full(scales.shape, 32, np.uint8), 8,
                  "Q6_K repacked")


LOSSLESS = {"Q4_0": from_gguf_q4_0, "Q4_1": from_gguf_q4_1, "Q8_0": from_gguf_q8_0, "Q5_0": from_gguf_q5_0,
            "Q4_K": from_gguf_q4_k, "Q6_K": from_gguf_q6_k}


# --- float weights, quantized round-to-nearest ---------------------------------------------

def quantize_rtn(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False) -> Blocks:
    """Group-wise round-to-nearest quantization of a float [N, K] weight."""
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"input dimension {k} is not a multiple of the block size {block_size}")
    g = w.astype(np.float32).reshape(n, k // block_size, block_size)
    qmax = 2**bits - 1
    if symmetric:
        mid = 2 ** (bits - 1)
        amax = np.abs(g).max(-1)
        scale = np.where(amax > 0, amax / (mid - 0.5 if bits == 4 else mid - 1), 1.0).astype(np.float32)
        codes = np.clip(np.round(g / scale[..., None]) + mid, 0, qmax).astype(np.uint8)
        return Blocks(codes, scale, None, bits, f"rtn sym g{block_size}")
    lo, hi = g.min(-1), g.max(-1)
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
    zp = np.clip(np.round(-lo / scale), 0, qmax).astype(np.uint8)
    codes = np.clip(np.round(g / scale[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
    return Blocks(codes, scale, zp, bits, f"rtn asym g{block_size}")


@dataclass(frozen=True)
class QuantSpec:
    """What `--quant` asks for."""

    mode: str = "q4"  # q4 | q8 | fp16 | fp32
    block_size: int = 32
    symmetric: bool = False

    def __post_init__(self):
        if self.mode not in ("q4", "q8", "fp16", "fp32"):
            raise ValueError(f"unknown quantization mode {self.mode!r}: use q4, q8, fp16 or fp32")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError("block size must be one of 16, 32, 64, 128, 256")


def dequantize(w: np.ndarray | QTensor) -> np.ndarray:
    return w.dequantize() if isinstance(w, QTensor) else np.asarray(w, np.float32)


def quantize_linear(w: np.ndarray | QTensor, spec: QuantSpec, keep_8bit: bool = False) -> Blocks | np.ndarray:
    """One linear weight [N, K] -> Blocks for q4/q8, or a float array for fp16/fp32.

    GGUF blocks that already are 4- or 8-bit are repacked exactly, never re-quantized: an 8-bit
    source stays 8-bit under q4 only when `keep_8bit` (the tied embedding / LM head), and a 4-bit
    source stays 4-bit under q8 (re-quantizing would only lose precision).
    """
    if spec.mode == "fp32":
        return dequantize(w)
    if spec.mode == "fp16":
        return dequantize(w).astype(np.float16)
    bits = 4 if spec.mode == "q4" else 8
    if isinstance(w, QTensor) and w.kind in LOSSLESS:
        blocks = LOSSLESS[w.kind](w)
        if blocks.bits <= bits or keep_8bit:
            return blocks
    return quantize_rtn(dequantize(w), bits=bits, block_size=spec.block_size, symmetric=spec.symmetric)
