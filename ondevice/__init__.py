"""ondevice: run LLMs on phones and laptops.

    import ondevice
    ondevice.convert("smollm2-135m", "smollm2.bundle")
    model = ondevice.load("smollm2.bundle")
    print(model.generate("What is the capital of France?").text)
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ondevice.engine import Generation, Model, whole_number
from ondevice.errors import (BudgetTooSmallError, BundleError, BundleExistsError, ChatTemplateError,
                             ContextOverflowError, DraftMismatchError, InvalidArgumentError, ModelBusyError,
                             ModelNotFoundError, OndeviceError, ProviderError, SourceFormatError,
                             TokenizerMismatchError, UnsupportedArchitectureError)

__version__ = "0.1.0"
__all__ = ["load", "convert", "Model", "Generation", "OndeviceError", "BudgetTooSmallError", "BundleError",
           "BundleExistsError", "ChatTemplateError", "ContextOverflowError", "DraftMismatchError",
           "InvalidArgumentError", "ModelBusyError", "ModelNotFoundError", "ProviderError", "SourceFormatError",
           "TokenizerMismatchError", "UnsupportedArchitectureError"]

log = logging.getLogger(__name__)
SPLIT_PREFILL_POLICIES = ("out-of-order", "in-order")


def load(path: str | os.PathLike, *, threads: int | None = None, verify: bool = True,
         providers: list[str] | None = None, draft: str | os.PathLike | None = None,
         lookup: bool = False, prefill_chunk: int | None = None, split_prefill: bool | str = False,
         profile: str | os.PathLike | None = None, int8_prefill: bool = False,
         dram_budget: int | str | None = None, ffn_fraction: float | None = None,
         ffn_select: str = "top-k", backend: str = "onnx") -> Model:
    """Open a bundle: check it (sha256 of every file unless verify=False) and create the session once.

    The checksums are computed in a thread while ONNX Runtime builds its session; the model is
    handed out only after they all match. Bad argument values raise InvalidArgumentError (a ValueError).
    providers: the ONNX Runtime execution providers to run on, in order (names or (name, options)
    pairs; default CPU). Each must be in this onnxruntime build and start, else ProviderError (which
    lists the providers the build has): a list given here never falls back silently.
    draft (a draft bundle with the same tokenizer) and/or lookup (prompt-lookup drafts) turn on
    speculative decoding: the output stays exactly the model's own; `model.speculator = None` turns it
    off again. A draft with another tokenizer raises TokenizerMismatchError, one that proposes token ids
    the target lacks DraftMismatchError; a draft with a shorter context than the target's drafts while
    the text fits in it, then decoding goes on without it. prefill_chunk: prompts run in chunks of
    exactly this many tokens (the last one padded), the static shapes an NPU graph needs.
    split_prefill: prompts prefill through the bundle's split graphs (convert with split_prefill=...):
    linear subgraphs on one worker, attention on another, in an out-of-order schedule (True, or
    "out-of-order") or chunk by chunk ("in-order"); runtimes/split_prefill.py.
    profile: a device profile (name in profiles/, a path, or "host"): its plan picks the execution
    providers (the first available of its preference list; each fallback is logged, as is a provider
    that does not start), the prefill chunk and the threads, unless given here. int8_prefill: prompts
    prefill in fixed-size chunks through the bundle's int8 graph (convert with int8_prefill=True);
    decoding stays on the float graph.
    dram_budget: run with the FFN weights in the bundle's flash store (convert with flash=True) under
    this DRAM budget (bytes, or a string such as "70MB"): the resident weights plus a window of
    recently used FFN neurons, the rest read from storage per token (runtimes/flash_mlp.py); below what
    must stay resident it raises BudgetTooSmallError, saying how much to give.
    ffn_fraction: the share of FFN neurons each token keeps there (default 0.8, measured; 1.0 = all);
    ffn_select: how they are chosen: "top-k" |silu(gate)| (default), "threshold" (per-layer thresholds
    calibrated at conversion for that fraction), "predictor" (the low-rank predictors, if converted).
    backend: "onnx" (default), "tflite": the bundle's LiteRT model (convert with target="onnx,tflite")
    through the ai-edge-litert interpreter (runtimes/tflite.py), or "coreml": its Core ML model
    (target="onnx,coreml"; macOS 15+, runtimes/coreml.py); those two: plain decoding and chunked
    prefill only."""
    from concurrent.futures import ThreadPoolExecutor

    from ondevice.bundle import read_bundle, verify_checksums
    from ondevice.runtimes.memory import trim_heap
    from ondevice.runtimes.onnx import OnnxBackend, check_providers, dropped_providers, share_thread_pool
    from ondevice.tokenizer import load_tokenizer

    started = time.perf_counter()
    if backend not in ("onnx", "tflite", "coreml"):
        raise InvalidArgumentError(f"backend must be 'onnx', 'tflite' or 'coreml', not {backend!r}")
    _check_load_args(threads=threads, prefill_chunk=prefill_chunk, split_prefill=split_prefill)
    if backend != "onnx":
        return _load_static(path, backend, threads=threads, verify=verify, started=started,
                            onnx_only=dict(draft=draft, lookup=lookup, prefill_chunk=prefill_chunk,
                                           split_prefill=split_prefill, profile=profile, int8_prefill=int8_prefill,
                                           dram_budget=dram_budget, providers=providers))
    explicit_providers = providers is not None
    check_providers(providers)
    plan = None
    if profile is not None:
        plan = _plan(profile)
        providers = providers or plan.providers
        threads = threads or plan.threads
        prefill_chunk = prefill_chunk if prefill_chunk is not None else plan.prefill_chunk
    threading = "spin"
    if draft is not None:  # the draft's session and this one take turns on the same cores
        threading = "shared" if share_thread_pool(threads) else "sleep"
    bundle = read_bundle(path, verify=False)  # structure, paths and sizes; hashes below
    with ThreadPoolExecutor(max_workers=2) as pool:
        checked = pool.submit(verify_checksums, bundle) if verify else None
        tokenizer = pool.submit(load_tokenizer, bundle.path)
        try:
            backend = OnnxBackend(bundle, threads=threads, providers=providers, threading=threading,
                                  main_graph=dram_budget is None)
            _check_started(dropped_providers(backend.session, providers), explicit_providers)
            if dram_budget is not None:
                backend.flash_layers = _flash_layers(bundle, backend, dram_budget, ffn_fraction, ffn_select, threads,
                                                     providers)
        finally:
            if checked is not None:
                checked.result()  # raises BundleError on a mismatch, before anything runs
        model = Model(bundle, backend, tokenizer=tokenizer.result())
    trim_heap()  # the graph protos and tokenizer JSON parsed above
    model.plan = plan
    if prefill_chunk is not None:
        backend.chunk_size = int(prefill_chunk)
    if split_prefill:
        from ondevice.runtimes.split_prefill import SplitPrefill

        policy = "out-of-order" if split_prefill is True else split_prefill
        backend.split_prefill = SplitPrefill(bundle, backend, policy=policy, providers=providers)
    if int8_prefill:
        backend.use_int8_prefill(bundle, threads=threads, providers=providers, threading=threading)
    if draft is not None or lookup:
        model.speculator = _speculator(model, draft, lookup, threads, verify, threading)
    model.load_s = time.perf_counter() - started
    return model


def _check_load_args(*, threads, prefill_chunk, split_prefill) -> None:
    if threads is not None:
        whole_number("threads", threads, at_least=1)
    if prefill_chunk is not None:
        whole_number("prefill_chunk", prefill_chunk, at_least=1)
    if split_prefill not in (None, False, True, *SPLIT_PREFILL_POLICIES):
        raise InvalidArgumentError(f"split_prefill must be True, False or one of {', '.join(SPLIT_PREFILL_POLICIES)}, "
                                   f"not {split_prefill!r}")


def _check_started(dropped: list[str], explicit: bool) -> None:
    """A provider that is in this build but failed to start: an error when the caller named it, a logged
    fallback when a device profile preferred it."""
    if not dropped:
        return
    line = f"{dropped[0]} is in this onnxruntime build but did not start (ONNX Runtime went on without it)"
    if explicit:
        raise ProviderError(f"{line}: leave it out of providers, or fix what it needs (its libraries, options)")
    log.warning("%s: falling back to the next provider", line)


def _load_static(path, backend: str, *, threads: int | None, verify: bool, started: float,
                 onnx_only: dict) -> Model:
    """A bundle's TFLite or Core ML model: static shapes, a cache of fixed size, no speculation."""
    from ondevice.bundle import read_bundle

    asked = sorted(k for k, v in onnx_only.items() if v)
    if asked:
        raise InvalidArgumentError(f"{', '.join(asked)}: not available on the {backend} backend (use backend='onnx')")
    bundle = read_bundle(path, verify=verify)
    if backend == "tflite":
        from ondevice.runtimes.tflite import TFLiteBackend

        model = Model(bundle, TFLiteBackend(bundle, threads=threads))
    else:
        from ondevice.runtimes.coreml import CoreMLBackend

        model = Model(bundle, CoreMLBackend(bundle))
    model.max_context = model.backend.max_context  # the cache has a fixed number of slots
    model.load_s = time.perf_counter() - started
    return model


