"""Hostile GGUF files (found by scripts/fuzz.py): each is refused with a SourceFormatError that names
what is wrong, before anything is allocated or looped over from the numbers the file claims."""

import struct
from pathlib import Path

import fuzz_harness as fh
import gguf
import numpy as np
import pytest
from models import write_tiny_llama_gguf

import ondevice
from ondevice.converters.arch import gemma3, llama
from ondevice.converters.sources import read_source
from ondevice.errors import SourceFormatError


class ReachedTheReader(BaseException):
    """Raised by GGUFReader in these tests: a header must be refused before the reader trusts it."""


@pytest.fixture
def reader_must_not_run(monkeypatch):
    def refuse(*args, **kwargs):
        raise ReachedTheReader("GGUFReader was given a header the checks should have refused")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", refuse)


def patched(tiny_gguf: Path, tmp_path: Path, field: str, value: int, index: int = 0) -> Path:
    """A copy of the tiny GGUF with one header field (as tests/fuzz_harness.py locates them) set to value."""
    data = bytearray(tiny_gguf.read_bytes())
    layout = fh.gguf_layout(bytes(data))
    at = layout[field] if isinstance(layout[field], int) else layout[field][index]
    size = 4 if field in ("n_dims", "tensor_type", "kv_type") else 8
    struct.pack_into("<I" if size == 4 else "<Q", data, at, value)
    path = tmp_path / "hostile.gguf"
    path.write_bytes(bytes(data))
    return path


def tiny_gguf_where(tmp_path: Path, monkeypatch, method: str, replacement) -> Path:
    """The tiny GGUF written with one GGUFWriter method replaced (replacement(writer, real_method, *args))."""
    real = getattr(gguf.GGUFWriter, method)
    monkeypatch.setattr(gguf.GGUFWriter, method, lambda self, *args, **kw: replacement(self, real, *args, **kw))
    path = write_tiny_llama_gguf(tmp_path / "hostile.gguf", weight_type="Q8_0", seed=0)
    monkeypatch.undo()
    return path


# --- the header: counts and sizes are checked against the file before the reader sees them ---------

@pytest.mark.parametrize("field, value, message", [
    ("n_tensors", 2**40, "tensor infos cannot fit"),
    ("n_kv", 2**40, "metadata entries cannot fit"),
    ("strlen", 2**62, "runs past the end of the file"),
    ("arrlen", 2**31 - 1, "claims 2147483647 items"),  # the reader looped over them one by one: a hang
    ("arrlen", 2**20, "1048576 strings of tokenizer.ggml.merges cannot fit"),
    ("n_dims", 2**32 - 1, "has 4294967295 dimensions"),
    ("dim", 2**62, "ends past the end of the file"),  # the reader's uint64 product of the dims can wrap
    ("tensor_type", 255, "unknown type 255"),
    ("tensor_offset", 2**63, "ends past the end of the file"),
    ("tensor_offset", 7, "not a multiple of the alignment"),
    ("kv_type", 13, "unknown value type 13"),
])
def test_a_gguf_header_whose_counts_exceed_the_file_is_refused_before_the_reader_allocates(
        tiny_gguf, tmp_path, reader_must_not_run, field, value, message):
    path = patched(tiny_gguf, tmp_path, field, value, index=-1 if field == "arrlen" else 0)
    with pytest.raises(SourceFormatError, match=message) as err:
        read_source(path)
    assert "hostile.gguf" in str(err.value)


def test_an_array_of_arrays_in_gguf_metadata_is_refused(tiny_gguf, tmp_path, reader_must_not_run):
    layout = fh.gguf_layout(tiny_gguf.read_bytes())
    arrays = [at for at in layout["kv_type"] if at + 4 in layout["arrlen"]]  # the item types of arrays
    path = patched(tiny_gguf, tmp_path, "kv_type", 9, index=layout["kv_type"].index(arrays[0]))
    with pytest.raises(SourceFormatError, match="arrays hold numbers or strings"):
        read_source(path)


# --- metadata of the wrong type or encoding ---------------------------------------------------------

def test_a_gguf_chat_template_that_is_not_utf8_is_a_source_format_error(tmp_path, monkeypatch):
    path = tiny_gguf_where(tmp_path, monkeypatch, "add_chat_template",
                           lambda w, real, template: w.add_string("tokenizer.chat_template", b"{{ \xff }}"))
    with pytest.raises(SourceFormatError, match="tokenizer.chat_template is not UTF-8"):
        read_source(path)


@pytest.mark.parametrize("method, key, value", [
    ("add_bos_token_id", "tokenizer.ggml.bos_token_id", "one"),
    ("add_token_types", "tokenizer.ggml.token_type", ["normal"] * 320),
    ("add_tokenizer_model", "tokenizer.ggml.model", 2),
    ("add_token_list", "tokenizer.ggml.tokens", list(range(320))),
])
def test_gguf_tokenizer_metadata_of_the_wrong_type_is_refused_naming_the_key(tmp_path, monkeypatch, method, key,
                                                                           value):
    path = tiny_gguf_where(tmp_path, monkeypatch, method,
                           lambda w, real, *args: w.add_key_value(key, value, gguf.GGUFValueType.get_type(value),
                                                                  sub_type=None))
    with pytest.raises(SourceFormatError, match=f"{key} should be"):
        read_source(path)


