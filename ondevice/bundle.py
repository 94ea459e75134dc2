"""The bundle: a directory with manifest.json, the one contract between converter and runtime.

Reading checks the format version, that every path stays inside the bundle and (unless told not
to) that every file matches its sha256. Writing is atomic: files go to a temporary sibling
directory that is renamed onto the target only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
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
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
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
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as e:
        raise BundleError(f"{manifest_path}: corrupt manifest ({e}); re-run `ondevice convert`") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: manifest is not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {manifest.get('format_version')} is not supported "
                          f"by this runtime (it reads version {FORMAT_VERSION}); re-convert the model")
    for key, kind in (("config", dict), ("max_context", int), ("backends", dict), ("tokenizer", dict)):
        if not isinstance(manifest.get(key), kind):
            raise BundleError(f"{path}: manifest lacks a valid {key!r} entry; re-convert the model")
    files = manifest.get("files") or {}
    if not isinstance(files, dict):
        raise BundleError(f"{path}: manifest 'files' is not a mapping; re-convert the model")
    for name, info in files.items():
        target = resolve_inside(path, name)
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            raise BundleError(f"{path}: manifest entry for {name} lacks its size or sha256; re-convert the model")
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
    if target.exists() and not force:
        raise BundleExistsError(f"{target} exists; pass --force (force=True) to overwrite it")
    if target.exists() and not (target / MANIFEST).is_file() and (not target.is_dir() or any(target.iterdir())):
        raise BundleExistsError(f"{target} exists and is not a bundle; --force only replaces bundles "
                                "(or empty directories): choose another output path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        _sync(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)  # put the old bundle back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
