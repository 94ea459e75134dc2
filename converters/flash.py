"""The flash store: every layer's FFN weights in one file, one record per neuron, for reading on demand.

Layout of `ffn_flash.bin` (row-column bundling, "LLM in a flash" section 3.2): layer after layer, each
layer's section starting on a 4 KiB boundary (direct I/O reads whole aligned pages). A section holds
the layer's *tables* (what every neuron record needs and is small enough to stay in DRAM, read once at
open), then one fixed-size record per neuron in the file's neuron order: neuron i's gate row, up row
and down column side by side, so one read brings all of a neuron's weights. Records are padded to a
power of two that divides 4 KiB (or to whole pages), so a single-neuron read never straddles a page.

Encodings (`encoding=`; measured with benchmarks/flash_io.py, README "Flash store"):

- "q4" (default): 1,008 bytes of weights per SmolLM2 neuron, padded to 1,024. Gate and up rows of
  neuron i are whole rows of the [intermediate, hidden] matrices, so their 4-bit blocks (32 values
  along hidden) are stored as they are: codes (MatMulNBits nibble order, element 2j in the low
  nibble), an fp16 scale d and an fp16 offset m per block, w = d*q + m. GGUF Q4_1 is exactly that, so
  these rows are lossless. The down projection [hidden, intermediate] has its blocks along the
  intermediate axis: neuron i's down column is one code from each of `hidden` different blocks, each
  block shared by 32 neurons. Three choices:
    1. per neuron, the codes plus each block's (d, m): exact, but 288 + 2,304 bytes per neuron (the
       scales of 32 neurons repeated 32 times), 3.3 KB per record: no smaller than fp16;
    2. per neuron, re-quantized along hidden: 360 bytes, but no longer the checkpoint's weights;
    3. groups of 32 neurons whose down blocks are whole: 1,080 bytes per neuron and exact, but the
       unit of reading becomes 32 neurons (34.6 KB): with SwiGLU's weak sparsity almost every group
       holds an active neuron, so reading 25-50% of the neurons would read ~all groups.
  We take a fourth: the down column's 4-bit codes go in the neuron's record (288 bytes) and the down
  blocks' (d, m) tables [hidden, intermediate/32] stay resident (2 x fp16: 110 KB per SmolLM2 layer,
  3.3 MB in all, 7% of the FFN bytes): exact, per-neuron granularity, 1,008 bytes per neuron.
  A 4-bit source other than Q4_1 (Q4_0: m = -8d) is exact too; anything else is quantized
  round-to-nearest (asymmetric, blocks of 32) and the manifest says `exact: false` with the error.
- "fp16": gate row, up row and down column as float16 (3 x hidden x 2 = 3,456 bytes, padded to
  4,096): simpler to compute with, 3.4x the bytes of "q4", and not exact for 4-bit sources (d*q + m
  rounds to fp16; the manifest records the largest error).

Neuron order: the records of a layer are in `order` (position -> neuron id; the manifest records it,
"identity" when unchanged), so that neurons often active together can sit together and coalesce into
one read (`coactivation_order` makes one from calibration activity; it saved only 5-17% of the
bytes read on SmolLM2, whose SwiGLU activity is not clustered, so the default stays identity). The
tables stay indexed by neuron id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ondevice.converters.canonical import Weight
from ondevice.converters.quantize import QuantSpec, dequantize, quantize_linear, quantize_rtn

FLASH_FILE = "ffn_flash.bin"
PAGE = 4096
ENCODINGS = ("q4", "fp16")
BLOCK = 32


def record_fields(encoding: str, hidden: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """The fields of one neuron record (name, numpy dtype, shape), in file order (little-endian)."""
    if encoding == "fp16":
        return [("gate", "<f2", (hidden,)), ("up", "<f2", (hidden,)), ("down", "<f2", (hidden,))]
    if encoding == "q4":
        nb = hidden // BLOCK
        row = [("codes", "u1", (nb, BLOCK // 2)), ("scale", "<f2", (nb,)), ("min", "<f2", (nb,))]
        return ([(f"gate_{n}", t, s) for n, t, s in row] + [(f"up_{n}", t, s) for n, t, s in row]
                + [("down_codes", "u1", (hidden // 2,))])
    raise ValueError(f"unknown flash encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")


def padded_record_size(payload: int) -> int:
    """The smallest power of two >= payload that divides a page, or a whole number of pages."""
    if payload > PAGE:
        return -(-payload // PAGE) * PAGE
    size = 1
    while size < payload:
        size *= 2
    return size


def record_dtype(encoding: str, hidden: int) -> np.dtype:
    """The structured dtype of one record, padding included (numpy reads records with it directly)."""
    fields = record_fields(encoding, hidden)
    payload = np.dtype([(n, t, s) for n, t, s in fields]).itemsize
    return np.dtype({"names": [n for n, _, _ in fields], "formats": [(t, s) for _, t, s in fields],
                     "itemsize": padded_record_size(payload)})


def _align(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _blocks_dm(w: Weight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A [N, K] weight as 4-bit blocks of 32 along K: codes [N, K] (0..15), d and m [N, K/32] float32
    with w = d*q + m (the source's own blocks where they are 4-bit: Q4_1, Q4_0)."""
    blocks = quantize_linear(w, QuantSpec("q4", BLOCK))
    if isinstance(blocks, np.ndarray) or blocks.bits != 4 or blocks.block_size != BLOCK:
        blocks = quantize_rtn(dequantize(w), 4, BLOCK)
    zp = blocks.explicit_zero_points().astype(np.float32)
    m = (blocks.mins if blocks.mins is not None else 0) - zp * blocks.scales
    n, k = blocks.shape
    return blocks.codes.reshape(n, k), blocks.scales, np.broadcast_to(np.asarray(m, np.float32), blocks.scales.shape)


