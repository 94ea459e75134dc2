"""The model a user holds: prompt -> tokens -> prefill -> decode loop -> text, with timings.

The KV cache survives between calls: a new prompt that starts with the tokens already in the
cache (the earlier turns of a chat) only prefills what is new.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

import numpy as np

from ondevice.bundle import Bundle
from ondevice.errors import ContextOverflowError, InvalidArgumentError, ModelBusyError
from ondevice.runtimes.base import Backend
from ondevice.sampling import SamplingParams, sample
from ondevice.speculative import Speculator, accept, common_prefix
from ondevice.tokenizer import StreamingDetokenizer, Tokenizer, load_tokenizer

Message = dict  # {"role": "user" | "assistant" | "system", "content": str}
Prompt = Union[str, Sequence[Message], Sequence[int]]


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    prefill_tokens: int = 0  # tokens actually prefilled (prompt minus the reused cache)
    decode_s: float = 0.0
    speculation: dict | None = None  # the speculator's stats of this call (acceptance, time shares)

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = len(self.token_ids) - 1  # the first token comes from the prefill
        return n / self.decode_s if n > 0 and self.decode_s else 0.0

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "finish_reason": self.finish_reason, "ttft_s": self.ttft_s,
                "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
                **({"speculation": self.speculation} if self.speculation else {})}


@dataclass
class _Run:
    """State of one generate/stream call, filled in as tokens come."""

    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    started: float = field(default_factory=time.perf_counter)
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: float = 0.0


class Model:
    """A loaded bundle: generate() for a whole answer, stream() for its text piece by piece.

    One model runs one generation at a time: its KV cache and ONNX Runtime bindings are its own.
    Calls from several threads are serialized: each waits until the model is free, and a stream holds
    the model from its first piece until it ends, is closed (`close()`, or breaking out of a `for` loop
    over it) or is garbage-collected. A call from the thread whose own unfinished stream holds the
    model raises ModelBusyError instead of waiting forever."""

    def __init__(self, bundle: Bundle, backend: Backend, tokenizer: Tokenizer | None = None):
        self.bundle = bundle
        self.backend = backend
        self.load_s = 0.0  # set by ondevice.load
        self.tokenizer = tokenizer or load_tokenizer(bundle.path)
        self.eos_token_ids: frozenset[int] = frozenset(self.tokenizer.eos_token_ids)
        self.defaults: dict = dict(bundle.manifest.get("generation", {}))
        self.max_context: int = bundle.max_context
        self.vocab_size: int = int(bundle.config.get("vocab_size") or backend.vocab_size)  # embedding rows
        self._cached: list[int] = []  # token ids whose keys/values are in the KV cache
        self._lock = threading.Lock()  # held by the generation running (or the stream open) on the model
        self._holder: int | None = None  # the thread that holds it
        self.speculator: Speculator | None = None  # set by ondevice.load(draft=..., lookup=...)
        self.plan = None  # the device profile's plan, when ondevice.load(profile=...) was given one

    # -- prompts ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt, raw: bool = False) -> list[int]:
        """Token ids of a prompt: ids as given, raw text as is, or text/messages via the chat template;
        text gets the BOS token first when the tokenizer asks for one (as llama.cpp and transformers do)."""
        if isinstance(prompt, str) and raw:
            ids = self.tokenizer.encode(prompt)
        else:
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            prompt = _prompt_list(prompt)
            if prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
                return self._token_ids(prompt)
            ids = self.tokenizer.encode(self.tokenizer.render_chat(prompt))
        bos = self.tokenizer.bos_token_id
        if self.tokenizer.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def _token_ids(self, prompt: list) -> list[int]:
        ids = [int(t) for t in prompt]
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidArgumentError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    # -- generation -------------------------------------------------------------------------
    def generate(self, prompt: Prompt, *, max_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None, stop: str | Sequence[str] = (),
                 raw: bool = False, ignore_eos: bool = False) -> Generation:
        """Generate a full answer. Sampling options left at None take the bundle's defaults
        (temperature 0 is greedy); `raw` tokenizes a string as is (no chat template, no BOS); `stop` is
        a stop string or a list of them.

        The context: a prompt that fills it raises ContextOverflowError. max_tokens=None asks for the
        bundle's default (256), cut to what the context still holds (finish_reason "length" when that
        runs out); an explicit max_tokens past the context raises ContextOverflowError saying how many
        fit (nothing is truncated silently). Options out of range raise InvalidArgumentError."""
        run, pieces = None, []
        with self._exclusive():
            if self.speculator:
                self.speculator.reset_stats()
            for piece, run in self._stream(prompt, max_tokens=max_tokens, stop=stop, raw=raw, ignore_eos=ignore_eos,
                                           temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                           repetition_penalty=repetition_penalty, seed=seed):
                pieces.append(piece)
        return Generation(text="".join(pieces), token_ids=run.token_ids, prompt_tokens=run.prompt_tokens,
                          finish_reason=run.finish_reason, ttft_s=run.ttft_s, prefill_s=run.prefill_s,
                          prefill_tokens=run.prefill_tokens, decode_s=run.decode_s,
                          speculation=self.speculator.stats.to_dict() if self.speculator else None)

    def stream(self, prompt: Prompt, *, max_tokens: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None, seed: int | None = None, stop: str | Sequence[str] = (),
               raw: bool = False, ignore_eos: bool = False) -> Iterator[str]:
        """Yield the answer as text pieces as soon as they are complete (never broken UTF-8);
        the options and limits are generate()'s. The stream holds the model from its first read until
        it ends or is closed (see Model)."""
        with self._exclusive():
            for piece, _ in self._stream(prompt, max_tokens=max_tokens, stop=stop, raw=raw, ignore_eos=ignore_eos,
                                         temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                         repetition_penalty=repetition_penalty, seed=seed):
                if piece:
                    yield piece
                    self._holder = threading.get_ident()  # whichever thread resumed the stream holds it now

    def reset(self) -> None:
        """Forget the cached conversation (the next prompt is prefilled from scratch)."""
        with self._exclusive():
            self._cached = []

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the model for one generation, waiting while another thread's generation holds it."""
        me = threading.get_ident()
        if not self._lock.acquire(blocking=False):
            gc.collect()  # an abandoned stream caught in a reference cycle lets go of the model when collected
            if not self._lock.acquire(blocking=False):
                if self._holder == me:  # this thread is not running it, so it would never end
                    raise ModelBusyError("an unfinished stream of this thread still holds the model: read it to "
                                         "the end or call its close() before the next call")
                self._lock.acquire()
        self._holder = me
        try:
            yield
        finally:
            self._holder = None
            self._lock.release()

    def _stream(self, prompt: Prompt, *, max_tokens: int | None = None, stop: Sequence[str] = (),
                raw: bool = False, ignore_eos: bool = False, **sampling) -> Iterator[tuple[str, _Run]]:
        started = time.perf_counter()  # TTFT counts the template and tokenizer too
        ids = self.encode_prompt(prompt, raw=raw)
        if not ids:
            raise InvalidArgumentError("the prompt is empty")
        if max_tokens is None:  # the default shrinks to what the context still holds; an explicit ask does not
            max_tokens = max(1, min(int(self.defaults.get("max_tokens", 256)), self.max_context - len(ids)))
        self.check_fits(len(ids), max_tokens)
        max_tokens = int(max_tokens)
        params = self.sampling_params(**sampling)
        run = _Run(prompt_tokens=len(ids), started=started)
        detok = StreamingDetokenizer(self.tokenizer)
        stops = [s for s in _stop_list(stop) if s]
        text = ""  # generated text not yet handed out (held back while it may start a stop string)
        eos = frozenset() if ignore_eos else self.eos_token_ids
        for token in self._tokens(ids, max_tokens, params, run, eos):
            if token in eos:
                break
            text += detok.add(token)
            if stops:
                cut = _first_stop(text, stops)
                if cut >= 0:
                    run.finish_reason = "stop"
                    yield text[:cut], run
                    return
                hold = _stop_prefix_len(text, stops)
                out, text = text[:len(text) - hold], text[len(text) - hold:]
                yield out, run
            else:
                yield text, run
                text = ""
        text += detok.flush()  # text held back until the end (incomplete UTF-8) is checked for stops too
        cut = _first_stop(text, stops)
        if cut >= 0:
            run.finish_reason = "stop"
            text = text[:cut]
        yield text, run

    def _tokens(self, ids: list[int], max_tokens: int, params: SamplingParams, run: _Run,
                eos: frozenset[int]) -> Iterator[int]:
        """Prefill (reusing the cached prefix), then decode one token at a time."""
        backend = self.backend
        reuse = common_prefix(self._cached, ids)
        reuse = min(reuse, len(ids) - 1)  # the last prompt token must run to give logits
        backend.ensure_capacity(len(ids) + max_tokens)
        self._cached = self._cached[:reuse]
        t0 = time.perf_counter()
        logits = backend.forward(ids[reuse:], reuse)[-1]
        self._cached = list(ids)
        run.prefill_tokens = len(ids) - reuse
        run.prefill_s = time.perf_counter() - t0
        rng = np.random.default_rng(params.seed)
        seen = np.array(sorted(set(ids)), np.int64) if params.repetition_penalty != 1.0 else None
        pending = [sample(logits, params, rng, seen)]
        run.ttft_s = time.perf_counter() - run.started
        t_decode = time.perf_counter()
        produced = 0
        while True:
            for token in pending:
                run.token_ids.append(token)
                produced += 1
                if token in eos:
                    run.finish_reason = "stop"
                if seen is not None:
                    seen = np.union1d(seen, [token])
                yield token
                if run.finish_reason == "stop" or produced == max_tokens:
                    return
            pending = self._next_tokens(pending[-1], params, rng, seen, max_tokens - produced)
            run.decode_s = time.perf_counter() - t_decode

    def _next_tokens(self, token: int, params: SamplingParams, rng: np.random.Generator,
                     seen: np.ndarray | None, budget: int) -> list[int]:
        """Run the last token and return what comes next: one token, or several when a speculative
        draft is verified (exactly the tokens plain decoding would have produced)."""
        spec, past = self.speculator, len(self._cached)
        room = self.max_context - past - 1
        context = self._cached + [token]
        tree = spec.propose(context, params, rng, budget, room) if spec else None
        t0 = time.perf_counter()
        if tree is None:
            logits = self.backend.decode_one(token, past)[0]
            self._cached.append(token)
            if spec:
                spec.record_plain(time.perf_counter() - t0)
            return [sample(logits, params, rng, seen)]
        spec.start_ahead(tree, context, params)  # the draft drafts on while the target verifies
        logits = self.backend.run(np.array(tree.tokens), past, tree.positions(past), tree.attention_bias(past))
        verify_s = time.perf_counter() - t0
        path, after = accept(tree, logits, params, rng, seen)
        spec.finish_ahead(path, after)
        self.backend.move_kv([past + n for n in path], list(range(past, past + len(path))))
        kept = [tree.tokens[n] for n in path]
        self._cached.extend(kept)
        spec.record_round(tree, path, verify_s, time.perf_counter() - t0)
        return kept[1:] + [after]

    # -- checks -----------------------------------------------------------------------------
    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """ContextOverflowError unless the prompt plus max_tokens new tokens fit in the context."""
        whole_number("max_tokens", max_tokens, at_least=1)
        if prompt_tokens >= self.max_context:
            raise ContextOverflowError(
                f"the prompt has {prompt_tokens} tokens but the context holds {self.max_context}: "
                "shorten the prompt (or re-convert with a larger --context)")
        if prompt_tokens + max_tokens > self.max_context:
            raise ContextOverflowError(
                f"{prompt_tokens} prompt tokens + max_tokens {max_tokens} exceed the context of "
                f"{self.max_context}: ask for at most {self.max_context - prompt_tokens} new tokens")

    def sampling_params(self, temperature: float | None = None, top_k: int | None = None,
                        top_p: float | None = None, min_p: float | None = None,
                        repetition_penalty: float | None = None, seed: int | None = None) -> SamplingParams:
        d = self.defaults
        pick = lambda v, k, default: v if v is not None else d.get(k, default)  # noqa: E731
        penalty = pick(repetition_penalty, "repetition_penalty", 1.0)
        values = dict(temperature=_finite("temperature", pick(temperature, "temperature", 0.0)),
                      top_k=whole_number("top_k", pick(top_k, "top_k", 0), at_least=0),
                      top_p=_finite("top_p", pick(top_p, "top_p", 1.0)),
                      min_p=_finite("min_p", pick(min_p, "min_p", 0.0)),
                      repetition_penalty=_finite("repetition_penalty", penalty),
                      seed=None if seed is None else whole_number("seed", seed, at_least=0))
        try:
            return SamplingParams(**values)
        except ValueError as e:  # its range checks
            raise InvalidArgumentError(str(e)) from None