def parse_bytes(size: int | str) -> int:
    """A size in bytes from an int or a string such as "70MB", "1.5GB", "512MiB" (MB = 10^6 bytes)."""
    if isinstance(size, (int, float)):
        return int(size)
    text = str(size).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            text, factor = text[:-len(unit)], scale
            break
    else:
        factor = 1
    try:
        return int(float(text) * factor)
    except ValueError:
        raise InvalidArgumentError(f"cannot read {size!r} as a size: give bytes or a number with KB/MB/GB/MiB"
                                   ) from None


def _flash_layers(bundle, backend, dram_budget, ffn_fraction, ffn_select, threads, providers):
    from ondevice.runtimes.flash_layers import FlashLayers
    from ondevice.runtimes.flash_mlp import DEFAULT_FRACTION, SELECTIONS, FlashMlp

    if not isinstance(bundle.manifest.get("flash"), dict):
        raise BundleError(f"{bundle.path}: a DRAM budget needs the FFN in a flash store; convert with --flash")
    if ffn_select not in SELECTIONS:
        raise InvalidArgumentError(f"ffn_select must be one of {', '.join(SELECTIONS)}, not {ffn_select!r}")
    if ffn_fraction is not None and not (isinstance(ffn_fraction, (int, float)) and 0 < ffn_fraction <= 1):
        raise InvalidArgumentError(f"ffn_fraction must be in (0, 1], not {ffn_fraction!r}")
    mlp = FlashMlp(bundle, parse_bytes(dram_budget), select=ffn_select,
                   fraction=DEFAULT_FRACTION if ffn_fraction is None else ffn_fraction)
    try:
        return FlashLayers(bundle, backend, mlp, threads=threads, providers=providers)
    except BaseException:
        mlp.close()
        raise


