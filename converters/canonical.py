"""Canonical weights: one naming scheme (Hugging Face's), [out, in] layout, for every source.

A weight is either a float numpy array or a `QTensor` that keeps a GGUF tensor's raw blocks so
that the quantizer can repack them without loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ondevice.errors import SourceFormatError


@dataclass
class QTensor:
    kind: str  # GGUF type name: "Q4_0", "Q4_1", "Q8_0", "Q4_K", ...
    shape: tuple[int, int]  # [rows (out), cols (in)]
    blocks: np.ndarray  # uint8 [rows, bytes_per_row]
    type_id: int = 0  # gguf.GGMLQuantizationType value, for dequantization

    def dequantize(self) -> np.ndarray:
        from gguf.quants import dequantize

        return dequantize(self.blocks, self.type_id).reshape(self.shape).astype(np.float32)

    def take_rows(self, index: np.ndarray) -> "QTensor":
        """Rows are independent blocks, so selecting or permuting them is lossless."""
        return QTensor(self.kind, (len(index), self.shape[1]), self.blocks[index], self.type_id)

    @property
    def block_size(self) -> int:
        """Values per quantization block along a row."""
        from gguf import GGML_QUANT_SIZES

        return GGML_QUANT_SIZES[self.type_id][0]

    def take_column_blocks(self, index: np.ndarray) -> "QTensor":
        """Whole blocks of block_size columns, by block index: lossless like take_rows."""
        per_block = self.blocks.shape[1] // (self.shape[1] // self.block_size)
        cols = (np.asarray(index, np.int64)[:, None] * per_block + np.arange(per_block)).reshape(-1)
        # advanced indexing after a slice can return a non-C-contiguous array; gguf's dequantizer needs C order
        blocks = np.ascontiguousarray(self.blocks[:, cols])
        return QTensor(self.kind, (self.shape[0], len(index) * self.block_size), blocks, self.type_id)


Weight = np.ndarray | QTensor


@dataclass
class Checkpoint:
    """What a source reader hands to an architecture: metadata, weights, tokenizer."""

    architecture: str  # "llama", "gemma3", ...
    metadata: dict  # source-format metadata (GGUF keys, or HF config.json)
    weights: dict[str, Weight]  # source names
    tokenizer_json: str
    chat_template: str | None
    special_tokens: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)


# --- checks of what a checkpoint claims -----------------------------------------------------------

MAX_SIZE = 2**31 - 1  # a dimension, count or context of a model: int32 in the graphs


def gguf_number(meta: dict, key: str, kind: type = int, default: int | float | None = None) -> int | float:
    """meta[key] (or default) as a positive int (kind=int) or a positive finite number (kind=float):
    every size and rope/norm constant a config reads is one. SourceFormatError otherwise."""
    value = meta.get(key, default)
    if value is None:
        raise SourceFormatError(f"GGUF metadata lacks {key}")
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise SourceFormatError(f"GGUF metadata {key} should be a{'n integer' if kind is int else ' number'}, "
                                f"not {type(value).__name__} {str(value)[:40]}")
    if not (0 < value <= MAX_SIZE if kind is int else 0 < value < float("inf")):
        raise SourceFormatError(f"GGUF metadata {key} = {value} is out of range for a model")
    return kind(value)


def check_shapes(weights: dict[str, Weight], expected, optional: set[str] = frozenset()) -> None:
    """Every (name, shape) of expected (an iterable: checked lazily, so a huge layer count claimed by
    damaged metadata fails at the first missing tensor) is in weights with that shape; names in
    optional may be absent. SourceFormatError naming the first tensor that is not."""
    for name, shape in expected:
        w = weights.get(name)
        if w is None:
            if name in optional:
                continue
            raise SourceFormatError(f"the checkpoint lacks tensor {name} (its metadata describes a model with it)")
        if tuple(w.shape) != tuple(shape):
            raise SourceFormatError(f"tensor {name} has shape {list(w.shape)}, the model's metadata implies "
                                    f"{list(shape)}: the checkpoint is damaged or inconsistent")


def check_attention(cfg) -> None:
    """What the graph needs of a config's attention sizes: query heads that share the KV heads evenly
    and an even head size (rope rotates pairs of dimensions)."""
    if cfg.num_heads % cfg.num_kv_heads or cfg.head_dim % 2:
        raise SourceFormatError(f"the model's metadata is inconsistent: {cfg.num_heads} heads over "
                                f"{cfg.num_kv_heads} KV heads of size {cfg.head_dim} (the heads must share the KV "
                                "heads evenly, the head size must be even)")
