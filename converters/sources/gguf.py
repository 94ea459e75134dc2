"""Read a GGUF file (with the `gguf` package) into a Checkpoint, validating it on the way."""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import numpy as np

from ondevice.bundle import sha256_file
from ondevice.converters.canonical import Checkpoint, QTensor
from ondevice.errors import SourceFormatError

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
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
    check_layout(path)
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/... on damaged headers
        raise SourceFormatError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from e


# --- the header, checked before GGUFReader reads it -----------------------------------------------
# GGUFReader trusts every count in the header: it loops over an array's length element by element
# (2**31 of them is a hang) and maps tensors whose sizes it multiplies in uint64 (which can wrap).

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY = 1 << 22  # elements of one metadata array: far more than any vocabulary or merge list
_MIN_KV_BYTES = 8 + 4 + 1  # key length, type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
GGUF_VERSIONS = (2, 3)  # what GGUFReader reads


class _Cursor:
    """Reads a GGUF header front to back; every read and every count is checked against the bytes left."""

    def __init__(self, path: Path, data, byteorder: str):
        self.path, self.data, self.byteorder, self.pos = path, data, byteorder, 0

    def fail(self, what: str) -> SourceFormatError:
        return SourceFormatError(f"{self.path}: corrupt or truncated GGUF ({what}); re-download or re-export it")

    def take(self, n: int, what: str) -> int:
        if n > len(self.data) - self.pos:
            raise self.fail(f"{what} at byte {self.pos} runs past the end of the file ({len(self.data)} bytes)")
        self.pos += n
        return self.pos - n

    def uint(self, size: int, what: str) -> int:
        at = self.take(size, what)
        return int.from_bytes(self.data[at:at + size], self.byteorder)

    def string(self, what: str) -> bytes:
        n = self.uint(8, f"the length of {what}")
        at = self.take(n, f"{what} ({n} bytes)")
        return self.data[at:at + n]

    def text(self, what: str) -> str:
        raw = self.string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} {raw[:40]!r} is not UTF-8") from e

    def fits(self, count: int, min_bytes: int, what: str) -> None:
        left = len(self.data) - self.pos
        if count * min_bytes > left:
            raise self.fail(f"{count} {what} cannot fit in the {left} bytes left")


def check_layout(path: Path) -> None:
    """Walk the GGUF header: version, counts, string and array lengths, value types, tensor dimensions,
    types and offsets, each checked against the file size. SourceFormatError on the first that is wrong."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _walk(Path(path), data)


def _walk(path: Path, data) -> None:
    cur = _Cursor(path, data, "little")
    cur.take(4, "the magic")
    version = cur.uint(4, "the version")
    if version & 0xFFFF == 0:  # written on a big-endian machine (GGUFReader swaps it too)
        cur.byteorder = "big"
        version = int.from_bytes(data[4:8], "big")
    if version not in GGUF_VERSIONS:
        raise SourceFormatError(f"{path}: GGUF version {version} is not supported (this reader handles "
                                f"{' and '.join(map(str, GGUF_VERSIONS))}); re-export the model with a current llama.cpp")
    n_tensors, n_kv = cur.uint(8, "the tensor count"), cur.uint(8, "the metadata count")
    cur.fits(n_kv, _MIN_KV_BYTES, "metadata entries")
    alignment, keys = GGUF_DEFAULT_ALIGNMENT, set()
    for _ in range(n_kv):
        key = _new_name(cur, keys, "metadata key", "a metadata key")
        kind = cur.uint(4, f"the type of {key}")
        at = cur.pos
        _skip_value(cur, kind, key)
        if key == "general.alignment":
            alignment = int.from_bytes(data[at:at + 4], cur.byteorder) if kind == _UINT32 else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise cur.fail("general.alignment is not a uint32 power of two")
    cur.fits(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor infos")
    infos, names = [], set()
    for _ in range(n_tensors):
        name = _new_name(cur, names, "tensor", "a tensor name")
        n_dims = cur.uint(4, f"the dimension count of {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise cur.fail(f"tensor {name} has {n_dims} dimensions (GGUF allows 1 to {_MAX_DIMS})")
        dims = [cur.uint(8, f"a dimension of {name}") for _ in range(n_dims)]
        infos.append((name, dims, cur.uint(4, f"the type of {name}"), cur.uint(8, f"the offset of {name}")))
    data_start = -(-cur.pos // alignment) * alignment
    for name, dims, kind, offset in infos:
        _check_tensor(cur, name, dims, kind, offset, alignment, data_start)


def _new_name(cur: _Cursor, seen: set[str], what: str, described: str) -> str:
    """The next string of the header, a name that must not repeat one in seen (which it joins)."""
    name = cur.text(described)
    if name in seen:
        raise cur.fail(f"{what} {name!r} appears twice")
    seen.add(name)
    return name


def _skip_value(cur: _Cursor, kind: int, key: str) -> None:
    if kind in _SCALAR_SIZES:
        cur.take(_SCALAR_SIZES[kind], f"the value of {key}")
    elif kind == _STRING:
        cur.string(f"the value of {key}")
    elif kind == _ARRAY:
        item, n = cur.uint(4, f"the item type of {key}"), cur.uint(8, f"the length of {key}")
        if n > _MAX_ARRAY:
            raise cur.fail(f"metadata array {key} claims {n} items (at most {_MAX_ARRAY} are read)")
        if item in _SCALAR_SIZES:
            cur.take(n * _SCALAR_SIZES[item], f"the {n} items of {key}")
        elif item == _STRING:
            cur.fits(n, 8, f"strings of {key}")
            for _ in range(n):
                cur.string(f"an item of {key}")
        else:  # llama.cpp does not read arrays of arrays either
            raise cur.fail(f"metadata array {key} has item type {item} (arrays hold numbers or strings)")
    else:
        raise cur.fail(f"metadata {key} has unknown value type {kind}")


def _check_tensor(cur: _Cursor, name: str, dims: list[int], kind: int, offset: int, alignment: int,
                  data_start: int) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if kind not in {int(t) for t in GGML_QUANT_SIZES}:
        raise cur.fail(f"tensor {name} has unknown type {kind}")
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    if dims[0] % block:
        raise cur.fail(f"tensor {name}: its rows of {dims[0]} values are not whole blocks of {block}")
    n_bytes = math.prod(dims) // block * type_size  # Python ints: no wrap-around
    if offset % alignment:
        raise cur.fail(f"tensor {name}: offset {offset} is not a multiple of the alignment {alignment}")
    if data_start + offset + n_bytes > len(cur.data):
        raise cur.fail(f"tensor {name} ({n_bytes} bytes at byte {data_start + offset}) ends past the end of "
                       f"the file ({len(cur.data)} bytes)")


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
