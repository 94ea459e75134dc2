"""The bundle: a directory with manifest.json, the one contract between converter and runtime.

Reading checks the format version, that every path stays inside the bundle and (unless told not
to) that every file matches its sha256. Writing is atomic: files go to a temporary sibling
directory that is renamed onto the target only when complete.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ondevice.errors import BundleError, BundleExistsError

FORMAT = "ondevice-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOCAB_MAP = "vocab_map.i32"  # a draft's logit column -> token id, raw little-endian int32
ORIGINAL_IDS = "original_ids.i32"  # a vocabulary-trimmed bundle: token id -> id in the source model


@dataclass
class Bundle:
    path: Path
    manifest: dict

    def file(self, name: str) -> Path:
        return resolve_inside(self.path, name)

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def max_context(self) -> int:
        return int(self.manifest["max_context"])

    def vocab_map(self) -> np.ndarray | None:
        """For a draft whose LM head keeps only some rows: the token id of each logit column
        (int64 [V]); None when the logits cover the whole vocabulary.

        Read from `vocab_map.i32` (raw little-endian int32, listed with its checksum) and checked:
        V entries, distinct ids inside the vocabulary, as many as the graph has logits."""
        entry = self.manifest.get("vocab_map")
        if entry is None:
            return None
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and isinstance(entry.get("size"), int) and entry["size"] > 0):
            raise BundleError(f"{self.path}: manifest 'vocab_map' needs a file name and a positive size; "
                              "re-convert the draft")
        path, size = self.file(entry["file"]), entry["size"]
        if not path.is_file() or path.stat().st_size != 4 * size:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "no file"
            raise BundleError(f"{self.path}: vocab map {entry['file']} should hold {size} int32 ids "
                              f"({4 * size} bytes), found {found}; re-convert the draft")
        ids = np.fromfile(path, dtype="<i4").astype(np.int64)
        vocab = int(self.config.get("vocab_size", 0))
        if ids.min() < 0 or ids.max() >= vocab:
            raise BundleError(f"{self.path}: vocab map names token ids outside the vocabulary of {vocab}; "
                              "re-convert the draft")
        if len(np.unique(ids)) != size:
            raise BundleError(f"{self.path}: vocab map names a token id twice; re-convert the draft")
        width = self.logits_width()
        if width is not None and width != size:
            raise BundleError(f"{self.path}: vocab map has {size} ids but the graph computes {width} logits; "
                              "re-convert the draft")
        return ids

    def logits_width(self) -> int | None:
        """How many logits per position the ONNX graph computes (its signature's last dimension)."""
        outputs = (self.manifest["backends"].get("onnx") or {}).get("outputs") or []
        shape = next((o.get("shape") for o in outputs if o.get("name") == "logits"), None)
        return shape[-1] if shape and isinstance(shape[-1], int) else None


def resolve_inside(root: Path, name: str) -> Path:
    """root/name, refusing absolute paths and anything that escapes root (.., symlinks)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name or "\x00" in name:
        raise BundleError(f"manifest names an invalid path {name!r}: bundle paths are plain relative names")
    root = root.resolve()
    target = (root / name).resolve()
    if root not in target.parents:
        raise BundleError(f"manifest names a path outside the bundle: {name!r}")
    return target


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path}: not a bundle (no {MANIFEST}); create one with `ondevice convert`")
    manifest = read_manifest_json(manifest_path)
    check_manifest(path, manifest)
    files = manifest["files"]
    for name, info in files.items():
        target = resolve_inside(path, name)
        if not target.is_file():
            raise BundleError(f"{path}: missing file {name}; the bundle is incomplete, re-convert it")
        if target.stat().st_size != info["bytes"]:
            raise BundleError(f"{path}: {name} has {target.stat().st_size} bytes, the manifest says "
                              f"{info['bytes']}: truncated or modified; re-convert the model")
    for name in _referenced_files(manifest):
        if name not in files and not any(f.startswith(name + "/") for f in files):  # a file, or a directory's files
            resolve_inside(path, name)
            raise BundleError(f"{path}: manifest references {name!r} but lists no checksum for it")
    bundle = Bundle(path, manifest)
    if verify:
        verify_checksums(bundle)
    return bundle


MAX_MANIFEST_BYTES = 16 << 20  # far above any manifest the converter writes; bounds what json.loads builds
INT32_MAX = 2**31 - 1  # positions, ids and sizes are int32 in the graphs
_CONFIG_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim")
_KV_SIZES = {"layers": "num_layers", "num_kv_heads": "num_kv_heads", "head_dim": "head_dim"}  # -> config key
# generation defaults: key -> (integer only, the range the sampler accepts, its description)
_GENERATION = {
    "temperature": (False, lambda v: v >= 0, ">= 0"),
    "top_k": (True, lambda v: v >= 0, ">= 0"),
    "top_p": (False, lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": (False, lambda v: 0 <= v < 1, "in [0, 1)"),
    "repetition_penalty": (False, lambda v: v > 0, "> 0"),
    "max_tokens": (True, lambda v: 1 <= v <= INT32_MAX, f"in 1..{INT32_MAX}"),
}
_SHA256_HEX = frozenset("0123456789abcdef")


def read_manifest_json(manifest_path: Path) -> object:
    """The parsed manifest.json; BundleError when it is not JSON (or absurdly large or deep)."""
    size = manifest_path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path}: {size} bytes is not a manifest (at most {MAX_MANIFEST_BYTES}); "
                          "re-run `ondevice convert`")
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
        raise BundleError(f"{manifest_path}: corrupt manifest ({type(e).__name__}: {str(e)[:200]}); "
                          "re-run `ondevice convert`") from e


def check_manifest(path: Path, manifest: object) -> None:
    """Refuse a manifest whose entries lack the types and ranges the runtime reads them with (a damaged
    file, or one from another converter), naming the entry: afterwards the readers of the manifest
    can index it without checks. Sections only some runtimes read (flash, tflite, coreml, ...) are
    checked here only as far as read_bundle follows their file names."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: manifest is not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {_brief(manifest.get('format_version'))} is not "
                          f"supported by this runtime (it reads version {FORMAT_VERSION}); re-convert the model")
    config = _mapping(path, "config", manifest.get("config"))
    vocab = _size(path, "config.vocab_size", config.get("vocab_size"))
    for key in _CONFIG_SIZES:
        if key in config:
            _size(path, f"config.{key}", config[key])
    _size(path, "max_context", manifest.get("max_context"))
    backends = _mapping(path, "backends", manifest.get("backends"))
    for name, backend in backends.items():
        _mapping(path, f"backends.{name}", backend)
        _name(path, f"backends.{name}.graph", backend.get("graph"))
        _name(path, f"backends.{name}.data", backend.get("data"), optional=True)
    if "onnx" in backends:
        _check_onnx(path, backends["onnx"], config)
        width = Bundle(path, manifest).logits_width()
        if width is not None and not 1 <= width <= vocab:
            raise _wrong(path, "backends.onnx.outputs[logits].shape[-1]", width, f"a width in 1..{vocab} "
                         "(config.vocab_size)")
    check_tokenizer_entry(path, manifest.get("tokenizer"), vocab)
    generation = _mapping(path, "generation", manifest.get("generation", {}))
    for key, (integer, in_range, wanted) in _GENERATION.items():
        if key in generation:
            _number(path, f"generation.{key}", generation[key], integer, in_range,
                    f"{'an integer' if integer else 'a number'} {wanted}")
    files = _mapping(path, "files", manifest.get("files"))
    for name, info in files.items():
        entry = _mapping(path, f"files.{name}", info)
        _number(path, f"files.{name}.bytes", entry.get("bytes"), True, lambda v: v >= 0, "a size in bytes")
        digest = entry.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX):
            raise _wrong(path, f"files.{name}.sha256", digest, "a sha256 in hex")
    trim = manifest.get("trim")
    if trim is not None:
        _name(path, "trim.original_ids", _mapping(path, "trim", trim).get("original_ids"), optional=True)
    flash = manifest.get("flash")
    if flash is not None:
        _name(path, "flash.file", _mapping(path, "flash", flash).get("file"))
        predictor = flash.get("predictor")
        if predictor is not None:
            for key in ("file", "description"):
                _name(path, f"flash.predictor.{key}", _mapping(path, "flash.predictor", predictor).get(key),
                      optional=True)


