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


LOSSLESS = {"Q4_0": from_gguf_q4_0, "Q4_1": from_gguf_q4_1, "Q8_0": from_gguf_q8_0}


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