def _plan(profile):
    from ondevice.profiles import detect_host, load_profile, plan

    return plan(detect_host() if str(profile) == "host" else load_profile(profile))  # logs each fallback


def _speculator(model: Model, draft, lookup: bool, threads: int | None, verify: bool, threading: str):
    from ondevice.bundle import read_bundle
    from ondevice.runtimes.onnx import OnnxBackend
    from ondevice.speculative import DraftModel, PromptLookup, Speculator

    drafter = None
    if draft is not None:
        try:
            d = read_bundle(draft, verify=verify)
        except BundleError as e:
            raise BundleError(f"the draft: {e}") from e
        mine = model.bundle.manifest.get("files", {}).get(model.bundle.manifest["tokenizer"]["file"], {})
        theirs = d.manifest.get("files", {}).get(d.manifest["tokenizer"]["file"], {})
        if mine.get("sha256") is None or mine.get("sha256") != theirs.get("sha256"):
            raise TokenizerMismatchError(
                f"draft {d.path} has a different tokenizer than {model.bundle.path}: its token ids would "
                "mean other text; convert a draft from the same model family (ondevice convert SRC OUT "
                f"--draft-of {model.bundle.path})")
        drafter = DraftModel(OnnxBackend(d, threads=threads, threading=threading), d.vocab_map())
        _check_draft_vocab(d, drafter, model)
    spec = Speculator(vocab_size=model.backend.vocab_size, draft=drafter,
                      lookup=PromptLookup() if lookup else None)
    # Drafting during verification pays only on separate compute: an NPU target, or cores to spare.
    # On 2 cores both runs take twice as long side by side (a 5-token fp16 verification 26-28 ms ->
    # 53-57 ms, a draft step 9 -> 18-19 ms).
    used = threads or min(os.cpu_count() or 1, 4)
    spec.config.pipeline = (model.backend.providers[0] != "CPUExecutionProvider"
                            or (os.cpu_count() or 1) >= 2 * used)
    return spec


