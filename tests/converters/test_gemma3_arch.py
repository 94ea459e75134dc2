"""Gemma 3's architecture file: config from GGUF metadata and HF config, name mapping, K-quant repacking."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from ondevice.converters.arch import gemma3, get_architecture
from ondevice.converters.convert import _check_options
from ondevice.converters.canonical import QTensor
from ondevice.converters.quantize import LOSSLESS, concat_rows
from ondevice.errors import SourceFormatError, UnsupportedArchitectureError

META = {  # gemma-3-270m's GGUF metadata
    "gemma3.context_length": 32768, "gemma3.embedding_length": 640, "gemma3.block_count": 18,
    "gemma3.feed_forward_length": 2048, "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
    "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.attention.key_length": 256,
    "gemma3.attention.value_length": 256, "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 512,
}
WEIGHTS = {"token_embd.weight": np.zeros((262144, 1), np.float32)}


def test_registered_under_the_gguf_architecture_name():
    assert get_architecture("gemma3") is gemma3


def test_config_from_gguf_metadata_uses_llama_cpp_defaults_for_what_the_file_omits():
    cfg = gemma3.config_from_gguf(META, WEIGHTS)
    assert cfg.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert cfg.layer_types.count("full_attention") == 3
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling_factor) == (1e6, 10000.0, 1.0)
    assert cfg.query_pre_attn_scalar == 256 and cfg.head_dim == 256 and cfg.tie_embeddings
    assert cfg.vocab_size == 262144 and cfg.sliding_window == 512


def test_config_from_gguf_reads_an_explicit_layer_pattern_and_local_rope_base():
    meta = {**META, "gemma3.attention.sliding_window_pattern": [True, False] * 9, "gemma3.rope.freq_base_swa": 5e4}
    cfg = gemma3.config_from_gguf(meta, WEIGHTS)
    assert cfg.layer_types[:2] == ["sliding_attention", "full_attention"] and cfg.rope_local_theta == 5e4


def test_missing_metadata_and_unknown_variants_are_clear_errors():
    meta = {k: v for k, v in META.items() if k != "gemma3.attention.sliding_window"}
    with pytest.raises(SourceFormatError, match="sliding_window"):
        gemma3.config_from_gguf(meta, WEIGHTS)
    with pytest.raises(UnsupportedArchitectureError, match="yarn"):
        gemma3.config_from_gguf({**META, "gemma3.rope.scaling.type": "yarn"}, WEIGHTS)
    with pytest.raises(UnsupportedArchitectureError, match="final_logit_softcapping"):
        gemma3.config_from_hf({"final_logit_softcapping": 30.0}, {})


def test_config_from_hf_reads_per_layer_type_rope_parameters():
    hf = {"vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
          "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "sliding_window": 512,
          "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
          "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    assert gemma3.config_from_hf(hf, {}) == gemma3.config_from_gguf(
        {**META, "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}, WEIGHTS)


def test_gguf_norms_lose_llama_cpp_s_plus_one_and_names_become_hf():
    cfg = gemma3.config_from_gguf(META, WEIGHTS)
    out = gemma3.canonical_from_gguf({"blk.3.post_ffw_norm.weight": np.array([1.5, 0.25], np.float32),
                                      "blk.3.attn_q_norm.weight": np.array([2.0], np.float32)}, cfg)
    assert out["model.layers.3.post_feedforward_layernorm.weight"].tolist() == [0.5, -0.75]
    assert out["model.layers.3.self_attn.q_norm.weight"].tolist() == [1.0]
    with pytest.raises(UnsupportedArchitectureError, match="blk.0.ffn_gate_inp"):
        gemma3.canonical_from_gguf({"blk.0.ffn_gate_inp.weight": np.zeros(2, np.float32)}, cfg)


def _random_k_quant(kind: str, rows: int = 8, cols: int = 512, seed: int = 0) -> QTensor:
    """Random K-quant blocks (gguf's Python side cannot quantize to them): any bits are valid
    codes and scales; only the fp16 super-block scales are set to sane values."""
    qtype = GGMLQuantizationType[kind]
    rng = np.random.default_rng(seed)
    size = {"Q4_K": 144, "Q6_K": 210}[kind]
    raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    halves = rng.uniform(0.001, 0.02, (rows, cols // 256, 2)).astype(np.float16).view(np.uint8)
    if kind == "Q4_K":
        raw[..., 0:4] = halves.reshape(rows, cols // 256, 4)  # d, dmin
    else:
        raw[..., 208:210] = halves[..., :2]  # d
    return QTensor(kind, (rows, cols), raw.reshape(rows, -1), int(qtype))


@pytest.mark.parametrize("kind, bits, block", [("Q4_K", 4, 32), ("Q6_K", 8, 16)])
def test_k_quant_blocks_are_repacked_bit_exactly(kind, bits, block):
    t = _random_k_quant(kind)
    blocks = LOSSLESS[kind](t)
    assert (blocks.bits, blocks.block_size) == (bits, block)
    assert np.array_equal(blocks.dequantize(), t.dequantize())


def test_q5_0_blocks_are_repacked_bit_exactly_as_8bit_and_fuse_with_q8_0():
    w = np.random.default_rng(1).standard_normal((16, 96)).astype(np.float32) * 0.05
    t5, t8 = (QTensor(k, w.shape, gguf_quantize(w, GGMLQuantizationType[k]), int(GGMLQuantizationType[k]))
              for k in ("Q5_0", "Q8_0"))
    fused = concat_rows([LOSSLESS["Q5_0"](t5), LOSSLESS["Q8_0"](t8)])
    assert np.array_equal(fused.dequantize(), np.concatenate([t5.dequantize(), t8.dequantize()]))


def test_convert_options_built_on_llama_graphs_are_refused_for_gemma3():
    with pytest.raises(UnsupportedArchitectureError, match="split_prefill, flash: not supported for architecture 'gemma3'"):
        _check_options(gemma3, "gemma3", split_prefill=256, flash="q4", int8_prefill=None)
    _check_options(gemma3, "gemma3", split_prefill=None, trim_layers=None)  # nothing asked: fine
