"""Read a GGUF file (with the `gguf` package) into a Checkpoint, validating it on the way."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ondevice.bundle import sha256_file
from ondevice.converters.canonical import Checkpoint, QTensor
from ondevice.errors import SourceFormatError

GGUF_MAGIC = b"GGUF"
_FLOAT_TYPES = {"F32", "F16", "BF16"}


def _field_value(field):
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - an odd metadata type we do not use
        return None


def open_gguf(path: Path):
    """A GGUFReader over a file that is checked to be a complete GGUF."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise SourceFormatError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise SourceFormatError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/... on damaged headers
        raise SourceFormatError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from e
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise SourceFormatError(f"{path}: truncated (tensor {t.name} ends past the end of the file)")
    return reader


def read_gguf(path: Path) -> Checkpoint:
    from ondevice.converters.sources import gguf_tokenizer

    path = Path(path)
    reader = open_gguf(path)
    meta = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if not arch:
        raise SourceFormatError(f"{path}: GGUF metadata has no general.architecture")
    weights = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        rows_cols = tuple(int(d) for d in reversed(t.shape.tolist()))
        if kind in _FLOAT_TYPES:
            data = t.data if kind != "BF16" else _bf16_to_f32(t.data)
            weights[t.name] = np.asarray(data, dtype=np.float32).reshape(rows_cols)
        else:
            if len(rows_cols) != 2:
                raise SourceFormatError(f"{path}: quantized tensor {t.name} is not 2-D")
            weights[t.name] = QTensor(kind, rows_cols, np.asarray(t.data), int(t.tensor_type))
    try:
        tokenizer_json = gguf_tokenizer.tokenizer_json_from_gguf(reader)
    except KeyError as e:
        raise SourceFormatError(f"{path}: GGUF has no tokenizer ({e})") from e
    return Checkpoint(
        architecture=str(arch),
        metadata=meta,
        weights=weights,
        tokenizer_json=tokenizer_json,
        chat_template=gguf_tokenizer.chat_template_from_gguf(reader),
        special_tokens=gguf_tokenizer.special_tokens_from_gguf(reader),
        provenance={"format": "gguf", "file": path.name, "bytes": path.stat().st_size,
                    "sha256": sha256_file(path), "name": meta.get("general.name")},
    )


def _bf16_to_f32(data: np.ndarray) -> np.ndarray:
    return (np.asarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