def check_tokenizer_entry(path: Path, info: object, vocab: int | None = None) -> dict:
    """The manifest's tokenizer section, checked: ids are ints (below vocab, when known), flags bools."""
    info = _mapping(path, "tokenizer", info)
    _name(path, "tokenizer.file", info.get("file"), optional=True)
    limit = (vocab or INT32_MAX + 1) - 1
    ids = [("tokenizer.bos_token_id", info.get("bos_token_id"))]
    eos = info.get("eos_token_ids", [])
    if not isinstance(eos, list):
        raise _wrong(path, "tokenizer.eos_token_ids", eos, "a list of token ids")
    ids += [(f"tokenizer.eos_token_ids[{i}]", t) for i, t in enumerate(eos)]
    for where, token_id in ids:
        if token_id is not None:
            _number(path, where, token_id, True, lambda v: 0 <= v <= limit, f"a token id in 0..{limit}")
    if not isinstance(info.get("add_bos_token", False), bool):
        raise _wrong(path, "tokenizer.add_bos_token", info.get("add_bos_token"), "true or false")
    if not isinstance(info.get("chat_template"), (str, type(None))):
        raise _wrong(path, "tokenizer.chat_template", info.get("chat_template"), "a jinja template (text)")
    return info


def _check_onnx(path: Path, onnx: dict, config: dict) -> None:
    for io in ("inputs", "outputs"):
        entries = onnx.get(io, [])
        if not isinstance(entries, list):
            raise _wrong(path, f"backends.onnx.{io}", entries, "a list of tensor signatures")
        for i, entry in enumerate(entries):
            where = f"backends.onnx.{io}[{i}]"
            entry = _mapping(path, where, entry)
            if not isinstance(entry.get("name"), str):
                raise _wrong(path, f"{where}.name", entry.get("name"), "a tensor name")
            shape = entry.get("shape", [])
            if not (isinstance(shape, list) and all(isinstance(d, str) or _is_int(d) and 0 <= d <= INT32_MAX
                                                    for d in shape)):
                raise _wrong(path, f"{where}.shape", shape, "a list of sizes and dimension names")
    kv = _mapping(path, "backends.onnx.kv_cache", onnx.get("kv_cache"))
    for key, config_key in _KV_SIZES.items():
        size = _size(path, f"backends.onnx.kv_cache.{key}", kv.get(key))
        if config.get(config_key, size) != size:
            raise _wrong(path, f"backends.onnx.kv_cache.{key}", size, f"config.{config_key} ({config[config_key]})")
    split = onnx.get("split_prefill")
    if split is not None:  # converters/split_prefill.py: one graph per role, two per layer
        _mapping(path, "backends.onnx.split_prefill", split)
        for role in ("embed", "attention", "head"):
            _name(path, f"backends.onnx.split_prefill.{role}.graph",
                  _mapping(path, f"backends.onnx.split_prefill.{role}", split.get(role)).get("graph"))
        for i, layer in enumerate(_list(path, "backends.onnx.split_prefill.layers", split.get("layers"))):
            for key, name in _mapping(path, f"backends.onnx.split_prefill.layers[{i}]", layer).items():
                _name(path, f"backends.onnx.split_prefill.layers[{i}].{key}", name)
    layered = onnx.get("flash_graphs")
    if layered is not None:  # converters/flash_graphs.py: embed, one graph per layer, head
        _mapping(path, "backends.onnx.flash_graphs", layered)
        for key in ("embed", "head"):
            _name(path, f"backends.onnx.flash_graphs.{key}", layered.get(key))
        for i, name in enumerate(_list(path, "backends.onnx.flash_graphs.layers", layered.get("layers"))):
            _name(path, f"backends.onnx.flash_graphs.layers[{i}]", name)
    int8 = onnx.get("prefill_int8")
    if int8 is not None:  # the optional int8 prefill graph
        _mapping(path, "backends.onnx.prefill_int8", int8)
        _name(path, "backends.onnx.prefill_int8.graph", int8.get("graph"))
        _name(path, "backends.onnx.prefill_int8.data", int8.get("data"), optional=True)
        chunks = int8.get("chunk_sizes", [1])
        if not (isinstance(chunks, list) and chunks):
            raise _wrong(path, "backends.onnx.prefill_int8.chunk_sizes", chunks, "a list of chunk sizes")
        for i, chunk in enumerate(chunks):
            _size(path, f"backends.onnx.prefill_int8.chunk_sizes[{i}]", chunk)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _wrong(path: Path, where: str, value: object, wanted: str) -> BundleError:
    found = "nothing" if value is None else f"{type(value).__name__} {_brief(value)}"
    return BundleError(f"{path}: manifest entry {where} should be {wanted}, found {found}: the bundle is damaged "
                       "or was written by an incompatible converter; re-convert the model")


