"""The runtime tokenizer: loading, streaming detokenization, chat templates in a sandbox."""

import json
import random
import subprocess
import sys

import pytest
from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers, trainers

from ondevice.errors import ChatTemplateError, ModelNotFoundError
from ondevice.tokenizer import CHATML_TEMPLATE, StreamingDetokenizer, Tokenizer, load_tokenizer, render_chat

CORPUS = ["hello world, this is a test 123", "héllo wörld 🎉🎉 中文字符 日本語", "emoji 👩‍👩‍👧 and ½ Ωμέγα"] * 10
# Text whose emoji and CJK characters the tiny vocabularies split over several byte tokens.
HARD_TEXT = "Hi 🎉👩‍👩‍👧 中文字符 and 🧬 <|end|> ½ Ωμέγα 😀x  9"

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def byte_level() -> Backend:
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def sentencepiece() -> Backend:
    """Llama/Gemma style: '▁' for spaces, a prefix space stripped on decode, byte fallback."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "▁wor"]:
        vocab[piece] = len(vocab)
    merges = [("h", "e"), ("l", "l"), ("ll", "o"), ("he", "llo"), ("▁", "hello"), ("▁", "w"), ("o", "r"), ("▁w", "or")]
    tok = Backend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken("</s>", special=True, normalized=False)])
    return tok


def stream(backend, ids, **kwargs) -> list[str]:
    detok = StreamingDetokenizer(backend, **kwargs)
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_streamed_pieces_concatenate_to_the_full_decode_for_emoji_cjk_and_special_tokens(byte_level,
                                                                                          skip_special_tokens):
    ids = byte_level.encode(HARD_TEXT).ids
    assert byte_level.token_to_id("<|end|>") in ids
    pieces = stream(byte_level, ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == byte_level.decode(ids, skip_special_tokens=skip_special_tokens)


def test_streaming_never_emits_half_a_character(byte_level):
    ids = byte_level.encode("🧬🎉中").ids
    assert len(ids) > 3  # the characters really are split over byte tokens
    pieces = stream(byte_level, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert [p for p in pieces if p] == ["🧬", "🎉", "中"]


def test_streaming_sentencepiece_keeps_spaces_and_joins_byte_fallback(sentencepiece):
    text = "hello world 🙂 hello</s> héllo"
    ids = sentencepiece.encode(text, add_special_tokens=False).ids
    assert sentencepiece.token_to_id("<0xF0>") in ids
    for skip in (False, True):
        pieces = stream(sentencepiece, ids, skip_special_tokens=skip)
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == sentencepiece.decode(ids, skip_special_tokens=skip)
    plain = "hello world 🙂 héllo"
    assert "".join(stream(sentencepiece, sentencepiece.encode(plain, add_special_tokens=False).ids)) == plain


def test_streaming_equals_full_decode_for_random_byte_level_id_sequences(byte_level):
    # Random ids include invalid UTF-8 (lone continuation bytes, truncated characters).
    rng = random.Random(1234)
    for _ in range(200):
        ids = [rng.randrange(byte_level.get_vocab_size()) for _ in range(rng.randrange(1, 40))]
        for skip in (False, True):
            full = byte_level.decode(ids, skip_special_tokens=skip)
            assert "".join(stream(byte_level, ids, skip_special_tokens=skip)) == full


def test_streaming_equals_full_decode_for_random_sentencepiece_text(sentencepiece):
    # Text, not random ids: HF's ByteFallback decoder turns a whole run of byte tokens into U+FFFD
    # when any byte of it is invalid, which no streamer can match without holding back every run.
    rng = random.Random(1234)
    alphabet = list("helo wrd  ") + ["🙂", "中", "é", "\n", "</s>"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        ids = sentencepiece.encode(text, add_special_tokens=False).ids
        for skip in (False, True):
            full = sentencepiece.decode(ids, skip_special_tokens=skip)
            assert "".join(stream(sentencepiece, ids, skip_special_tokens=skip)) == full


def test_streaming_decodes_a_short_window_not_the_whole_sequence(byte_level):
    class Counting:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens=False):
            self.longest = max(self.longest, len(ids))
            return byte_level.decode(ids, skip_special_tokens=skip_special_tokens)

        def get_added_tokens_decoder(self):
            return byte_level.get_added_tokens_decoder()

    ids = byte_level.encode(HARD_TEXT * 100).ids
    counting = Counting()
    assert "".join(stream(counting, ids)) == byte_level.decode(ids, skip_special_tokens=False)
    assert len(ids) > 2000 and counting.longest <= 8


def test_flush_releases_an_incomplete_character_at_the_end(byte_level):
    ids = byte_level.encode("a🧬").ids
    detok = StreamingDetokenizer(byte_level)
    held = "".join(detok.add(i) for i in ids[:-1])
    assert held == "a"
    assert detok.flush() == byte_level.decode(ids[:-1])[1:]  # the partial emoji, as U+FFFD
    assert detok.flush() == ""


def test_load_tokenizer_from_a_bundle_reads_ids_and_template_from_the_manifest(tmp_path, byte_level):
    byte_level.save(str(tmp_path / "tokenizer.json"))
    end = byte_level.token_to_id("<|end|>")
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": {
        "file": "tokenizer.json", "chat_template": SMOLLM2_TEMPLATE, "bos_token_id": None,
        "eos_token_ids": [end], "add_bos_token": False, "vocab_size": byte_level.get_vocab_size()}}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_id == end and tok.eos_token_ids == (end,) and tok.bos_token_id is None
    assert tok.vocab_size == byte_level.get_vocab_size()
    assert tok.decode(tok.encode(HARD_TEXT)) == HARD_TEXT
    assert tok.encode("<|end|>") == [end]
    assert tok.render_chat([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>assistant\n")


def test_load_tokenizer_from_a_hugging_face_folder_reads_tokenizer_config(tmp_path, byte_level):
    byte_level.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|end|>"}, "bos_token": None, "chat_template": "{{ eos_token }}"}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_id == byte_level.token_to_id("<|end|>")
    assert tok.render_chat([]) == "<|end|>"
    assert load_tokenizer(tmp_path / "tokenizer.json").eos_token_id == tok.eos_token_id


def test_load_tokenizer_of_a_missing_path_says_so(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such"):
        load_tokenizer(tmp_path / "absent")


def test_tokenizer_without_a_template_falls_back_to_chatml(byte_level):
    tok = Tokenizer(byte_level)
    assert tok.render_chat([{"role": "user", "content": "Hi"}]) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "user", "content": "Hi"}]
    assert render_chat(None, messages) == render_chat(CHATML_TEMPLATE, messages)


def test_smollm2_template_adds_its_default_system_prompt():
    prompt = render_chat(SMOLLM2_TEMPLATE, [{"role": "user", "content": "What is 2+2?"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                      "trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_template_keeps_a_given_system_prompt_and_can_omit_the_generation_prompt():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    assert render_chat(SMOLLM2_TEMPLATE, messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n")


def test_templates_get_the_helpers_transformers_provides():
    template = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ bos_token }}{{ m|tojson }}"
                "{% endfor %}|{{ strftime_now('%Y') | length }}|{{ tools | length }}\n  {% if true %}\n  x{% endif %}")
    out = render_chat(template, [{"role": "user", "content": "<b>é</b>"}, {"role": "user", "content": "no"}],
                      bos_token="<s>", tools=[1, 2])
    # tojson does not HTML-escape or ASCII-escape; trim_blocks/lstrip_blocks drop the block lines' whitespace
    assert out == '<s>{"role": "user", "content": "<b>é</b>"}|4|2\n  x'


def test_raise_exception_in_a_template_becomes_chat_template_error():
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('Conversation must start with user') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="Conversation must start with user"):
        render_chat(template, [{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ (1).__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ self.__init__.__globals__ }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ 'x' * 10000000000 }}",
    "{{ 9 ** (9 ** 9) }}",
])
def test_templates_that_reach_for_python_internals_or_resources_raise_chat_template_error(template):
    with pytest.raises(ChatTemplateError):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_a_template_with_a_syntax_error_raises_chat_template_error_naming_the_line():
    with pytest.raises(ChatTemplateError, match="line 2"):
        render_chat("ok\n{% for %}", [])


def test_the_runtime_tokenizer_imports_no_converter_gguf_or_transformers():
    code = ("import sys, ondevice.tokenizer; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('gguf', 'transformers', 'torch') "
            "or m.startswith('ondevice.converters')]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)
