"""Chat templates rendered as transformers' apply_chat_template does, but safe to run when untrusted.

A model's chat template is code that came with the download. It runs in jinja2's immutable sandbox,
which keeps it away from Python internals, and under a budget per render, which keeps it from
hanging or exhausting memory. The sandbox checks each operation before it allocates; the budget
counts loop iterations and calls, characters produced, and seconds:

- every `for` loop's items and every call (macros included) count against LIMITS["steps"], and
  the clock against LIMITS["seconds"];
- no string or list the template builds, nor the rendered prompt, may exceed LIMITS["chars"];
  everything the template outputs, buffered blocks and macro bodies included, counts against
  LIMITS["output"];
- widths and counts given to `*`, `%`, str methods and filters are checked before they run.
"""

from __future__ import annotations

import functools
import json
import re
import string
import threading
import time
from datetime import datetime

from jinja2 import nodes, pass_context
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from ondevice.errors import ChatTemplateError

LIMITS = {"chars": 4_000_000, "output": 16_000_000, "steps": 1_000_000, "seconds": 2.0}

# Used when a model ships no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra) -> str:
    """The prompt a chat template makes of messages. template None means CHATML_TEMPLATE. Any failure
    of the template, an attempt to reach Python internals, or a render over its budget raises
    ChatTemplateError."""
    _budget.deadline = time.monotonic() + LIMITS["seconds"]
    _budget.steps = _budget.output = 0
    try:
        compiled = _compile(CHATML_TEMPLATE if template is None else template)
        return _checked(compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=bos_token, eos_token=eos_token, **extra))
    except _RaisedByTemplate as e:
        raise ChatTemplateError(f"the chat template rejected the messages: {e}") from e
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid jinja (line {e.lineno}): {e.message}") from e
    except SecurityError as e:
        raise ChatTemplateError(f"the chat template did something the sandbox forbids: {e}") from e
    except Exception as e:  # noqa: BLE001 - the template is untrusted code; any failure is its failure
        raise ChatTemplateError(f"the chat template failed to render ({type(e).__name__}: {e})") from e
    finally:
        _budget.deadline = None


# --- the budget of the render running on this thread ---------------------------------------------

_budget = threading.local()


def _step() -> None:
    deadline = getattr(_budget, "deadline", None)
    if deadline is None:  # jinja folding a constant at compile time: nothing to count
        return
    _budget.steps += 1
    if _budget.steps > LIMITS["steps"]:
        raise SecurityError(f"the chat template ran over {LIMITS['steps']:,} loop iterations and calls")
    if time.monotonic() > deadline:
        raise SecurityError(f"the chat template ran for over {LIMITS['seconds']} s")


def _checked(value):
    """value, if it is not a string or collection larger than LIMITS["chars"] (nested items counted)."""
    if isinstance(value, (str, list, tuple, dict)):
        _fits(_size(value), f"a {type(value).__name__}")
    return value


def _size(value, limit: int | None = None) -> int:
    """len of a string; for collections, their items counted through every level of nesting (a list
    of a million references to one list is as large as its text), the walk stopping past limit."""
    limit = LIMITS["chars"] if limit is None else limit
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, (list, tuple, dict)):
        return 1
    total = len(value)
    for item in (value.values() if isinstance(value, dict) else value):
        if isinstance(item, (list, tuple, dict)):
            total += _size(item, limit - total)
        if total > limit:
            break
    return total


def _fits(n: int, what: str) -> None:
    if n > LIMITS["chars"]:
        raise SecurityError(f"the chat template asked for {what} of {n:,} (the limit is {LIMITS['chars']:,})")


# --- checks before an operation allocates ----------------------------------------------------------

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*|\*)(?:\.(\d*|\*))?")
_WIDTH_METHODS = {"center", "ljust", "rjust", "zfill"}


def _check_percent(fmt: str, args) -> None:
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for n in (width, precision):
            if n.isdigit():
                _fits(int(n), "a % format width")
    for a in args if isinstance(args, tuple) else (args,):
        if isinstance(a, int) and not isinstance(a, bool):
            _fits(abs(a), "a % format width")


def _check_format(fmt: str) -> None:
    for _, _, spec, _ in string.Formatter().parse(fmt):
        for n in re.findall(r"\d+", spec or ""):
            _fits(int(n), "a format width")


def _check_join(sep: str, items) -> list:
    items = list(items)
    _fits(len(items), "a join")
    _fits(len(sep) * len(items) + sum(len(i) if isinstance(i, str) else 32 for i in items), "a join")
    return items


def _check_replace(s: str, old: str, new: str, count: int = -1) -> None:
    hits = len(s) + 1 if old == "" else s.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    _fits(len(s) + hits * max(len(new) - len(old), 0), "a replace")


