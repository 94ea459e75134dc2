"""Read a Hugging Face folder (config.json + *.safetensors + tokenizer.json) into a Checkpoint.

safetensors is read directly (8-byte header length, JSON header, raw little-endian data) through a
memory map, so neither torch nor the safetensors package is needed and nothing is unpickled.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ondevice.converters.canonical import Checkpoint
from ondevice.converters.sources.gguf_tokenizer import chat_template_from_hf, tokenizer_json_from_hf
from ondevice.errors import SourceFormatError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32}
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                  "Gemma3ForCausalLM": "gemma3"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if len(data) < 8:
        raise SourceFormatError(f"{path}: truncated safetensors file")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if 8 + header_len > len(data):
        raise SourceFormatError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
    except ValueError as e:
        raise SourceFormatError(f"{path}: corrupt safetensors header ({e})") from e
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in _DTYPES:
            raise SourceFormatError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        start, end = info["data_offsets"]
        if base + end > len(data):
            raise SourceFormatError(f"{path}: truncated (tensor {name} ends past the end of the file)")
        arr = data[base + start:base + end].view(_DTYPES[dtype]).reshape(info["shape"])
        if dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = np.asarray(arr, dtype=np.float32) if arr.dtype.kind == "f" else arr
    return out


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SourceFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise SourceFormatError(f"{path}: expected a JSON object")
    return value


def read_hf(folder: Path) -> Checkpoint:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceFormatError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    config = _read_json(config_path)
    archs = config.get("architectures") or [config.get("model_type", "?")]
    arch = _ARCHITECTURES.get(archs[0], config.get("model_type", archs[0]))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SourceFormatError(f"{folder}: no *.safetensors weights (.bin pickles are never loaded)")
    weights = {}
    for f in files:
        weights.update(read_safetensors(f))
    tok_config = {}
    if (folder / "tokenizer_config.json").is_file():
        tok_config = _read_json(folder / "tokenizer_config.json")
    special = {}
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = tok_config.get(k)
        token = token.get("content") if isinstance(token, dict) else token  # AddedToken form
        if isinstance(token, str):
            special[k] = token
    special["add_bos_token"] = bool(tok_config.get("add_bos_token", False))
    return Checkpoint(
        architecture=arch,
        metadata=config,
        weights=weights,
        tokenizer_json=tokenizer_json_from_hf(folder),
        chat_template=chat_template_from_hf(folder),
        special_tokens=special,
        provenance={"format": "hf", "folder": folder.name, "files": [f.name for f in files]},
    )
