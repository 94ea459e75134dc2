"""Device profiles: load and validate them, describe the host, and plan a run from one.

A profile (profiles/*.json; fields, units and sources policy in profiles/README.md, the same rules as
a JSON Schema in profiles/schema.json) records what a device offers: cores, DRAM, memory and storage
bandwidth, the NPU, and the ONNX Runtime execution providers to try in order. `plan` turns it into
what the runtime does; the engine takes the plan and has no device-specific branches:

    plan = plan(load_profile("snapdragon-8gen3-phone"))
    plan.providers      # [("QNNExecutionProvider", {...}), ..., ("CPUExecutionProvider", {})]
    plan.fallbacks      # ["QNNExecutionProvider not available in this onnxruntime build: ..."]
    plan.prefill_chunk  # 256, or None for one-shot prefill
    plan.threads        # the big cores
"""

from __future__ import annotations

import difflib
import importlib.resources
import json
import logging
import os
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from ondevice.errors import ProfileError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CPU_PROVIDER = "CPUExecutionProvider"
SOURCE_KINDS = ("vendor", "paper", "benchmark", "measured", "derived", "estimate")
PRECISIONS = ("int4", "int8", "int16", "fp16", "bf16", "fp32")
ARCHES = ("x86_64", "arm64")
# Figures that need an entry in "sources" whenever they are present and not null.
FIGURES = ("cpu.cores", "cpu.isa", "dram_mb", "memory_bandwidth_gb_s", "storage.seq_read_mb_s",
           "storage.rand_4k_read_mb_s", "npu.int8_tops", "npu.fp16_tops", "npu.precisions",
           "npu.chunk_sizes", "npu.addressable_mb", "prefill_chunk")
_NOT_PROFILES = {"schema.json"}


@dataclass(frozen=True)
class Plan:
    """What to run with: ready for `onnxruntime.InferenceSession(..., providers=plan.providers)`."""

    providers: list[tuple[str, dict[str, str]]]  # in order of preference, CPUExecutionProvider last
    fallbacks: list[str] = field(default_factory=list)  # one line per preferred provider left out
    prefill_chunk: int | None = None  # fixed prefill chunk (static shapes); None = one-shot
    threads: int = 1  # intra-op threads: the big cores


# ---------------------------------------------------------------------------------------- loading

def _data_dir() -> importlib.resources.abc.Traversable:
    return importlib.resources.files("ondevice.profiles_data")


def list_profiles() -> list[str]:
    """Names of the profiles shipped with the package, sorted."""
    return sorted(p.name[:-5] for p in _data_dir().iterdir()
                  if p.name.endswith(".json") and p.name not in _NOT_PROFILES)


