"""Fuzzing helpers shared by tests/test_fuzz.py (bounded, in CI) and scripts/fuzz.py (long runs).

Every case runs in a worker process with an address-space limit (RLIMIT_AS) and a per-case timeout,
so a memory blow-up or a hang is observed as such instead of taking the test run down. A case's
outcome is one of:

- "ok": the target succeeded (and its result passed the target's own checks);
- "error:<Class>": it raised an OndeviceError subclass with a message (the allowed failure);
- "bad:<Class>": it raised anything else, or an OndeviceError without a message (a bug);
- "crash": the worker died (signal, or an exception that escaped the worker loop: a bug);
- "hang": the case did not finish within its timeout (a bug).

Mutators take a `random.Random`, so a case is reproducible from its seed.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import re
import resource
import shutil
import struct
import traceback
from dataclasses import dataclass, field
from pathlib import Path

MEMORY_LIMIT = 2 << 30  # bytes of address space for a worker
OK_OUTCOMES = ("ok", "error:")

# ---------------------------------------------------------------------------------------------- worker


def _limit_memory(limit: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _serve(conn, limit: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _limit_memory(limit)
    import ondevice  # noqa: F401 - imported once, before the first case
    from ondevice.errors import OndeviceError

    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        name, args = msg
        try:
            detail = TARGETS[name](*args)
            outcome = "ok"
        except OndeviceError as e:
            outcome = f"error:{type(e).__name__}" if str(e).strip() else f"bad:{type(e).__name__}(no message)"
            if _caused_by(e, MemoryError):  # the worker's memory limit caught a blow-up the SDK let through
                outcome = f"bad:{type(e).__name__}(from MemoryError)"
            detail = str(e)[:300]
        except BaseException as e:  # noqa: BLE001 - any other type is what the fuzzer looks for
            outcome = f"bad:{type(e).__name__}"
            detail = "".join(traceback.format_exception(e))[-1500:]
        try:
            conn.send((outcome, detail))
        except Exception:  # noqa: BLE001 - an unpicklable detail
            conn.send((outcome, repr(detail)[:300]))


def _caused_by(e: BaseException, kind: type) -> bool:
    while e is not None:
        if isinstance(e, kind):
            return True
        e = e.__cause__ or e.__context__
    return False


class Worker:
    """A child process that runs targets under a memory limit; restarted after a crash or a hang."""

    def __init__(self, limit: int = MEMORY_LIMIT):
        self.limit = limit
        self.proc = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.limit), daemon=True)
        self.proc.start()
        child.close()

    def run(self, name: str, *args, timeout: float = 30.0) -> tuple[str, str]:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send((name, args))
        if not self.conn.poll(timeout):
            self._kill()
            return "hang", f"{name} did not finish in {timeout} s"
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.exitcode if self.proc is not None else None
            self._kill()
            return "crash", f"worker died (exit code {code})"

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(5)
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(5)
            except OSError:
                pass
        self._kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class Tally:
    """Counts of cases per target and outcome; the failures kept with their detail."""
    counts: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    def add(self, target: str, outcome: str, detail: str, case: str = "") -> bool:
        per = self.counts.setdefault(target, {})
        per[outcome] = per.get(outcome, 0) + 1
        good = outcome.startswith(OK_OUTCOMES)
        if not good:
            self.failures.append((target, outcome, case, detail))
        return good


# ---------------------------------------------------------------------------------------------- targets
# These run inside the worker. They return a short description of what happened.

INTERNALS = ("<module ", "__builtins__", "<built-in", "<bound method", "<frame", "<code object", "<function",
             "<class ", "<jinja2.", "<cell ")
MAX_RENDER = 50_000_000  # characters: more than the SDK's own output limit


def target_read_gguf(path: str) -> str:
    from ondevice.converters.sources import read_source

    ckpt = read_source(Path(path))
    return f"read {len(ckpt.weights)} tensors"


def target_convert_gguf(path: str, out: str) -> str:
    import ondevice

    try:
        ondevice.convert(path, out, force=True, progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return "converted"


def target_load_bundle(path: str, verify: bool) -> str:
    import ondevice

    model = ondevice.load(path, verify=verify, threads=1)
    gen = model.generate("hi", max_tokens=2, temperature=0)
    return f"generated {gen.text!r}"


def target_load_tokenizer(path: str) -> str:
    from ondevice.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    ids = tok.encode("hello world")
    return f"{len(ids)} ids, {tok.decode(ids)!r}"


def target_render_chat(template: str, messages: list) -> str:
    from ondevice.tokenizer import render_chat

    out = render_chat(template, messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    if not isinstance(out, str):
        raise AssertionError(f"render_chat returned {type(out).__name__}")
    if len(out) > MAX_RENDER:
        raise AssertionError(f"render_chat returned {len(out)} characters")
    leaked = [m for m in INTERNALS if m in out and m not in template]
    if leaked:
        raise AssertionError(f"rendered text exposes Python internals {leaked}: {out[:200]!r}")
    return f"{len(out)} chars"


def target_selftest(kind: str) -> str:
    """Each outcome the harness must tell apart (tests/test_fuzz.py checks that it does)."""
    from ondevice.errors import BundleError

    if kind == "typed":
        raise BundleError("a typed error with a message")
    if kind == "silent":
        raise BundleError("")
    if kind == "untyped":
        raise KeyError("kv_cache")
    if kind == "hang":
        while True:
            pass
    if kind == "crash":
        os.kill(os.getpid(), 11)
    if kind == "blow-up":
        try:
            bytearray(4 * MEMORY_LIMIT)
        except MemoryError as e:
            raise BundleError("wrapped") from e
    return "fine"


TARGETS = {"selftest": target_selftest, "read_gguf": target_read_gguf, "convert_gguf": target_convert_gguf,
           "load_bundle": target_load_bundle, "load_tokenizer": target_load_tokenizer,
           "render_chat": target_render_chat}

# ---------------------------------------------------------------------------------------------- GGUF

INTERESTING_U64 = [0, 1, 2, 7, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63,
                   2**64 - 1]
INTERESTING_U32 = [0, 1, 2, 3, 4, 5, 13, 14, 30, 31, 39, 40, 255, 2**16, 2**31, 2**32 - 1]


def gguf_layout(data: bytes) -> dict:
    """Positions of the header fields of a (valid, little-endian v3) GGUF: what the mutators aim at."""
    pos = {"u64": [], "u32": [], "strlen": [], "kv_type": [], "tensor_type": [], "tensor_offset": [],
           "dim": [], "n_dims": [], "arrlen": []}
    off = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", data, off)
    pos["n_tensors"], pos["n_kv"] = off, off + 8
    off += 16
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def read_string(off):
        pos["strlen"].append(off)
        (n,) = struct.unpack_from("<Q", data, off)
        return off + 8 + n

    def read_value(off, vtype):
        if vtype == 8:
            return read_string(off)
        if vtype == 9:
            (etype,) = struct.unpack_from("<I", data, off)
            pos["kv_type"].append(off)
            (n,) = struct.unpack_from("<Q", data, off + 4)
            pos["arrlen"].append(off + 4)
            off += 12
            for _ in range(n):
                off = read_value(off, etype)
            return off
        return off + scalar[vtype]

    for _ in range(n_kv):
        off = read_string(off)
        (vtype,) = struct.unpack_from("<I", data, off)
        pos["kv_type"].append(off)
        off = read_value(off + 4, vtype)
    for _ in range(n_tensors):
        off = read_string(off)
        (nd,) = struct.unpack_from("<I", data, off)
        pos["n_dims"].append(off)
        off += 4
        for _ in range(nd):
            pos["dim"].append(off)
            off += 8
        pos["tensor_type"].append(off)
        pos["tensor_offset"].append(off + 4)
        off += 12
    pos["header_end"] = off
    return pos


def mutate_gguf(data: bytes, layout: dict, rng: random.Random) -> tuple[bytes, str]:
    """One to three mutations of the header or tensor table (or a truncation). Returns (bytes, what)."""
    buf = bytearray(data)
    what = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.choice(["count", "count", "strlen", "arrlen", "dim", "n_dims", "tensor_type", "kv_type",
                           "offset", "truncate", "flip", "flip"])
        if kind == "count":
            at = layout[rng.choice(("n_tensors", "n_kv"))]
            value = rng.choice(INTERESTING_U64 + [rng.getrandbits(64)])
            if at + 8 <= len(buf):  # an earlier truncation may have cut the field off
                struct.pack_into("<Q", buf, at, value)
        elif kind in ("strlen", "arrlen", "dim", "offset"):
            key = {"offset": "tensor_offset"}.get(kind, kind)
            at = rng.choice(layout[key])
            (old,) = struct.unpack_from("<Q", data, at)
            value = rng.choice(INTERESTING_U64 + [old + 1, max(old - 1, 0), old * 2, len(data), len(data) + 1,
                                                  rng.getrandbits(64)])
            if at + 8 <= len(buf):
                struct.pack_into("<Q", buf, at, value)
        elif kind in ("n_dims", "tensor_type", "kv_type"):
            at = rng.choice(layout[kind])
            value = rng.choice(INTERESTING_U32 + [rng.getrandbits(32)])
            if at + 4 <= len(buf):
                struct.pack_into("<I", buf, at, value)
        elif kind == "truncate":
            cut = rng.choice((rng.randrange(len(buf) or 1), rng.randrange(layout["header_end"] + 64)))
            del buf[cut:]
            what.append(f"truncate@{cut}")
            continue
        else:  # a few random bytes of the header region
            for _ in range(rng.randint(1, 8)):
                at = rng.randrange(min(layout["header_end"], len(buf)) or 1)
                if at < len(buf):
                    buf[at] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
            what.append("flip")
            continue
        what.append(f"{kind}@{at}={value}")
    return bytes(buf), " ".join(what)


# ---------------------------------------------------------------------------------------------- JSON junk

def junk_value(rng: random.Random, depth: int = 0):
    choices = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 1e308, -1e308, 0.5, float("nan"),
               "", "x", "../../../etc/passwd", "/etc/passwd", "..", ".", "model.onnx", "a/../../b", "\x00",
               "tokenizer.json/", "C:\\x", [], {}, [1, 2, 3], ["a"], {"a": 1}]
    if depth < 3 and rng.random() < 0.15:
        if rng.random() < 0.5:
            return [junk_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(["a", "file", "graph", "layers", "0"]): junk_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    if depth == 0 and rng.random() < 0.03:
        return f"{NESTED}{rng.choice((50, 500, 5000, 100_000))}"
    return rng.choice(choices)


NESTED = "\x00nested:"  # a junk string that dumps() writes as that many nested lists


def dumps(obj) -> str:
    """json.dumps, with each NESTED marker written as nested lists (deeper than json.dumps can write)."""
    return re.sub(r'"\\u0000nested:(\d+)"', lambda m: "[" * int(m[1]) + "]" * int(m[1]), json.dumps(obj))


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _paths(v, prefix + (i,))


def mutate_json(obj, rng: random.Random, n: int | None = None):
    """A deep copy of obj with 1-3 values replaced by junk, keys deleted or junk keys added."""
    obj = json.loads(json.dumps(obj))
    what = []
    for _ in range(n or rng.choice((1, 1, 2, 3))):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            break
        p = rng.choice(paths)
        parent = obj
        for k in p[:-1]:
            parent = parent[k]
        op = rng.random()
        if op < 0.2 and isinstance(parent, dict):
            del parent[p[-1]]
            what.append(f"del {'/'.join(map(str, p))}")
        elif op < 0.25 and isinstance(parent, dict):
            parent["junk" + str(rng.randrange(100))] = junk_value(rng)
            what.append(f"add under {'/'.join(map(str, p[:-1]))}")
        else:
            parent[p[-1]] = junk_value(rng)
            what.append(f"set {'/'.join(map(str, p))}={_short(parent[p[-1]])}")
    return obj, "; ".join(what)


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) < 40 else s[:37] + "..."


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    buf = bytearray(data)
    if rng.random() < 0.4 and buf:
        cut = rng.randrange(len(buf))
        return bytes(buf[:cut]), f"truncate@{cut}"
    n = rng.randint(1, 16)
    for _ in range(n):
        if buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    return bytes(buf), f"{n} random bytes"


# ---------------------------------------------------------------------------------------------- bundles

BUNDLE_FILES = ("manifest.json", "model.onnx", "model.onnx.data", "tokenizer.json")


def mutate_bundle(src: Path, dst: Path, rng: random.Random) -> tuple[bool, str]:
    """A copy of the bundle at dst with one kind of damage; returns (verify flag to load with, what)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    verify = rng.random() < 0.5
    manifest = json.loads((dst / "manifest.json").read_text())
    kind = rng.choice(["manifest", "manifest", "manifest", "file", "file", "symlink", "version"])
    if kind == "manifest":
        new, what = mutate_json(manifest, rng)
        (dst / "manifest.json").write_text(dumps(new))
    elif kind == "version":
        manifest["format_version"] = junk_value(rng) if rng.random() < 0.5 else rng.randint(-3, 10)
        (dst / "manifest.json").write_text(dumps(manifest))
        what = f"format_version={_short(manifest['format_version'])}"
    elif kind == "file":
        name = rng.choice(BUNDLE_FILES)
        data, what = mutate_bytes((dst / name).read_bytes(), rng)
        (dst / name).write_bytes(data)
        what = f"{name}: {what}"
    else:  # a file of the bundle replaced by a symlink to a copy outside it (same bytes, same checksum)
        name = rng.choice(BUNDLE_FILES[1:])
        outside = dst.parent / f"outside-{name}"
        shutil.copy(dst / name, outside)
        (dst / name).unlink()
        (dst / name).symlink_to(outside if rng.random() < 0.5 else os.path.relpath(outside, dst))
        what = f"{name} -> symlink outside"
    return verify, f"{kind}: {what} (verify={verify})"


