"""Reading a bundle: the manifest is checked, files match their sizes and checksums, paths stay inside.

Every damaged bundle is refused with a BundleError that says what is wrong; reading writes nothing.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

import ondevice
from ondevice.bundle import MANIFEST, VOCAB_MAP, read_bundle
from ondevice.errors import BundleError

BUNDLE_FILES = ["model.onnx", "model.onnx.data", "tokenizer.json"]


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def snapshot(folder: Path) -> dict:
    """Every entry under folder with its size, mtime and content hash."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, st.st_mode, digest)
    return out


def test_a_good_bundle_reads_and_verifies(tiny_bundle):
    bundle = read_bundle(tiny_bundle, verify=True)
    assert set(bundle.manifest["files"]) == set(BUNDLE_FILES)
    assert bundle.max_context == 256


@pytest.mark.parametrize("name", BUNDLE_FILES)
def test_a_modified_file_fails_verification_naming_the_file(tiny_bundle, copy_bundle, name):
    bundle = copy_bundle(tiny_bundle)
    flip_byte(bundle / name)
    with pytest.raises(BundleError, match="checksum mismatch") as err:
        read_bundle(bundle)
    assert name in str(err.value)
    with pytest.raises(BundleError, match=name):
        ondevice.load(bundle)


def test_a_bundle_with_modified_weights_still_loads_with_verify_false(tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)
    flip_byte(bundle / "model.onnx.data", offset=(bundle / "model.onnx.data").stat().st_size - 8)
    model = ondevice.load(bundle, verify=False)
    assert model.generate([1, 40, 72], max_tokens=2, temperature=0).token_ids


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("change", ["truncated", "extended"])
def test_a_file_of_the_wrong_size_fails_even_without_verification(tiny_bundle, copy_bundle, verify, change):
    bundle = copy_bundle(tiny_bundle)
    data = (bundle / "model.onnx.data").read_bytes()
    (bundle / "model.onnx.data").write_bytes(data[:-1] if change == "truncated" else data + b"\0")
    with pytest.raises(BundleError, match=r"model\.onnx\.data has \d+ bytes, the manifest says"):
        read_bundle(bundle, verify=verify)
    with pytest.raises(BundleError, match="model.onnx.data"):
        ondevice.load(bundle, verify=verify)


def test_a_missing_tokenizer_is_a_clear_bundle_error(tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)
    (bundle / "tokenizer.json").unlink()
    for verify in (True, False):
        with pytest.raises(BundleError, match="missing file tokenizer.json"):
            ondevice.load(bundle, verify=verify)


def test_a_file_the_manifest_uses_but_does_not_checksum_is_refused(tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)
    edit_manifest(bundle, lambda m: m["files"].pop("tokenizer.json"))
    with pytest.raises(BundleError, match="tokenizer.json.*no checksum"):
        read_bundle(bundle, verify=False)


# --- paths outside the bundle ----------------------------------------------------------------------

def test_a_files_entry_with_dotdot_is_refused_even_if_the_file_outside_matches(tiny_bundle, copy_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle)
    outside = tmp_path / "x"
    outside.write_text("outside")
    edit_manifest(bundle, lambda m: m["files"].update({"../x": file_entry(outside)}))
    with pytest.raises(BundleError, match="outside the bundle"):
        read_bundle(bundle, verify=False)


def test_an_absolute_path_in_the_manifest_is_refused(tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)
    absolute = str((bundle / "tokenizer.json").resolve())  # even one that points into the bundle

    def change(m):
        m["files"][absolute] = m["files"].pop("tokenizer.json")
        m["tokenizer"]["file"] = absolute

    edit_manifest(bundle, change)
    with pytest.raises(BundleError, match="invalid path"):
        read_bundle(bundle, verify=False)


@pytest.mark.parametrize("where", ["graph", "data"])
def test_a_graph_path_outside_the_bundle_is_refused(tiny_bundle, copy_bundle, where):
    bundle = copy_bundle(tiny_bundle)
    edit_manifest(bundle, lambda m: m["backends"]["onnx"].update({where: "../model.onnx"}))
    with pytest.raises(BundleError, match="outside the bundle"):
        read_bundle(bundle, verify=False)


