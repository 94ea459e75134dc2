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

from ondevice.errors import BundleError, BundleExistsError

FORMAT = "ondevice-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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
        if name not in files:
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
    names = [manifest.get("tokenizer", {}).get("file")]
    for backend in manifest.get("backends", {}).values():
        names += [backend.get("graph"), backend.get("data")]
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


def _default_permissions(folder: Path) -> None:
    """Give the bundle the permissions of an ordinary directory and files (umask applies): mkdtemp makes
    the directory 0700, and onnx writes the external data file 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o666 & ~umask)


def write_manifest(folder: Path, manifest: dict) -> None:
    """Fill in the checksums of every file in folder, then write manifest.json."""
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
    manifest["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
