"""The small protocol every backend (ONNX Runtime now; Core ML, LiteRT later) implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    max_context: int
    vocab_size: int
    capacity: int  # positions the KV cache holds now

    def ensure_capacity(self, needed: int) -> None:
        """Make the KV cache hold `needed` positions (allocated up front, not per token)."""

    def forward(self, token_ids: np.ndarray | list[int], past_len: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions past_len..; logits [1 or T, vocab]; writes their KV in place."""

    def decode_one(self, token_id: int, past_len: int) -> np.ndarray:
        """One token at position past_len; logits [1, vocab], a view valid until the next call."""