def test_a_tokenizer_path_outside_the_bundle_is_refused(tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)
    edit_manifest(bundle, lambda m: m["tokenizer"].update({"file": "../../etc/passwd"}))
    with pytest.raises(BundleError, match="outside the bundle"):
        read_bundle(bundle, verify=False)


def test_a_symlink_escaping_the_bundle_is_refused(tiny_bundle, copy_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle)
    outside = tmp_path / "tokenizer-outside.json"
    outside.write_bytes((bundle / "tokenizer.json").read_bytes())
    (bundle / "tokenizer.json").unlink()
    (bundle / "tokenizer.json").symlink_to(outside)  # same bytes, same checksum: only the path is wrong
    with pytest.raises(BundleError, match="outside the bundle"):
        read_bundle(bundle, verify=True)
    with pytest.raises(BundleError, match="outside the bundle"):
        ondevice.load(bundle, verify=False)


# --- the manifest itself ---------------------------------------------------------------------------

def test_a_folder_without_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a bundle"):
        read_bundle(tmp_path)
    with pytest.raises(BundleError, match="not a bundle"):
        read_bundle(tmp_path / "does-not-exist")


@pytest.mark.parametrize("text", ["{not json", "", '{"format": "ondevice-bundle", ', "\xff\xfe"])
def test_a_corrupt_manifest_is_a_bundle_error(tiny_bundle, copy_bundle, text):
    bundle = copy_bundle(tiny_bundle)
    (bundle / MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(BundleError, match="corrupt manifest"):
        read_bundle(bundle)


@pytest.mark.parametrize("text", ["[]", "42", '"ondevice-bundle"', "null"])
def test_a_manifest_that_is_json_but_not_an_object_is_a_bundle_error(tiny_bundle, copy_bundle, text):
    bundle = copy_bundle(tiny_bundle)
    (bundle / MANIFEST).write_text(text)
    with pytest.raises(BundleError):
        read_bundle(bundle)


@pytest.mark.parametrize("change", [
    lambda m: m.update({"files": ["model.onnx"]}),
    lambda m: m["files"]["model.onnx"].pop("bytes"),
    lambda m: m["files"].update({"model.onnx": "abc"}),
    lambda m: m.pop("backends"),
    lambda m: m.pop("max_context"),
    lambda m: m.update({"config": None}),
    lambda m: m.pop("tokenizer"),
], ids=["files-list", "entry-without-bytes", "entry-not-object", "no-backends", "no-max-context", "config-null",
        "no-tokenizer"])
def test_a_manifest_missing_required_entries_is_a_bundle_error(tiny_bundle, copy_bundle, change):
    bundle = copy_bundle(tiny_bundle)
    edit_manifest(bundle, change)
    with pytest.raises(BundleError):
        ondevice.load(bundle, verify=False)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_an_unsupported_format_version_is_refused_with_the_versions_named(tiny_bundle, copy_bundle, version):
    bundle = copy_bundle(tiny_bundle)
    edit_manifest(bundle, lambda m: m.update({"format_version": version}))
    with pytest.raises(BundleError, match=r"format version .* not supported .*reads version 1"):
        read_bundle(bundle)


def test_a_manifest_of_another_format_is_refused(tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)
    edit_manifest(bundle, lambda m: m.update({"format": "mlc-chat-config"}))
    with pytest.raises(BundleError, match="not an ondevice-bundle manifest"):
        read_bundle(bundle)


def test_reading_loading_and_generating_write_nothing(tiny_bundle, copy_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle)
    before = snapshot(tmp_path)
    read_bundle(bundle, verify=True)
    model = ondevice.load(bundle)
    model.generate("Hello", max_tokens=4, temperature=0)
    del model
    assert snapshot(tmp_path) == before


def test_a_converted_bundle_has_ordinary_permissions_under_the_umask(tiny_gguf, tmp_path):
    old_umask = os.umask(0o022)
    try:
        out = ondevice.convert(tiny_gguf, tmp_path / "shared.bundle", progress=False)
    finally:
        os.umask(old_umask)
    assert out.stat().st_mode & 0o777 == 0o755  # readable by other users, like any directory
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p.name


# --- a draft's vocab map ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_draft(tiny_gguf, tiny_bundle, tmp_path_factory) -> Path:
    """The tiny model as a draft of itself whose LM head keeps 300 of its 320 rows. Read-only."""
    return ondevice.convert(tiny_gguf, tmp_path_factory.mktemp("tiny-draft") / "draft.bundle",
                            draft_of=tiny_bundle, draft_vocab=300, progress=False)


def write_vocab_map(bundle: Path, ids: list[int]) -> None:
    """Replace the vocab map and its checksum entry, so that only the content is wrong."""
    np.asarray(ids, "<i4").tofile(bundle / VOCAB_MAP)
    edit_manifest(bundle, lambda m: m["files"].update({VOCAB_MAP: file_entry(bundle / VOCAB_MAP)}))


def test_a_bundle_without_a_vocab_map_has_logits_for_every_token(tiny_bundle):
    bundle = read_bundle(tiny_bundle)
    assert bundle.vocab_map() is None and bundle.logits_width() == bundle.config["vocab_size"]


def test_a_drafts_vocab_map_reads_back_as_written(tiny_draft):
    bundle = read_bundle(tiny_draft)
    ids = bundle.vocab_map()
    assert ids.dtype == np.int64 and len(ids) == 300 == bundle.logits_width()
    assert ids.tolist() == np.fromfile(tiny_draft / VOCAB_MAP, dtype="<i4").tolist()


@pytest.mark.parametrize("ids, message", [
    (list(range(299)), r"should hold 300 int32 ids \(1200 bytes\), found 1196 bytes"),
    (list(range(299)) + [320], "outside the vocabulary of 320"),
    (list(range(299)) + [-1], "outside the vocabulary"),
    (list(range(299)) + [5], "a token id twice"),
])
def test_a_corrupt_vocab_map_is_refused(tiny_draft, copy_bundle, ids, message):
    bundle = copy_bundle(tiny_draft)
    write_vocab_map(bundle, ids)
    with pytest.raises(BundleError, match=message):
        read_bundle(bundle).vocab_map()


def test_a_vocab_map_of_another_size_than_the_logits_is_refused(tiny_draft, copy_bundle):
    bundle = copy_bundle(tiny_draft)
    write_vocab_map(bundle, list(range(310)))
    edit_manifest(bundle, lambda m: m["vocab_map"].update({"size": 310}))
    with pytest.raises(BundleError, match="310 ids but the graph computes 300 logits"):
        read_bundle(bundle).vocab_map()


def test_a_modified_vocab_map_fails_verification(tiny_draft, copy_bundle):
    bundle = copy_bundle(tiny_draft)
    flip_byte(bundle / VOCAB_MAP)
    with pytest.raises(BundleError, match=f"checksum mismatch for {VOCAB_MAP}"):
        read_bundle(bundle)


def test_a_vocab_map_without_a_checksum_is_refused(tiny_draft, copy_bundle):
    bundle = copy_bundle(tiny_draft)
    edit_manifest(bundle, lambda m: m["files"].pop(VOCAB_MAP))
    with pytest.raises(BundleError, match=f"{VOCAB_MAP}.*no checksum"):
        read_bundle(bundle, verify=False)


@pytest.mark.parametrize("entry", [{"file": VOCAB_MAP}, {"file": VOCAB_MAP, "size": 0}, [VOCAB_MAP]])
def test_a_malformed_vocab_map_entry_is_refused(tiny_draft, copy_bundle, entry):
    bundle = copy_bundle(tiny_draft)
    edit_manifest(bundle, lambda m: m.update({"vocab_map": entry}))
    with pytest.raises(BundleError, match="vocab_map"):
        read_bundle(bundle, verify=False).vocab_map()