def _check_method(obj, args, kwargs) -> None:
    """A call of a str method whose result could be far larger than its inputs."""
    obj = getattr(obj, "__wrapped__", obj)  # the sandbox hands str.format out inside a wrapper of its own
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if not isinstance(owner, str):
        return
    values = [*args, *kwargs.values()]
    if name in _WIDTH_METHODS and values and isinstance(values[0], int):
        _fits(values[0], f"str.{name} width")
    elif name == "expandtabs":
        size = values[0] if values and isinstance(values[0], int) else 8
        _fits(len(owner) + owner.count("\t") * max(size, 0), "str.expandtabs")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 and isinstance(args[2], int) else -1)
    elif name in ("format", "format_map"):
        _check_format(owner)
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool):
                _fits(abs(v), "a format argument used as a width")
    elif name == "join" and args:
        _check_join(owner, args[0])


_SEQUENCES = (str, list, tuple)


class _Sandbox(ImmutableSandboxedEnvironment):
    # These operators are checked before they run (which also stops jinja folding them at compile
    # time): "x" * 10**10 or 9**9**9 in a template would otherwise exhaust memory or never finish.
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator, left, right):
        _step()
        if operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise SecurityError(f"exponent {right} is too large for a chat template")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, _SEQUENCES) and isinstance(n, int):
                    _fits(_size(seq) * n, "a repeated sequence")
        if operator == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            _fits(_size(left) + _size(right), "a concatenation")
        if operator == "%" and isinstance(left, str):
            _check_percent(left, right)
        return _checked(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        _step()
        _check_method(__obj, args, kwargs)
        return _checked(super().call(__context, __obj, *args, **kwargs))

    def unsafe_undefined(self, obj, attribute):
        # jinja's default renders a forbidden attribute as empty text; a template reaching for
        # Python internals is hostile or broken, so it fails instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _guard_filter(name: str, func):
    """jinja's filter `name`, with its widths and counts checked before it runs and its result after."""
    @functools.wraps(func)
    def guarded(*args, **kwargs):
        _step()
        skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # the context or environment
        value, rest = (args[skip] if len(args) > skip else None), args[skip + 1:]
        numbers = [v for v in (*rest, *kwargs.values()) if isinstance(v, int) and not isinstance(v, bool)]
        for n in numbers:
            _fits(abs(n), f"a number given to the {name} filter")
        if name == "replace" and isinstance(value, str) and len(rest) >= 2:
            _check_replace(value, str(rest[0]), str(rest[1]), rest[2] if len(rest) > 2 else -1)
        elif name == "indent":
            width = rest[0] if rest else kwargs.get("width", 4)
            lines = str(value).count("\n") + 1
            _fits(len(str(value)) + lines * (len(width) if isinstance(width, str) else abs(int(width))), "an indent")
        elif name == "format" and isinstance(value, str):
            _check_percent(value, tuple(rest) or tuple(kwargs.values()))
        elif name == "join" and not isinstance(value, str):
            sep = rest[0] if rest else kwargs.get("d", "")
            args = (*args[:skip], _check_join(str(sep), value), *rest)
        return _checked(func(*args, **kwargs))

    return guarded


@pass_context
def _iterate(context, iterable):
    for item in iterable:
        _step()
        yield item


@pass_context
def _concat(context, parts):
    parts = [p if isinstance(p, str) else str(p) for p in parts]
    _fits(sum(map(len, parts)), "a ~ concatenation")
    return "".join(parts)


@pass_context
def _emit(context, value):
    deadline = getattr(_budget, "deadline", None)
    if deadline is not None:
        _budget.output += len(value) if isinstance(value, str) else len(str(_checked(value)))
        if _budget.output > LIMITS["output"]:
            raise SecurityError(f"the chat template output over {LIMITS['output']:,} characters")
        _step()
    return value


class _Instrument(NodeTransformer):
    """Routes loops, ~ and every output of the template through the budget's counters."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = _filter(node.iter, "_ondevice_iterate")
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        node = self.generic_visit(node)
        return _filter(nodes.List(node.nodes, lineno=node.lineno), "_ondevice_concat")

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)
        node.nodes = [n if isinstance(n, nodes.TemplateData) else _filter(n, "_ondevice_emit") for n in node.nodes]
        return node


def _filter(node: nodes.Expr, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _RaisedByTemplate(TemplateError):
    pass


def _raise_exception(message: str):
    raise _RaisedByTemplate(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Like transformers: plain json.dumps, not jinja's HTML-escaping tojson.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    _fits(len(format) * 16, "a strftime format")
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters.update(_ondevice_iterate=_iterate, _ondevice_concat=_concat, _ondevice_emit=_emit)
    del env.globals["lipsum"]  # lorem ipsum generation: of no use to a chat template, an easy way to allocate
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(_Instrument().visit(env.parse(template)))