# ---------------------------------------------------------------------------------------------- chat templates

HOSTILE_SNIPPETS = [
    "{{ ''.__class__ }}", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ [].__class__.__base__ }}",
    "{{ cycler.__init__.__globals__ }}", "{{ cycler.__init__.__globals__.os }}", "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__['__builtins__'] }}", "{{ lipsum.__globals__ }}", "{{ lipsum.__globals__.os }}",
    "{{ self.__init__.__globals__ }}", "{{ self._TemplateReference__context }}", "{{ messages.__class__ }}",
    "{{ raise_exception.__globals__ }}", "{{ strftime_now.__globals__ }}", "{{ range.__self__ }}",
    "{{ messages[0].__class__.__init__ }}", "{{ (messages|attr('__class__')) }}", "{{ ''|attr('__class__') }}",
    "{{ request }}", "{{ config }}", "{{ undefined_thing }}", "{{ undefined_thing.attr }}", "{{ undefined_thing() }}",
    "{% for i in range(10**9) %}{{ i }}{% endfor %}", "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}", "{{ 'a' * 10**10 }}", "{{ 'a' * 9999999 * 9999999 }}", "{{ 9**9**9 }}",
    "{{ 2 ** 1000 * 2 ** 1000 }}", "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s|length }}", "{% set ns = namespace(s='ab') %}{% for i in range(60) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "{% macro f() %}{{ f() }}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ lipsum(10**9) }}", "{{ lipsum(n=999999, min=100, max=100) }}", "{{ 'x'|center(10**10) }}",
    "{{ 'x'|indent(10**10) }}", "{{ 'x'.ljust(10**10) }}", "{{ 'x'.zfill(10**10) }}", "{{ '%10000000000s' % 'x' }}",
    "{{ '{:>10000000000}'.format('x') }}", "{{ ('a' * 1000000)|replace('a', 'a' * 1000000) }}",
    "{{ ('a' * 1000000).replace('a', 'a' * 1000000) }}", "{{ range(100000)|list|join(',' * 10000) }}",
    "{{ 'a'|wordwrap(10**10) }}", "{{ 'a'|truncate(10**10) }}", "{{ range(10**9)|list }}", "{{ range(10**9)|sum }}",
    "{{ range(100000)|batch(10**10)|list }}", "{{ ['a'] * 10**9 }}", "{{ [[1] * 1000] * 1000000 }}",
    "{% raw %}{{ ''.__class__ }}{% endraw %}", "{% raw %}{% endraw %}{% endraw %}", "{% raw %}", "{% endraw %}",
    "{{", "{%", "{% for %}", "{% if %}{% endif %}", "{% for m in messages %}", "{% endfor %}", "{# unclosed",
    "{{ messages[10**10] }}", "{{ messages[-1]['content'][::-1] }}", "{{ messages|tojson }}", "{{ messages|pprint }}",
    "{{ raise_exception('no') }}", "{{ raise_exception(messages) }}", "{{ strftime_now('%Y' * 100000) }}",
    "{{ strftime_now(10) }}", "{% set x = messages.append(1) %}", "{% set x = messages.pop() %}",
    "{{ messages.clear() }}", "{% set d = {} %}{{ d.update({'a': 1}) }}", "{{ dict(a=1).__class__ }}",
    "{% include 'x' %}", "{% import 'os' as os %}", "{% extends 'base' %}", "{% from 'x' import y %}",
    "{{ 'a' ~ 'b' * 10**8 }}", "{{ (('a' * 5000000) ~ ('a' * 5000000)) ~ ('a' * 5000000) }}",
    "{% filter upper %}{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endfilter %}",
    "{% for i in range(100000) %}{{ 'x' * 10000 }}{% endfor %}", "{{ '%s' % (messages,) }}",
    "{{ 10**10**10 }}", "{{ 1 / 0 }}", "{{ 1 // 0 }}", "{{ 'a' | int(base=10**9) }}", "{{ '9' * 5000 | int }}",
    "{{ loop }}", "{{ caller() }}", "{{ varargs }}", "{{ kwargs }}", "{{ self }}", "{{ context }}",
    "{{ ('a' * 1000)|format }}", "{{ '%(a)s'|format(a=1) }}", "{{ messages|map(attribute='__class__')|list }}",
    "{{ messages|selectattr('__class__')|list }}", "{{ messages|sort(attribute='__class__') }}",
    "{{ messages|groupby('__class__') }}", "{{ [1,2]|map('attr', '__class__')|list }}",
]