def whole_number(name: str, value: object, at_least: int) -> int:
    """value as an int if it is a whole number >= at_least (5 or 5.0, not 5.5, True or "5");
    InvalidArgumentError otherwise."""
    whole = ((isinstance(value, (int, np.integer)) and not isinstance(value, bool))
             or (isinstance(value, float) and value.is_integer()))
    if not whole or value < at_least:
        raise InvalidArgumentError(f"{name} must be a whole number of at least {at_least}, not {value!r}")
    return int(value)


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def _prompt_list(prompt: object) -> list:
    """A prompt that is not a string as a list: all token ids, or all messages (dicts)."""
    kinds = "a string, a list of messages ({'role': ..., 'content': ...}) or a list of token ids"
    if isinstance(prompt, (dict, bytes)):
        raise InvalidArgumentError(f"a prompt is {kinds}, not a {type(prompt).__name__}")
    try:
        items = list(prompt)
    except TypeError:
        raise InvalidArgumentError(f"a prompt is {kinds}, not {prompt!r}") from None
    if not (all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in items)
            or all(isinstance(m, dict) for m in items)):
        raise InvalidArgumentError(f"a prompt is {kinds}, not a list that mixes them or holds other things")
    return items


def _stop_list(stop: str | Sequence[str]) -> list[str]:
    """One stop string is that string, not its characters."""
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops):
        raise InvalidArgumentError(f"stop must be a string or a list of strings, not {stop!r}")
    return stops


def _first_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