def load_profile(name_or_path: str | os.PathLike) -> dict:
    """A validated profile: by name (`list_profiles()`) or from a JSON file path."""
    text = os.fspath(name_or_path)
    if text.endswith(".json") or "/" in text or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise ProfileError(f"profile file not found: {path}")
        source, origin = path.read_text(encoding="utf-8"), str(path)
    else:
        names = list_profiles()
        if text not in names:
            close = difflib.get_close_matches(text, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ProfileError(f"unknown profile '{text}' (shipped: {', '.join(names)}){hint} "
                               "A path to a .json file works too.")
        source, origin = (_data_dir() / f"{text}.json").read_text(encoding="utf-8"), f"{text}.json"
    try:
        profile = json.loads(source)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{origin}: not valid JSON: {e}") from None
    return validate_profile(profile, origin)


# ------------------------------------------------------------------------------------- validation

def validate_profile(profile: object, origin: str = "profile") -> dict:
    """Check a profile's fields, types, ranges and sources; return it unchanged or raise ProfileError."""
    p = _Checker(origin)
    p.object(profile, "", {"schema_version", "name", "description", "cpu", "dram_mb", "memory_bandwidth_gb_s",
                           "storage", "npu", "gpu", "execution_providers", "prefill_chunk", "sources"},
             optional={"description", "gpu"})
    if profile["schema_version"] != SCHEMA_VERSION:
        p.fail("schema_version", f"is {profile['schema_version']!r}; this version of ondevice reads {SCHEMA_VERSION}")
    name = p.string(profile, "name")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        p.fail("name", f"'{name}' must be lowercase letters, digits and dashes")
    if "description" in profile:
        p.string(profile, "description")

    cpu = p.object(profile["cpu"], "cpu", {"arch", "cores", "clusters", "isa"}, optional={"clusters"})
    if cpu["arch"] not in ARCHES:
        p.fail("cpu.arch", f"'{cpu['arch']}' is not one of {', '.join(ARCHES)}")
    cores = p.object(cpu["cores"], "cpu.cores", {"total", "big", "little"})
    total, big, little = (p.integer(cores, k, "cpu.cores", minimum=m) for k, m in
                          (("total", 1), ("big", 1), ("little", 0)))
    if big + little != total:
        p.fail("cpu.cores", f"big ({big}) + little ({little}) must equal total ({total})")
    if "clusters" in cpu:
        p.string(cpu, "clusters", "cpu")
    for i, flag in enumerate(p.array(cpu, "isa", "cpu", allow_empty=True)):
        if not isinstance(flag, str) or not re.fullmatch(r"[a-z0-9_]+", flag):
            p.fail(f"cpu.isa[{i}]", f"{flag!r} must be a lowercase feature name such as 'avx2' or 'dotprod'")

    p.integer(profile, "dram_mb", minimum=1)
    p.number(profile, "memory_bandwidth_gb_s", nullable=True)
    storage = p.object(profile["storage"], "storage", {"type", "seq_read_mb_s", "rand_4k_read_mb_s"},
                       optional={"type"})
    for key in ("seq_read_mb_s", "rand_4k_read_mb_s"):
        p.number(storage, key, "storage", nullable=True)

    npu = profile["npu"]
    if npu is not None:
        p.object(npu, "npu", {"name", "int8_tops", "fp16_tops", "precisions", "static_shapes", "chunk_sizes",
                              "addressable_mb", "execution_providers"}, optional={"fp16_tops", "addressable_mb"})
        p.string(npu, "name", "npu")
        p.number(npu, "int8_tops", "npu", nullable=True)
        if "fp16_tops" in npu:
            p.number(npu, "fp16_tops", "npu", nullable=True)
        for i, precision in enumerate(p.array(npu, "precisions", "npu")):
            if precision not in PRECISIONS:
                p.fail(f"npu.precisions[{i}]", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
        if not isinstance(npu["static_shapes"], bool):
            p.fail("npu.static_shapes", f"must be true or false, got {npu['static_shapes']!r}")
        sizes = p.array(npu, "chunk_sizes", "npu")
        for i, size in enumerate(sizes):
            p.integer(sizes, i, "npu.chunk_sizes", minimum=1)
        if sizes != sorted(set(sizes)):
            p.fail("npu.chunk_sizes", f"{sizes} must be increasing without repeats")
        if "addressable_mb" in npu:
            p.integer(npu, "addressable_mb", "npu", minimum=1)
        npu_providers = [p.provider_name(ep, f"npu.execution_providers[{i}]")
                         for i, ep in enumerate(p.array(npu, "execution_providers", "npu"))]
    if profile.get("gpu") is not None:
        p.string(p.object(profile["gpu"], "gpu", {"name"}), "name", "gpu")

    providers = p.array(profile, "execution_providers")
    names = []
    for i, ep in enumerate(providers):
        where = f"execution_providers[{i}]"
        p.object(ep, where, {"name", "options"}, optional={"options"})
        names.append(p.provider_name(ep["name"], f"{where}.name"))
        for key, value in p.object(ep.get("options", {}), f"{where}.options").items():
            if not isinstance(value, str):
                p.fail(f"{where}.options.{key}", f"must be a string (ONNX Runtime takes string options), got {value!r}")
    if len(set(names)) != len(names):
        p.fail("execution_providers", f"lists a provider twice: {names}")
    if CPU_PROVIDER in names and names[-1] != CPU_PROVIDER:
        p.fail("execution_providers", f"{CPU_PROVIDER} is the fallback of last resort: list it last")
    for ep in npu_providers if npu is not None else []:
        if ep not in names:
            p.fail("npu.execution_providers", f"names {ep}, which execution_providers does not list")

    chunk = profile["prefill_chunk"]
    if chunk is not None:
        p.integer(profile, "prefill_chunk", minimum=1)
        if npu is not None and chunk not in npu["chunk_sizes"]:
            p.fail("prefill_chunk", f"{chunk} is not one of npu.chunk_sizes {npu['chunk_sizes']}")

    sources = p.object(profile["sources"], "sources")
    for key, entry in sources.items():
        where = f"sources.{key}"
        if _lookup(profile, key) is _MISSING:
            p.fail(where, f"names no field of the profile ('{key}')")
        p.object(entry, where, {"kind", "ref", "note"}, optional={"note"})
        if entry["kind"] not in SOURCE_KINDS:
            p.fail(f"{where}.kind", f"'{entry['kind']}' is not one of {', '.join(SOURCE_KINDS)}")
        p.string(entry, "ref", where)
        if "note" in entry:
            p.string(entry, "note", where)
    for key in FIGURES:
        if _lookup(profile, key) not in (None, _MISSING) and key not in sources:
            p.fail("sources", f"has no entry for '{key}': every figure says where it comes from "
                              f"(kind one of {', '.join(SOURCE_KINDS)}, ref, optional note)")
    return profile


_MISSING = object()


def _lookup(obj: object, dotted: str) -> object:
    """The value at a dotted path ('npu.int8_tops'), or _MISSING."""
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


class _Checker:
    """Type and range checks that raise ProfileError naming the file and the field."""

    def __init__(self, origin: str):
        self.origin = origin

    def fail(self, where: str, message: str) -> None:
        raise ProfileError(f"{self.origin}: {where + ' ' if where else ''}{message}")

    def object(self, value: object, where: str, keys: set[str] | None = None,
               optional: set[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"must be an object, got {type(value).__name__}")
        if keys is not None:
            prefix = f"{where}." if where else ""
            for key in sorted(keys - set(optional) - set(value)):
                self.fail("", f"missing field '{prefix}{key}'")
            for key in value:
                if key not in keys:
                    close = difflib.get_close_matches(key, keys, n=1)
                    hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(sorted(keys))})"
                    self.fail("", f"unknown field '{prefix}{key}'{hint}")
        return value

    def array(self, obj: dict, key: str, where: str = "", allow_empty: bool = False) -> list:
        value = obj[key]
        if not isinstance(value, list) or not (value or allow_empty):
            self.fail(_join(where, key), f"must be a {'' if allow_empty else 'non-empty '}list, got {value!r}")
        return value

    def string(self, obj: dict, key: str, where: str = "") -> str:
        value = obj[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(_join(where, key), f"must be a non-empty string, got {value!r}")
        return value

    def integer(self, obj: dict | list, key: str | int, where: str = "", minimum: int = 0) -> int:
        value = obj[key]
        path = f"{where}[{key}]" if isinstance(key, int) else _join(where, key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be an integer, got {value!r}")
        if value < minimum:
            self.fail(path, f"must be >= {minimum}, got {value}")
        return value

    def number(self, obj: dict, key: str, where: str = "", nullable: bool = False) -> float | None:
        value = obj[key]
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(_join(where, key), f"must be a number{' or null (unknown)' if nullable else ''}, got {value!r}")
        if not value > 0:
            self.fail(_join(where, key), f"must be > 0, got {value}")
        return value

    def provider_name(self, name: object, where: str) -> str:
        known = ort.get_all_providers()
        if name not in known:
            by_lower = {k.lower(): k for k in known}  # 'QnnExecutionProvider', 'xnnpack' -> the real name
            key = str(name).lower()
            close = [by_lower[k] for k in (key, key + "executionprovider") if k in by_lower]
            close = close or [by_lower[k] for k in difflib.get_close_matches(key, by_lower, n=1, cutoff=0.6)]
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
            self.fail(where, f"{name!r} is not an ONNX Runtime execution provider{hint}")
        return name


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# ------------------------------------------------------------------------------------ host profile

_X86_ISA = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
            "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
_ARM_ISA = {"asimd": "neon", "asimdhp": "fp16", "asimddp": "dotprod", "i8mm": "i8mm", "bf16": "bf16",
            "sve": "sve", "sve2": "sve2", "sme": "sme"}


def detect_host() -> dict:
    """A profile of the machine this runs on, from the OS: usable cores, DRAM, CPU features.

    No NPU and no storage or memory-bandwidth figures (null: unknown; `benchmarks/device_figures.py`
    measures them). Big cores are told from little ones by /sys/devices/system/cpu/cpu*/cpu_capacity
    where the kernel provides it (ARM big.LITTLE); otherwise every core counts as big."""
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "x86_64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(machine)
    if arch is None:
        raise ProfileError(f"no profile for CPU architecture '{platform.machine()}' (supported: {', '.join(ARCHES)})")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    little = _little_cores(cpus)
    profile = {
        "schema_version": SCHEMA_VERSION,
        "name": f"host-{arch.replace('_', '-')}-{len(cpus)}core",
        "description": f"Detected at run time: {platform.system()} {platform.machine()}.",
        "cpu": {"arch": arch, "cores": {"total": len(cpus), "big": len(cpus) - little, "little": little},
                "isa": _isa_features(arch)},
        "dram_mb": _dram_mb(),
        "memory_bandwidth_gb_s": None,
        "storage": {"seq_read_mb_s": None, "rand_4k_read_mb_s": None},
        "npu": None,
        "gpu": None,
        "execution_providers": [{"name": CPU_PROVIDER}],
        "prefill_chunk": None,
        "sources": {
            "cpu.cores": {"kind": "measured", "ref": "os.sched_getaffinity (usable CPUs); "
                                                     "/sys/devices/system/cpu/cpu*/cpu_capacity for little cores"},
            "cpu.isa": {"kind": "measured", "ref": "flags / Features line of /proc/cpuinfo"},
            "dram_mb": {"kind": "measured", "ref": "MemTotal in /proc/meminfo (sysconf elsewhere)"},
        },
    }
    return validate_profile(profile, "detected host")


def _little_cores(cpus: list[int]) -> int:
    capacity = {}
    for cpu in cpus:
        try:
            capacity[cpu] = int(Path(f"/sys/devices/system/cpu/cpu{cpu}/cpu_capacity").read_text())
        except (OSError, ValueError):
            return 0
    top = max(capacity.values(), default=0)
    little = sum(1 for c in capacity.values() if c < top / 2)
    return little if little < len(cpus) else 0


def _isa_features(arch: str) -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    match = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.MULTILINE)
    flags = set(match.group(1).split()) if match else set()
    if arch == "x86_64":
        return [f for f in _X86_ISA if f in flags]
    return [name for flag, name in _ARM_ISA.items() if flag in flags]


def _dram_mb() -> int:
    try:
        match = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) // 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)


# ------------------------------------------------------------------------------------------ plan

def plan(profile: dict, manifest: dict | None = None, available_providers: Iterable[str] | None = None) -> Plan:
    """The profile's execution providers that this onnxruntime has (preference order and options kept,
    CPUExecutionProvider always last), the prefill chunk, and the thread count.

    Each preferred provider left out gives one line in `fallbacks`, also logged as a warning on the
    `ondevice.profiles` logger. With a bundle manifest, a prefill chunk that does not fit the bundle's
    context drops to the largest NPU chunk size that does, or to one-shot prefill."""
    validate_profile(profile, f"profile '{profile.get('name', '?')}'" if isinstance(profile, dict) else "profile")
    available = set(ort.get_available_providers() if available_providers is None else available_providers)
    wanted = [(ep["name"], dict(ep.get("options", {}))) for ep in profile["execution_providers"]]
    if all(name != CPU_PROVIDER for name, _ in wanted):
        wanted.append((CPU_PROVIDER, {}))
    usable = [(name, options) for name, options in wanted if name in available or name == CPU_PROVIDER]

    fallbacks = []
    for i, (name, _) in enumerate(wanted):
        if name not in available and name != CPU_PROVIDER:
            to = next(n for n, _ in wanted[i + 1:] if n in available or n == CPU_PROVIDER)
            fallbacks.append(f"{name} not available in this onnxruntime build: falling back to {to}")

    chunk = profile["prefill_chunk"]
    if chunk is not None and manifest is not None and chunk >= int(manifest["max_context"]):
        context = int(manifest["max_context"])
        sizes = profile["npu"]["chunk_sizes"] if profile["npu"] else []
        chunk = max((s for s in sizes if s < context), default=None)
        fallbacks.append(f"prefill chunk {profile['prefill_chunk']} does not fit the bundle's context of {context} "
                         f"tokens: " + (f"using chunks of {chunk}" if chunk else "one-shot prefill"))

    for line in fallbacks:
        log.warning(line)
    return Plan(providers=usable, fallbacks=fallbacks, prefill_chunk=chunk,
                threads=profile["cpu"]["cores"]["big"])
