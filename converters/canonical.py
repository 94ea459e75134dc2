"""Canonical weights: one naming scheme (Hugging Face's), [out, in] layout, for every source.

A weight is either a float numpy array or a `QTensor` that keeps a GGUF tensor's raw blocks so
that the quantizer can repack them without loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
