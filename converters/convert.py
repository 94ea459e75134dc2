"""Checkpoint -> canonical weights -> quantize -> ONNX graph -> bundle, in one atomic step."""

from __future__ import annotations

import time
from pathlib import Path

from tokenizers import Tokenizer
from tqdm import tqdm

from ondevice.bundle import atomic_bundle_dir, write_manifest
from ondevice.converters.arch import get_architecture
from ondevice.converters.canonical import Checkpoint
from ondevice.converters.export_onnx import GraphBuilder
from ondevice.converters.quantize import QuantSpec
from ondevice.converters.sources import read_source, resolve_source
from ondevice.errors import SourceFormatError

CONVERTER_VERSION = "0.1.0"
# Tokens that end an assistant turn in common chat formats; used as extra stop ids when present.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "</s>")
COMPUTE_ACCURACY_LEVEL = {"float": 0, "int8": 4}  # -> MatMulNBits accuracy_level
GENERATION_DEFAULTS = {"temperature": 0.2, "top_k": 0, "top_p": 0.9, "min_p": 0.0,
                       "repetition_penalty": 1.0, "max_tokens": 256}


def convert(source: str | Path, out: str | Path, *, quant: str = "q4", block_size: int = 32,
            symmetric: bool = False, max_context: int | None = None, compute: str = "float",
            force: bool = False, progress: bool = True) -> Path:
    """Convert a GGUF file or Hugging Face folder (or a model alias) into an ONNX bundle at `out`.

    compute: "float" (exact: greedy output equals a float reference on the same weights) or "int8"
    (MatMulNBits quantizes activations to int8, as llama.cpp and onnxruntime-genai do: faster, not exact).
    """
    if compute not in COMPUTE_ACCURACY_LEVEL:
        raise ValueError(f"compute must be one of {', '.join(COMPUTE_ACCURACY_LEVEL)}, not {compute!r}")
    spec = QuantSpec(quant, block_size, symmetric)
    started = time.perf_counter()
    with tqdm(total=4, desc="convert", disable=not progress, unit="step") as steps:
        return _convert(source, out, spec, max_context, compute, force, steps, started)


def _convert(source, out, spec: QuantSpec, max_context, compute, force, steps, started) -> Path:
    quant = spec.mode
    accuracy_level = COMPUTE_ACCURACY_LEVEL[compute]
    path = resolve_source(source)

    steps.set_postfix_str(f"reading {path.name}")
    ckpt = read_source(path)
    arch = get_architecture(ckpt.architecture)
    fmt = ckpt.provenance["format"]
    cfg = (arch.config_from_gguf if fmt == "gguf" else arch.config_from_hf)(ckpt.metadata, ckpt.weights)
    weights = (arch.canonical_from_gguf if fmt == "gguf" else arch.canonical_from_hf)(ckpt.weights, cfg)
    context = min(max_context or cfg.max_context, cfg.max_context)
    steps.update()

    with atomic_bundle_dir(out, force=force) as tmp:
        steps.set_postfix_str(f"quantizing ({quant}) and building the graph")
        g = GraphBuilder(f"{ckpt.architecture}-{quant}", accuracy_level=accuracy_level)
        quant_record = arch.build(g, cfg, weights, spec, context)
        steps.update()
        steps.set_postfix_str("writing the graph")
        graph_file, data_file = g.save(tmp)
        steps.update()
        (tmp / "tokenizer.json").write_text(ckpt.tokenizer_json)
        manifest = {
            "converter": {"name": "ondevice", "version": CONVERTER_VERSION},
            "source": ckpt.provenance,
            "architecture": ckpt.architecture,
            "config": cfg.to_dict(),
            "max_context": context,
            "quantization": {"mode": spec.mode, "block_size": spec.block_size, "symmetric": spec.symmetric,
                             "compute": compute, "accuracy_level": accuracy_level, "tensors": quant_record},
            "backends": {"onnx": {
                "graph": graph_file, "data": data_file,
                "inputs": g.signature["inputs"], "outputs": g.signature["outputs"],
                "kv_cache": {"layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
                             "head_dim": cfg.head_dim, "layout": "BNSH", "dtype": "float32",
                             "shared_past_present": True},
            }},
            "tokenizer": {"file": "tokenizer.json", "chat_template": ckpt.chat_template,
                          **_special_ids(ckpt)},
            "generation": dict(GENERATION_DEFAULTS),
            "conversion_seconds": round(time.perf_counter() - started, 2),
        }
        write_manifest(tmp, manifest)
        steps.update()
    return Path(out)


def _special_ids(ckpt: Checkpoint) -> dict:
    tok = Tokenizer.from_str(ckpt.tokenizer_json)
    special = ckpt.special_tokens

    def token_id(kind: str) -> int | None:
        if isinstance(special.get(f"{kind}_token_id"), int):
            return special[f"{kind}_token_id"]
        name = special.get(f"{kind}_token")
        return tok.token_to_id(name) if isinstance(name, str) else None

    bos, eos = token_id("bos"), token_id("eos")
    if eos is None:
        raise SourceFormatError("the checkpoint names no end-of-sequence token")
    stops = [eos] + [i for t in _END_OF_TURN if (i := tok.token_to_id(t)) is not None and i != eos]
    return {"bos_token_id": bos, "eos_token_ids": stops,
            "add_bos_token": bool(special.get("add_bos_token", False)),
            "vocab_size": tok.get_vocab_size()}
