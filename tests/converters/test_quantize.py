"""Quantization: GGUF blocks carried over bit-exactly, float weights quantized group-wise."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from ondevice.converters.canonical import QTensor
from ondevice.converters.quantize import (LOSSLESS, Blocks, QuantSpec, concat_rows, quantize_linear,
                                          quantize_rtn)


def gguf_tensor(kind: str, rows=48, cols=96, seed=0) -> QTensor:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    qtype = GGMLQuantizationType[kind]
    return QTensor(kind, (rows, cols), gguf_quantize(w, qtype), int(qtype))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_are_repacked_bit_exactly(kind):
    t = gguf_tensor(kind)
    blocks = LOSSLESS[kind](t)
    assert np.array_equal(blocks.dequantize(), t.dequantize())


def test_q4_1_blocks_whose_scale_is_zero_stay_exact():
    t = gguf_tensor("Q4_1")
    w = t.dequantize()
    w[:, :32] = 0.25  # a constant block quantizes to d == 0, m == 0.25
    qtype = GGMLQuantizationType.Q4_1
    t = QTensor("Q4_1", t.shape, gguf_quantize(w, qtype), int(qtype))
    assert np.array_equal(LOSSLESS["Q4_1"](t).dequantize(), t.dequantize())


def test_4bit_codes_pack_two_per_byte_low_nibble_first():
    codes = np.arange(32, dtype=np.uint8).reshape(1, 1, 32) % 16
    b = Blocks(codes, np.ones((1, 1), np.float32), None, 4, "test")
    packed = b.packed()
    assert packed.shape == (1, 1, 16)
    assert packed[0, 0, 0] == (0 | 1 << 4) and packed[0, 0, 1] == (2 | 3 << 4)


def test_packed_zero_points_pad_odd_block_counts():
    zp = np.array([[1, 2, 3]], np.uint8)
    b = Blocks(np.zeros((1, 3, 32), np.uint8), np.ones((1, 3), np.float32), zp, 4, "test")
    assert b.packed_zero_points().tolist() == [[1 | 2 << 4, 3]]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_is_within_half_a_step(bits, symmetric):
    w = np.random.default_rng(1).standard_normal((16, 128)).astype(np.float32)
    b = quantize_rtn(w, bits=bits, block_size=32, symmetric=symmetric)
    err = np.abs(b.dequantize() - w).reshape(16, 4, 32).max(-1)
    assert np.all(err <= b.scales * 0.5 + 1e-6)


def test_rtn_rejects_a_block_size_that_does_not_divide_the_input():
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize_rtn(np.zeros((4, 40), np.float32), block_size=32)


def test_concat_rows_fuses_without_changing_any_weight():
    a, b = LOSSLESS["Q4_1"](gguf_tensor("Q4_1", seed=1)), LOSSLESS["Q4_0"](gguf_tensor("Q4_0", seed=2))
    fused = concat_rows([a, b])
    assert np.array_equal(fused.dequantize(), np.concatenate([a.dequantize(), b.dequantize()]))


def test_quantize_linear_never_requantizes_exact_gguf_blocks():
    q41 = gguf_tensor("Q4_1")
    assert quantize_linear(q41, QuantSpec("q4")).source == "Q4_1 repacked"
    assert quantize_linear(q41, QuantSpec("q8")).source == "Q4_1 repacked"  # 4-bit kept under q8
    q8 = gguf_tensor("Q8_0")
    assert quantize_linear(q8, QuantSpec("q4")).bits == 4  # a Q8_0 layer becomes 4-bit under q4
    assert quantize_linear(q8, QuantSpec("q4"), keep_8bit=True).source == "Q8_0 repacked"


def test_float_weights_are_quantized_group_wise():
    w = np.random.default_rng(3).standard_normal((8, 256)).astype(np.float32)
    b = quantize_linear(w, QuantSpec("q4", block_size=64))
    assert b.bits == 4 and b.block_size == 64 and b.source == "rtn asym g64"
    assert quantize_linear(w, QuantSpec("q4", symmetric=True)).source == "rtn sym g32"


def test_other_gguf_types_are_dequantized_then_quantized_group_wise():
    q5 = gguf_tensor("Q5_0")  # not repackable into MatMulNBits: goes through float
    b = quantize_linear(q5, QuantSpec("q4"))
    assert b.source == "rtn asym g32"
    assert np.abs(b.dequantize() - q5.dequantize()).max() <= b.scales.max() * 0.5 + 1e-6


def test_float_modes_return_float_weights():
    t = gguf_tensor("Q4_1")
    assert quantize_linear(t, QuantSpec("fp32")).dtype == np.float32
    assert quantize_linear(t, QuantSpec("fp16")).dtype == np.float16


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown quantization mode"):
        QuantSpec("q3")
