"""The runtime tokenizer: encode and decode with `tokenizers`, stream text one token at a time, and
render chat templates in a jinja2 sandbox. Needs only `tokenizers` and `jinja2`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from ondevice.bundle import MANIFEST, check_tokenizer_entry, read_manifest_json, resolve_inside
from ondevice.chat_template import CHATML_TEMPLATE, render_chat  # noqa: F401 - CHATML_TEMPLATE re-exported
from ondevice.errors import BundleError, ModelNotFoundError, SourceFormatError


@dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos_token: bool = False
    chat_template: str | None = None

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text. Special tokens written in the text ("<|im_start|>") are always parsed;
        add_special_tokens adds what the tokenizer's post-processor adds (BOS when add_bos_token).
        Rendered chat prompts already carry their BOS, so encode them without it."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self.backend, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt for messages, from the model's template (ChatML when it has none)."""
        def text(token_id: int | None) -> str:
            return (self.backend.id_to_token(token_id) or "") if token_id is not None else ""

        extra.setdefault("bos_token", text(self.bos_token_id))
        extra.setdefault("eos_token", text(self.eos_token_id))
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt, **extra)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A Tokenizer from a bundle folder (manifest.json), a Hugging Face folder, or a tokenizer.json."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such tokenizer file or folder")
    if (path / MANIFEST).is_file():
        manifest = read_manifest_json(path / MANIFEST)
        if not isinstance(manifest, dict):
            raise BundleError(f"{path}: manifest is not a JSON object; re-convert the model")
        info = check_tokenizer_entry(path, manifest.get("tokenizer"))
        eos = info.get("eos_token_ids") or []
        return Tokenizer(_read_backend(resolve_inside(path, info.get("file", "tokenizer.json"))),
                         bos_token_id=info.get("bos_token_id"), eos_token_ids=tuple(eos),
                         add_bos_token=bool(info.get("add_bos_token", False)),
                         chat_template=info.get("chat_template"))
    folder = path if path.is_dir() else path.parent
    backend = _read_backend(path / "tokenizer.json" if path.is_dir() else path)
    config = {}
    if (folder / "tokenizer_config.json").is_file():
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise SourceFormatError(f"{folder / 'tokenizer_config.json'}: not valid JSON ({e})") from e
        if not isinstance(config, dict):
            raise SourceFormatError(f"{folder / 'tokenizer_config.json'}: expected a JSON object")

    def token_id(name: str) -> int | None:
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        return backend.token_to_id(token) if isinstance(token, str) else None

    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the one called "default"
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is None and (folder / "chat_template.jinja").is_file():
        try:
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SourceFormatError(f"{folder / 'chat_template.jinja'}: not UTF-8 text ({e})") from e
    if not isinstance(template, (str, type(None))):
        raise SourceFormatError(f"{folder / 'tokenizer_config.json'}: chat_template is not a template (text)")
    eos = token_id("eos_token")
    return Tokenizer(backend, bos_token_id=token_id("bos_token"), eos_token_ids=() if eos is None else (eos,),
                     add_bos_token=bool(config.get("add_bos_token", False)), chat_template=template)


def _read_backend(file: Path) -> tokenizers.Tokenizer:
    if not file.is_file():
        raise BundleError(f"{file}: missing tokenizer.json; re-convert the model")
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except BaseException as e:  # a bare Exception on malformed JSON; on some values a Rust panic
        # (pyo3's PanicException derives from BaseException and cannot be imported, so it is matched by name)
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        raise BundleError(f"{file}: not a valid tokenizer.json ({type(e).__name__}: {e}); "
                          "re-convert the model") from e


class StreamingDetokenizer:
    """Turns generated ids into text as they arrive, never emitting half a UTF-8 character.

    Each step decodes only a short window: the ids emitted last (context, so a leading space or
    byte join is decoded as in the full sequence) plus the ids not yet emitted. Text is released
    once the window no longer ends in U+FFFD, i.e. once the last character is complete. So the
    pieces concatenate to decode(all ids), with two exceptions, both only for invalid UTF-8: a run
    of more than `max_pending` ids that keeps ending in U+FFFD is released as is, and `tokenizers`'
    ByteFallback decoder turns a whole run of <0x..> tokens into U+FFFDs when any byte of it is
    invalid, which text already released cannot follow.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer | Tokenizer, skip_special_tokens: bool = False,
                 max_pending: int = 16):
        self._backend = tokenizer.backend if isinstance(tokenizer, Tokenizer) else tokenizer
        self._skip = skip_special_tokens
        self._special = ({i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
                         if skip_special_tokens else set())
        self._max_pending = max_pending
        self._ids: list[int] = []  # the window: context ids, then pending ids
        self._read = 0  # ids[:read] are context, already emitted
        self._context_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def add(self, token_id: int) -> str:
        """The text that token_id completes ("" while a character is still partial)."""
        if token_id in self._special:
            # Left out of the window, so its neighbours decode as they do in decode(ids, skip_special_tokens=True).
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith("\ufffd") and len(self._ids) - self._read <= self._max_pending:
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Whatever is still held back, complete or not."""
        if len(self._ids) == self._read:
            return ""
        return self._emit(self._decode(self._ids))

    def _emit(self, text: str) -> str:
        new = text[len(self._context_text):]
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._context_text = self._decode(self._ids)
        return new