def _mapping(path: Path, where: str, value: object) -> dict:
    if not isinstance(value, dict):
        raise _wrong(path, where, value, "a mapping")
    return value


def _list(path: Path, where: str, value: object) -> list:
    if not isinstance(value, list):
        raise _wrong(path, where, value, "a list")
    return value


def _name(path: Path, where: str, value: object, optional: bool = False) -> None:
    if not (isinstance(value, str) and value or optional and value is None):
        raise _wrong(path, where, value, "a file name")


def _size(path: Path, where: str, value: object) -> int:
    return _number(path, where, value, True, lambda v: 1 <= v <= INT32_MAX, f"an integer in 1..{INT32_MAX}")


def _number(path: Path, where: str, value: object, integer: bool, in_range, wanted: str):
    """value, if it is an int (or, unless integer, a finite float) for which in_range holds."""
    is_number = _is_int(value) or not integer and isinstance(value, float) and math.isfinite(value)
    if not (is_number and in_range(value)):
        raise _wrong(path, where, value, wanted)
    return value


def verify_checksums(bundle: Bundle) -> None:
    """sha256 of every file against the manifest (hashlib releases the GIL: this can run in a thread)."""
    for name, info in bundle.manifest["files"].items():
        if sha256_file(bundle.file(name)) != info["sha256"]:
            raise BundleError(f"{bundle.path}: checksum mismatch for {name}: the file was modified or corrupted; "
                              "re-convert the model (or pass --no-verify to skip the check)")