def hostile_template(rng: random.Random) -> tuple[str, str]:
    parts = [rng.choice(HOSTILE_SNIPPETS) for _ in range(rng.choice((1, 1, 2, 3)))]
    if rng.random() < 0.2:  # deep nesting
        depth = rng.choice((10, 100, 1000, 5000))
        inner = rng.choice(("{% if true %}", "{% for m in messages %}", "{% filter upper %}"))
        close = {"{% if true %}": "{% endif %}", "{% for m in messages %}": "{% endfor %}",
                 "{% filter upper %}": "{% endfilter %}"}[inner]
        parts.append(inner * depth + "x" + close * depth)
    if rng.random() < 0.1:
        parts.append("{{ " + "(" * rng.choice((100, 1000, 10000)) + "1" + ")" * rng.choice((100, 1000, 10000)) + " }}")
    if rng.random() < 0.3:  # an ordinary template around it
        parts.insert(0, "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}")
    template = "".join(parts)
    return template, template if len(template) < 200 else template[:197] + "..."


def chat_messages(rng: random.Random) -> list:
    return rng.choice([
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "{{ ''.__class__ }}"}],
        [],
        [{"role": "user", "content": "x" * 1000}],
    ])


# ---------------------------------------------------------------------------------------------- cases
# One generator per target (scripts/fuzz.py --targets): makes case n from its own rng, runs it in the
# worker, yields (name, outcome, detail, what was mutated).

