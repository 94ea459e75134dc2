"""A Hugging Face tokenizer.json (plus chat template and special tokens) from GGUF metadata.

A GGUF stores its tokenizer as llama.cpp metadata: tokens, token types, merges or scores, and a
pre-tokenizer *name* (`tokenizer.ggml.pre`). We rebuild the tokenizer.json that encodes like
llama.cpp does, without transformers:

- `gpt2`: byte-level BPE; the pre-tokenizer comes from `_PRE_TOKENIZERS[pre]`, which mirrors the
  `regex_exprs` of llama.cpp's `llm_tokenizer_bpe` for that name.
- `llama`: SentencePiece BPE (Llama 2, Gemma): merges rebuilt from the token scores, byte fallback.
"""

from __future__ import annotations

import json
from pathlib import Path

from ondevice.errors import SourceFormatError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_SPLIT_THEN_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}

_GPT2 = [_BYTE_LEVEL]
# Each digit its own pre-token, then the GPT-2 regex (SmolLM2's tokenizer.json; llama.cpp's
# LLAMA_VOCAB_PRE_TYPE_SMOLLM and the StarCoder family).
_DIGITS_THEN_GPT2 = [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]
_LLAMA3 = [{"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
           _SPLIT_THEN_BYTES]

# tokenizer.ggml.pre -> (pre-tokenizers, ignore_merges), as llama.cpp's llama_vocab::load sets them.
_PRE_TOKENIZERS: dict[str, tuple[list[dict], bool]] = {
    # llama.cpp's own "default" is a legacy four-regex chain it warns about; the GPT-2 split is
    # what a byte-level vocabulary without a named pre-tokenizer was trained with.
    "default": (_GPT2, False),
    "gpt2": (_GPT2, False),
    "mpt": (_GPT2, False),
    "olmo": (_GPT2, False),
    "jais": (_GPT2, False),
    "smollm": (_DIGITS_THEN_GPT2, False),
    "starcoder": (_DIGITS_THEN_GPT2, False),
    "refact": (_DIGITS_THEN_GPT2, False),
    "command-r": (_DIGITS_THEN_GPT2, False),
    "codeshell": (_DIGITS_THEN_GPT2, False),
    "exaone": (_DIGITS_THEN_GPT2, False),
    "llama-bpe": (_LLAMA3, True),
    "llama3": (_LLAMA3, True),
    "llama-v3": (_LLAMA3, True),
    "falcon3": (_LLAMA3, True),
    "pixtral": (_LLAMA3, True),
    "dbrx": (_LLAMA3, False),
    "smaug-bpe": (_LLAMA3, False),
}

_SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}


# GGUFValueType numbers of each kind of value this module reads
_INTEGER, _FLOAT, _BOOL, _STRING, _ARRAY = {0, 1, 2, 3, 4, 5, 10, 11}, {6, 12}, {7}, {8}, 9
# the tokenizer metadata read here: key -> (the value types it may have, is it an array, what it is)
_TYPES = {
    "tokenizer.ggml.model": (_STRING, False, "a name"),
    "tokenizer.ggml.pre": (_STRING, False, "a name"),
    "tokenizer.chat_template": (_STRING, False, "a template"),
    "tokenizer.ggml.tokens": (_STRING, True, "a list of strings"),
    "tokenizer.ggml.merges": (_STRING, True, "a list of strings"),
    "tokenizer.ggml.token_type": (_INTEGER, True, "a list of integers"),
    "tokenizer.ggml.scores": (_FLOAT | _INTEGER, True, "a list of numbers"),
    **{f"tokenizer.ggml.{key}": (_INTEGER, False, "a token id") for key in _SPECIAL_KEYS.values()},
    **{f"tokenizer.ggml.{key}": (_BOOL, False, "true or false")
       for key in ("add_bos_token", "add_eos_token", "add_space_prefix")},
}


def _field(reader, key: str):
    """The metadata field, checked to have the value type the tokenizer needs (None if absent)."""
    field = reader.fields.get(key)
    if field is None:
        return None
    kinds, is_array, what = _TYPES[key]
    types = [int(t) for t in field.types]
    # an array's types are [ARRAY, item type], or just [ARRAY] when it is empty
    ok = types[:1] == [_ARRAY] and (len(types) == 1 or types[1] in kinds) if is_array else types[0] in kinds
    if not ok:
        raise SourceFormatError(f"GGUF metadata {key} should be {what}, but has GGUF value types {types}")
    return field


def _value(reader, key: str, default=None):
    field = _field(reader, key)
    if field is None:
        return default
    try:
        return field.contents()
    except UnicodeDecodeError as e:
        raise SourceFormatError(f"GGUF metadata {key} is not UTF-8 text ({e})") from e


def _strings(reader, key: str) -> list[str]:
    field = _field(reader, key)
    if field is None:
        raise KeyError(key)
    # Decoded leniently: tokenizer.json cannot hold invalid UTF-8 either, and one bad token should
    # not make the whole vocabulary unreadable.
    return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # the rare duplicate keeps its first id, as llama.cpp's text_to_token does
    return vocab


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict]:
    """Control tokens become special added tokens, user-defined ones plain added tokens: llama.cpp
    matches both whole in the raw text, and skips only control tokens when detokenizing."""
    return [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": kind == CONTROL}
            for i, kind in enumerate(types) if kind in (CONTROL, USER_DEFINED)]