def _referenced_files(manifest: dict) -> list[str]:
    vocab_map = manifest.get("vocab_map")
    names = [manifest.get("tokenizer", {}).get("file"), vocab_map.get("file") if isinstance(vocab_map, dict) else None]
    trimmed = manifest.get("trim")
    names.append(trimmed.get("original_ids") if isinstance(trimmed, dict) else None)
    flash = manifest.get("flash")
    if isinstance(flash, dict):  # converters/flash.py: the FFN store; converters/sparsity.py: predictors
        predictor = flash.get("predictor")
        names += [flash.get("file"), *([predictor.get("file"), predictor.get("description")]
                                       if isinstance(predictor, dict) else [])]
    for backend in manifest.get("backends", {}).values():
        names += [backend.get("graph"), backend.get("data")]
        split = backend.get("split_prefill")
        if isinstance(split, dict):  # converters/split_prefill.py: one graph per role, two per layer
            names += [(split.get(role) or {}).get("graph") for role in ("embed", "attention", "head")]
            names += [f for layer in split.get("layers") or [] if isinstance(layer, dict) for f in layer.values()]
        layered = backend.get("flash_graphs")
        if isinstance(layered, dict):  # converters/flash_graphs.py: embed, one graph per layer, head
            names += [layered.get("embed"), layered.get("head"), *(layered.get("layers") or [])]
        extra = backend.get("prefill_int8") if isinstance(backend, dict) else None
        if isinstance(extra, dict):  # the optional int8 prefill graph
            names += [extra.get("graph"), extra.get("data")]
    return [n for n in names if n]


@contextlib.contextmanager
def atomic_bundle_dir(target: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yields a temporary directory next to target; on success it replaces target in one rename."""
    target = Path(target)
    remove_stale_temp_dirs(target)  # first: it may move back the previous bundle of a killed --force
    if target.exists() and not force:
        raise BundleExistsError(f"{target} exists; pass --force (force=True) to overwrite it")
    if target.exists() and not (target / MANIFEST).is_file() and (not target.is_dir() or any(target.iterdir())):
        raise BundleExistsError(f"{target} exists and is not a bundle; --force only replaces bundles "
                                "(or empty directories): choose another output path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        _sync(tmp)
        if target.exists():
            _swap_into_place(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(new: Path, target: Path) -> None:
    """Replace the directory target with new, so that target is never absent and never partial.

    Linux swaps the two names in one renameat2(RENAME_EXCHANGE). Elsewhere the old bundle is moved
    aside to .NAME.old-PID first; a kill between the two renames leaves target absent, and the next
    conversion to target (remove_stale_temp_dirs) moves that old bundle back."""
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # new now holds the old bundle
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)  # put the old bundle back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names a and b (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system or kernel cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), os.fspath(b))


def remove_stale_temp_dirs(target: Path) -> list[Path]:
    """Clean up after a conversion to target that was killed: its temporary siblings
    (.NAME.partial-PID-*, .NAME.old-PID) whose process is gone are removed (a live conversion to the
    same target keeps its own), except an old bundle whose replacement never arrived (target absent),
    which is moved back to target. Returns the removed paths."""
    removed = []
    for p in sorted(target.parent.glob(glob.escape(f".{target.name}.") + "*-*")):
        kind, _, rest = p.name[len(target.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("partial", "old") or not pid.isdigit() or not p.is_dir() or _alive(int(pid)):
            continue
        if kind == "old" and not target.exists() and (p / MANIFEST).is_file():
            os.replace(p, target)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _files(folder: Path) -> list[Path]:
    """Every regular file under folder (a Core ML model is a directory), in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _sync(folder: Path) -> None:
    """Put the files on storage before the rename publishes them: a crash then leaves either the old
    bundle or a complete new one, never a renamed folder of empty files."""
    for p in _files(folder):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _default_permissions(folder: Path) -> None:
    """Give the bundle the permissions of an ordinary directory and files (umask applies): mkdtemp makes
    the directory 0700, and onnx writes the external data file 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def write_manifest(folder: Path, manifest: dict) -> None:
    """Fill in the checksums of every file in folder, then write manifest.json."""
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
    manifest["files"] = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _files(folder) if p.relative_to(folder).as_posix() != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