def _pack(codes: np.ndarray) -> np.ndarray:
    """[..., K] codes 0..15 -> [..., K/2] bytes, element 2j in the low nibble (MatMulNBits order)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


def layer_records(gate: Weight, up: Weight, down: Weight, encoding: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One layer's records [intermediate] (neuron id order) and its resident tables."""
    n_ff, hidden = gate.shape
    rec = np.zeros(n_ff, record_dtype(encoding, hidden))
    if encoding == "fp16":
        rec["gate"], rec["up"] = dequantize(gate), dequantize(up)
        rec["down"] = dequantize(down).T
        return rec, {}
    for name, w in (("gate", gate), ("up", up)):
        q, d, m = _blocks_dm(w)
        rec[f"{name}_codes"] = _pack(q).reshape(n_ff, hidden // BLOCK, BLOCK // 2)
        rec[f"{name}_scale"], rec[f"{name}_min"] = d, m
    q, d, m = _blocks_dm(down)  # [hidden, n_ff], blocks along n_ff
    rec["down_codes"] = _pack(q.T)
    return rec, {"down_scale": d.astype("<f2"), "down_min": m.astype("<f2")}


def decode_records(rec: np.ndarray, ids: np.ndarray, tables: dict[str, np.ndarray], encoding: str
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Records of neurons `ids` -> float32 gate rows, up rows [n, hidden] and down columns [n, hidden]
    (the runtime's decoding, ondevice.flash.decode_records, with tables as a reader returns them)."""
    from ondevice.flash import decode_records as decode, window_dtype

    hidden = rec.dtype["down" if encoding == "fp16" else "down_codes"].shape[0] * (1 if encoding == "fp16" else 2)
    into = window_dtype({"hidden_size": hidden}, ("gate", "up", "down"), "float32")
    rows = decode(rec, ids, {f"{k}_t": np.ascontiguousarray(v.T) for k, v in tables.items()},
                  {"encoding": encoding, "block_size": BLOCK}, into)
    return rows["gate"], rows["up"], rows["down"]


def write_flash_store(weights: dict[str, Weight], num_layers: int, folder: Path, encoding: str = "q4",
                      orders: list[np.ndarray] | None = None) -> dict:
    """Write folder/ffn_flash.bin from canonical weights; returns its manifest entry."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown flash encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
    layers, offset, max_err = [], 0, 0.0
    with open(folder / FLASH_FILE, "wb") as f:
        for i in range(num_layers):
            p = f"model.layers.{i}.mlp."
            gate, up, down = (weights[p + n + "_proj.weight"] for n in ("gate", "up", "down"))
            n_ff, hidden = gate.shape
            if hidden % BLOCK or n_ff % BLOCK:
                raise ValueError(f"flash store needs hidden and intermediate sizes divisible by {BLOCK}")
            rec, tables = layer_records(gate, up, down, encoding)
            order = np.arange(n_ff) if orders is None else np.asarray(orders[i], np.int64)
            if sorted(order.tolist()) != list(range(n_ff)):
                raise ValueError(f"layer {i}: the neuron order must be a permutation of 0..{n_ff - 1}")
            g, u, dn = decode_records(rec, np.arange(n_ff), tables, encoding)
            max_err = max(max_err, *(float(np.abs(a - dequantize(b)).max())
                                     for a, b in ((g, gate), (u, up), (dn.T, down))))
            entry = {"offset": offset, "tables": {}}
            f.seek(offset)
            at = offset
            for name, t in tables.items():
                entry["tables"][name] = {"offset": at, "dtype": t.dtype.str, "shape": list(t.shape)}
                f.write(t.tobytes())
                at += t.nbytes
            entry["records_offset"] = _align(at)
            f.seek(entry["records_offset"])
            f.write(rec[order].tobytes())
            entry["order"] = "identity" if orders is None or (order == np.arange(n_ff)).all() else order.tolist()
            offset = _align(entry["records_offset"] + rec.nbytes)
            layers.append(entry)
        f.truncate(offset)
    dt = record_dtype(encoding, hidden)
    return {"file": FLASH_FILE, "encoding": encoding, "page_size": PAGE, "record_size": dt.itemsize,
            "record_payload": int(sum(np.dtype((t, s)).itemsize for _, t, s in record_fields(encoding, hidden))),
            "record_fields": [[n, t, list(s)] for n, t, s in record_fields(encoding, hidden)],
            "block_size": BLOCK, "hidden_size": hidden, "intermediate_size": n_ff, "num_layers": num_layers,
            "file_bytes": offset, "exact": max_err == 0.0, "max_abs_error": max_err,
            "tables_bytes": int(sum(t["shape"][0] * t["shape"][1] * np.dtype(t["dtype"]).itemsize
                                    for e in layers for t in e["tables"].values())),
            "layers": layers}


def coactivation_order(active: np.ndarray) -> np.ndarray:
    """A neuron order (position -> neuron id) from calibration activity `active` [tokens, neurons]
    (bool: the neuron was selected for the token): start from the most often active neuron, then
    always place next the unplaced neuron most often active together with the last one placed
    (Jaccard similarity). Neurons that fire together then sit in neighbouring records.

    Measured on SmolLM2 (top-|h| selection on half the calibration windows, evaluated on the other
    half, runs planned with 8 KiB gaps): 5-17% fewer bytes per token than the checkpoint's order
    (10% of the neurons: 19.7 -> 16.3 MB without a window, 9.4 -> 8.9 MB with a 5-token window;
    25%: 39.2 -> 35.4 MB), so the converter keeps the identity order unless given one."""
    a = np.asarray(active, np.float32)
    co = a.T @ a
    freq = np.diag(co).copy()
    jaccard = co / (freq[:, None] + freq[None, :] - co + 1e-9)
    placed = np.zeros(len(freq), bool)
    order = [int(np.argmax(freq))]
    placed[order[0]] = True
    for _ in range(len(freq) - 1):
        score = np.where(placed, -1.0, jaccard[order[-1]])
        order.append(int(np.argmax(score)))
        placed[order[-1]] = True
    return np.asarray(order, np.int64)


def resident_weight_bytes(initializers) -> tuple[int, int]:
    """(bytes of the graph's weights outside the FFN, bytes of its FFN weights) from ONNX initializers."""
    resident = ffn = 0
    for t in initializers:
        n = len(t.raw_data) if t.raw_data else int(np.prod(t.dims or [1])) * 4
        if ".mlp." in t.name:
            ffn += n
        else:
            resident += n
    return resident, ffn