def special_tokens_from_gguf(reader) -> dict:
    """bos/eos/unk/pad as `<kind>_token_id` and `<kind>_token`, plus add_bos_token/add_eos_token."""
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    special: dict = {}
    for kind, key in _SPECIAL_KEYS.items():
        token_id = _value(reader, f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            special[f"{kind}_token_id"] = int(token_id)
            special[f"{kind}_token"] = tokens[int(token_id)]
    # llama.cpp's defaults when the key is absent: SentencePiece and llama3 vocabularies add BOS.
    model = _value(reader, "tokenizer.ggml.model")
    default_bos = model == "llama" or _value(reader, "tokenizer.ggml.pre") in ("llama-bpe", "llama3", "llama-v3")
    special["add_bos_token"] = bool(_value(reader, "tokenizer.ggml.add_bos_token", default_bos))
    special["add_eos_token"] = bool(_value(reader, "tokenizer.ggml.add_eos_token", False))
    return special


def chat_template_from_gguf(reader) -> str | None:
    return _value(reader, "tokenizer.chat_template")


def tokenizer_json_from_gguf(reader) -> str:
    """tokenizer.json text for the tokenizer described by a GGUFReader's metadata.

    Raises KeyError when the file has no tokenizer.ggml.tokens, SourceFormatError when it names a
    tokenizer model or pre-tokenizer this module does not know."""
    model = _value(reader, "tokenizer.ggml.model")
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    types = _value(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise SourceFormatError(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types")
    special = special_tokens_from_gguf(reader)
    if model == "gpt2":
        body = _byte_level_bpe(reader, tokens)
    elif model == "llama":
        body = _sentencepiece_bpe(reader, tokens, types, special)
    else:
        raise SourceFormatError(f"GGUF tokenizer model {model!r} is not supported (supported: 'gpt2', 'llama')")
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(tokens, types),
        **body,
        "post_processor": _post_processor(special),
    }
    return json.dumps(tokenizer, ensure_ascii=False)


def _byte_level_bpe(reader, tokens: list[str]) -> dict:
    pre = _value(reader, "tokenizer.ggml.pre") or "default"
    if pre not in _PRE_TOKENIZERS:
        raise SourceFormatError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported; known: "
                                f"{', '.join(sorted(_PRE_TOKENIZERS))}")
    pre_tokenizers, ignore_merges = _PRE_TOKENIZERS[pre]
    merges = []
    for merge in _strings(reader, "tokenizer.ggml.merges"):
        # Split at the first space after position 0, as llama.cpp does.
        cut = merge.find(" ", 1)
        if cut < 0:
            raise SourceFormatError(f"GGUF merge {merge!r} is not two tokens separated by a space")
        merges.append([merge[:cut], merge[cut + 1:]])
    merges = _compact_merges(merges)
    return {
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": _vocab(tokens), "merges": merges},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    }


def _compact_merges(pairs: list[list[str]]) -> list:
    """Merges as "left right" strings when no token holds a space: `tokenizers` then needs about
    half the memory to load them (SmolLM2: 20 MB instead of 39 MB) than for [left, right] pairs."""
    if any(" " in token for pair in pairs for token in pair):
        return pairs
    return [f"{left} {right}" for left, right in pairs]


def _sentencepiece_bpe(reader, tokens: list[str], types: list[int], special: dict) -> dict:
    """llama.cpp's SPM tokenizer as BPE: it repeatedly joins the adjacent pair whose concatenation
    is the highest-scoring token, which is BPE with merges ranked by the merged token's score."""
    scores = _value(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise SourceFormatError(f"GGUF tokenizer has {len(tokens)} tokens but {len(scores)} scores")
    vocab = _vocab(tokens)
    ranked = []
    for token, i in vocab.items():
        if types[i] == BYTE or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    add_space_prefix = bool(_value(reader, "tokenizer.ggml.add_space_prefix", True))
    # Prepend runs on every stretch of text between added tokens, like llama.cpp's space after each special token.
    normalizers = ([{"type": "Prepend", "prepend": "▁"}] if add_space_prefix else []) + \
        [{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": special.get("unk_token"),
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": BYTE in types, "ignore_merges": False, "vocab": vocab,
                  "merges": _compact_merges([[left, right] for *_, left, right in ranked])},
        "decoder": {"type": "Sequence", "decoders": decoders},
    }


def _post_processor(special: dict) -> dict | None:
    """BOS/EOS added by encode(add_special_tokens=True), only when the GGUF asks for them."""
    before = ["bos"] if special["add_bos_token"] and "bos_token" in special else []
    after = ["eos"] if special["add_eos_token"] and "eos_token" in special else []
    if not before and not after:
        return None

    def pieces(seq: str, type_id: int) -> list[dict]:
        return ([{"SpecialToken": {"id": special[f"{k}_token"], "type_id": type_id}} for k in before]
                + [{"Sequence": {"id": seq, "type_id": type_id}}]
                + [{"SpecialToken": {"id": special[f"{k}_token"], "type_id": type_id}} for k in after])

    used = {special[f"{k}_token"]: special[f"{k}_token_id"] for k in before + after}
    return {"type": "TemplateProcessing", "single": pieces("A", 0), "pair": pieces("A", 0) + pieces("B", 1),
            "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in used.items()}}


def tokenizer_json_from_hf(folder: str | Path) -> str:
    """The tokenizer.json of a Hugging Face model folder, as text."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise SourceFormatError(f"{folder}: no tokenizer.json (slow-only tokenizers such as tokenizer.model "
                                "are not supported; save the fast tokenizer with transformers first)")
    return path.read_text(encoding="utf-8")


def chat_template_from_hf(folder: str | Path) -> str | None:
    """The default chat template from tokenizer_config.json, or chat_template.jinja next to it."""
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    template = None
    if config_path.is_file():
        try:
            template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
        except ValueError as e:
            raise SourceFormatError(f"{config_path}: not valid JSON ({e})") from e
    if isinstance(template, list):  # named templates: the one called "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template
