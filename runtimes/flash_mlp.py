"""The MLP the runtime computes itself when the FFN weights live in a flash store: over the neurons it
holds in DRAM (converters/flash_graphs.py cuts the decoder graph at the MLPs)."""

from __future__ import annotations

import numpy as np


def swiglu(gate: np.ndarray, up: np.ndarray, down: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x [T, H] through the neurons given: gate/up [N, H] (a neuron per row), down [H, N] -> [T, H].
    With every neuron this is the model's MLP; with a subset, the others count as zero."""
    g = x @ gate.T
    return ((g / (1.0 + np.exp(-g))) * (x @ up.T)) @ down.T