def test_gguf_merges_of_tokens_outside_the_vocabulary_are_refused_when_read(tmp_path, monkeypatch):
    path = tiny_gguf_where(tmp_path, monkeypatch, "add_token_merges",
                           lambda w, real, merges: real(w, ["Ġzz qq"] + list(merges)))
    with pytest.raises(SourceFormatError, match="tokenizer does not load.*out of vocabulary"):
        read_source(path)


# --- tensors that do not match the metadata ----------------------------------------------------------

def test_a_gguf_without_the_tensors_its_metadata_describes_is_refused(tiny_gguf, tmp_path):
    path = patched(tiny_gguf, tmp_path, "n_tensors", 0)  # reads fine: metadata, no tensors
    with pytest.raises(SourceFormatError, match="lacks token_embd.weight"):
        ondevice.convert(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, value, message", [
    ("add_feed_forward_length", 96, r"blk.0.ffn_gate.weight has shape \[128, 64\].*implies \[96, 64\]"),
    ("add_block_count", 2**31 - 1, "lacks tensor blk.2.attn_norm.weight"),  # fails at the first missing layer
    ("add_vocab_size", 321, r"token_embd.weight has shape \[320, 64\].*implies \[321, 64\]"),
])
def test_a_gguf_whose_tensors_disagree_with_its_metadata_is_refused_before_reshaping(tmp_path, monkeypatch,
                                                                                     method, value, message):
    path = tiny_gguf_where(tmp_path, monkeypatch, method, lambda w, real, _: real(w, value))
    with pytest.raises(SourceFormatError, match=message):
        ondevice.convert(path, tmp_path / "out", progress=False)


def test_a_gguf_tensor_name_that_is_not_blk_layer_kind_is_refused(tmp_path, monkeypatch):
    def add_tensor(w, real, name, data, **kwargs):
        real(w, name, data, **kwargs)
        if name == "output_norm.weight":
            real(w, "blk.0.attn_q", data)

    path = tiny_gguf_where(tmp_path, monkeypatch, "add_tensor", add_tensor)
    with pytest.raises(SourceFormatError, match="'blk.0.attn_q' is not blk.<layer>.<kind>"):
        ondevice.convert(path, tmp_path / "out", progress=False)


@pytest.mark.parametrize("arch, key, value, message", [
    (llama, "llama.embedding_length", "sixty-four", "should be an integer"),
    (llama, "llama.block_count", [2], "should be an integer"),
    (llama, "llama.context_length", 2**63, "out of range"),
    (llama, "llama.attention.head_count", 0, "out of range"),
    (llama, "llama.rope.freq_base", float("nan"), "out of range"),
    (llama, "llama.attention.head_count_kv", 3, "share the KV heads evenly"),
    (gemma3, "gemma3.attention.sliding_window_pattern", 0, "out of range"),  # was a ZeroDivisionError
    (gemma3, "gemma3.attention.sliding_window_pattern", [True], "1 entries for 18 layers"),
])
def test_gguf_config_metadata_of_the_wrong_type_or_range_is_refused_naming_the_key(arch, key, value, message):
    prefix = arch.__name__.rsplit(".", 1)[-1]
    meta = {f"{prefix}.{k}": v for k, v in {
        "context_length": 256, "embedding_length": 64, "block_count": 18, "feed_forward_length": 128,
        "attention.head_count": 4, "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-5,
        "attention.sliding_window": 512}.items()}
    weights = {"token_embd.weight": np.zeros((320, 64), np.float32)}
    with pytest.raises(SourceFormatError, match=message):
        arch.config_from_gguf({**meta, key: value}, weights)


def test_a_context_too_long_for_a_bundle_is_refused_with_the_option_to_use(tmp_path, monkeypatch):
    path = tiny_gguf_where(tmp_path, monkeypatch, "add_context_length", lambda w, real, _: real(w, 1 << 21))
    with pytest.raises(SourceFormatError, match="2097152 tokens is more than a bundle holds.*--max-context"):
        ondevice.convert(path, tmp_path / "out", progress=False)


def test_an_embedding_in_4bit_blocks_with_mins_is_refused_with_what_to_do(tmp_path):
    """token_embd's type set from Q8_0 to Q4_1 (as the fuzzer did): the export has no gather for blocks
    with mins, and says how to re-quantize instead of failing with NotImplementedError."""
    q8 = write_tiny_llama_gguf(tmp_path / "q8.gguf", weight_type="Q8_0", seed=0)
    embd = next(i for i, t in enumerate(gguf.GGUFReader(q8).tensors) if t.name == "token_embd.weight")
    q4_1 = patched(q8, tmp_path, "tensor_type", int(gguf.GGMLQuantizationType.Q4_1), index=embd)
    assert gguf.GGUFReader(q4_1).tensors[embd].tensor_type == gguf.GGMLQuantizationType.Q4_1
    with pytest.raises(SourceFormatError, match="token_embd to Q8_0"):
        ondevice.convert(q4_1, tmp_path / "out.bundle", progress=False)