def _check_draft_vocab(draft, drafter, model: Model) -> None:
    """Every token id the draft can propose must be one the target has (the same tokenizer may come
    with more embedding rows in one model than in the other)."""
    proposes = drafter.backend.vocab_size if drafter.vocab_map is None else int(drafter.vocab_map.max()) + 1
    if proposes > model.backend.vocab_size:
        raise DraftMismatchError(
            f"draft {draft.path} proposes token ids up to {proposes - 1} but {model.bundle.path} has "
            f"{model.backend.vocab_size} token ids: use a draft with the target's vocabulary "
            f"(ondevice convert SRC OUT --draft-of {model.bundle.path})")


def convert(source: str | os.PathLike, out: str | os.PathLike, *, quant: str = "q4", block_size: int = 32,
            symmetric: bool = False, max_context: int | None = None, compute: str = "float",
            draft_of: str | os.PathLike | None = None, draft_layers: int | None = None,
            draft_vocab: int | None = None, int8_prefill: bool | str | dict = False,
            split_prefill: int | bool | None = None, force: bool = False, progress: bool = True,
            flash: bool | str = False, flash_predictor: bool = False, trim_layers: int | None = None,
            trim_ffn: int | None = None, trim_heads: int | None = None, trim_vocab: int | None = None,
            target: str | list[str] = "onnx") -> Path:
    """Convert a GGUF file, a Hugging Face folder or a model alias (e.g. "smollm2-135m") into a bundle.

    quant: q4 (default; GGUF 4-bit blocks kept exactly) | q8 | fp16 | fp32; block_size and symmetric
    apply where weights are re-quantized. compute: "float" (exact) or "int8" (faster). The bundle is
    written atomically; an existing one is replaced only with force=True.

    draft_of: a target bundle with the same tokenizer; the source is then trimmed into a small draft
    for speculative decoding, keeping draft_layers decoder layers and draft_vocab LM-head rows.

    int8_prefill: also write the NPU-style int8 prefill graph (static int8 activations calibrated on
    the converter's text, int8 weights, shadow outlier channels in float): True or a preset, "a16w16"
    (default, top-1 close to float) or "a8w8" (plain int8, faster, less exact); load(int8_prefill=True) uses it.

    split_prefill: also write split prefill graphs for chunks of this many tokens (True: 256): linear
    subgraphs for an NPU, attention for the CPU (load(split_prefill=True) runs them).

    flash: also write the FFN weights as a flash store (ffn_flash.bin), one record per neuron (gate
    row, up row, down column) to read on demand under a DRAM budget (ondevice/flash.py): True ("q4",
    exact for 4-bit sources) or "fp16". flash_predictor: also train the low-rank neuron predictors
    (load(ffn_select="predictor")).

    trim_layers / trim_ffn: a smaller model before any exporter: keep that many decoder layers (the
    ones that change the hidden state most on calibration text) / FFN neurons per layer. trim_heads:
    keep that many query heads per layer (a multiple of the KV heads, as many from each group). trim_vocab:
    keep that many tokens (frequent ones, closed under their BPE merges): the tokenizer, embedding and
    head shrink together.

    target: "onnx" (default), or onnx with tflite and/or coreml ("onnx,coreml,tflite"): also write a
    LiteRT model (model.tflite, decode and prefill signatures, exported with litert-torch: pip install
    'ondevice[tflite]'; load(backend="tflite")) and/or a Core ML model (model.mlpackage, stateful KV
    cache, iOS 18 / macOS 15, converted with coremltools: pip install 'ondevice[coreml]';
    load(backend="coreml") on a Mac).
    """
    from ondevice.converters.convert import convert as _convert

    return _convert(source, out, quant=quant, block_size=block_size, symmetric=symmetric,
                    max_context=max_context, compute=compute, draft_of=draft_of, draft_layers=draft_layers,
                    draft_vocab=draft_vocab, int8_prefill=int8_prefill, split_prefill=split_prefill, force=force,
                    progress=progress, flash=flash, flash_predictor=flash_predictor, trim_layers=trim_layers,
                    trim_ffn=trim_ffn, trim_heads=trim_heads, trim_vocab=trim_vocab,
                    target=target)