def case_rng(seed: int, target: str, n: int) -> random.Random:
    """The rng of case n: a case is replayed alone from its seed, target and number."""
    return random.Random(f"{seed}-{target}-{n}")


def setup(work: Path) -> dict:
    import ondevice
    from models import write_tiny_llama_gguf

    gguf = write_tiny_llama_gguf(work / "tiny.gguf", weight_type="Q4_1", seed=0)
    bundle = ondevice.convert(gguf, work / "tiny.bundle", progress=False)
    return {"gguf": Path(gguf), "bundle": Path(bundle)}


def gguf_case(ctx, rng, work, worker, n):
    data = ctx.setdefault("gguf_bytes", ctx["gguf"].read_bytes())
    layout = ctx.setdefault("gguf_layout", gguf_layout(data))
    mutated, what = mutate_gguf(data, layout, rng)
    path = work / "case.gguf"
    path.write_bytes(mutated)
    outcome, detail = worker.run("read_gguf", str(path), timeout=30)
    yield "gguf.read", outcome, detail, what
    if outcome == "ok" or n % 10 == 0:  # convert whatever reads, and a tenth of the rest
        outcome, detail = worker.run("convert_gguf", str(path), str(work / "case.bundle"), timeout=60)
        yield "gguf.convert", outcome, detail, what


def bundle_case(ctx, rng, work, worker, n):
    case = work / "bundles" / "case.bundle"
    case.parent.mkdir(exist_ok=True)
    for p in case.parent.glob("outside-*"):
        p.unlink()
    verify, what = mutate_bundle(ctx["bundle"], case, rng)
    outcome, detail = worker.run("load_bundle", str(case), verify, timeout=60)
    yield "bundle.load", outcome, detail, what


def tokenizer_case(ctx, rng, work, worker, n):
    src = ctx["bundle"] / "tokenizer.json"
    path = work / "tokenizer.json"
    if rng.random() < 0.6:
        new, what = mutate_json(json.loads(src.read_text()), rng)
        path.write_text(dumps(new))
    else:
        data, what = mutate_bytes(src.read_bytes(), rng)
        path.write_bytes(data)
    outcome, detail = worker.run("load_tokenizer", str(path), timeout=30)
    yield "tokenizer.load", outcome, detail, what


def chat_case(ctx, rng, work, worker, n):
    template, what = hostile_template(rng)
    outcome, detail = worker.run("render_chat", template, chat_messages(rng), timeout=30)
    yield "chat.render", outcome, detail, what


CASES = {"gguf": gguf_case, "bundle": bundle_case, "tokenizer": tokenizer_case, "chat": chat_case}
