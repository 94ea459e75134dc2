"""Checkpoint -> canonical weights -> quantize -> ONNX graph -> bundle, in one atomic step."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from ondevice.bundle import MANIFEST, ORIGINAL_IDS, VOCAB_MAP, atomic_bundle_dir, read_bundle, sha256_file, write_manifest
from ondevice.converters import int8_prefill as int8
from ondevice.converters.arch import get_architecture
from ondevice.converters.canonical import Checkpoint, check_shapes
from ondevice.converters.export_onnx import GraphBuilder
from ondevice.converters.quantize import QuantSpec
from ondevice.converters.sources import read_source, resolve_source
from ondevice.converters.trim import DEFAULT_VOCAB, Draft, make_draft, trim_model, trim_vocab
from ondevice.errors import SourceFormatError, TokenizerMismatchError, UnsupportedArchitectureError

CONVERTER_VERSION = "0.1.0"
# Tokens that end an assistant turn in common chat formats; used as extra stop ids when present.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "</s>")
COMPUTE_ACCURACY_LEVEL = {"float": 0, "int8": 4}  # -> MatMulNBits accuracy_level
DEFAULT_SPLIT_CHUNK = 256  # split prefill graphs' chunk: mllm-NPU's choice
MAX_CONTEXT = 1 << 20  # tokens: the rope tables of a longer context would not fit a phone (or the converter)
GENERATION_DEFAULTS = {"temperature": 0.2, "top_k": 0, "top_p": 0.9, "min_p": 0.0,
                       "repetition_penalty": 1.0, "max_tokens": 256}


def convert(source: str | Path, out: str | Path, *, quant: str = "q4", block_size: int = 32,
            symmetric: bool = False, max_context: int | None = None, compute: str = "float",
            draft_of: str | Path | None = None, draft_layers: int | None = None, draft_vocab: int | None = None,
            split_prefill: int | bool | None = None, int8_prefill: bool | str | dict = False, force: bool = False,
            progress: bool = True, flash: bool | str = False, flash_predictor: bool = False,
            trim_layers: int | None = None, trim_ffn: int | None = None, trim_heads: int | None = None,
            trim_vocab: int | None = None,
            target: str | list[str] = "onnx") -> Path:
    """Convert a GGUF file or Hugging Face folder (or a model alias) into an ONNX bundle at `out`.

    compute: "float" (exact: greedy output equals a float reference on the same weights) or "int8"
    (MatMulNBits quantizes activations to int8, as llama.cpp and onnxruntime-genai do: faster, not exact).

    draft_of: a target bundle; the source (same tokenizer) is trimmed into a draft for speculative
    decoding: draft_layers decoder layers stay (default all), those that change the hidden state
    most on calibration text, and draft_vocab LM-head rows (default 16384; at least the vocabulary
    size keeps the whole head), the most frequent tokens, listed in vocab_map.i32.

    split_prefill: also write the prefill split into per-layer linear graphs (an NPU's share, static
    chunk shapes) and one attention graph (the CPU's), for chunks of this many tokens (True: 256);
    their weights are the one-shot graph's bytes, not stored again (converters/split_prefill.py).

    int8_prefill: also write prefill_int8.onnx, the NPU-style prefill graph (static int8
    activations calibrated on the shipped text, int8 weights, shadow outliers in float; see
    converters/int8_prefill.py): True (the a16w16 preset), a preset name (a16w16, a16w8, a8w8) or a
    dict of make_plan's options (ratio, act_bits, weight_bits, headroom, migrate) and the chunk size.

    flash: also write the FFN weights as a flash store (ffn_flash.bin, one record per neuron, read on
    demand under a DRAM budget; converters/flash.py): True ("q4", exact for 4-bit sources) or "fp16".
    flash_predictor: with flash, also train LLM in a flash's low-rank neuron predictor per layer on
    the calibration text (converters/sparsity.py; about a minute for SmolLM2) for load(ffn_select=
    "predictor").
    trim_layers / trim_ffn: the trimming pass before any exporter (converters/trim.py): keep that many
    decoder layers (chosen on calibration text) / FFN neurons per layer (whole 32-neuron groups).
    trim_heads: keep that many query heads per layer (a multiple of the KV heads, as many per group).
    trim_vocab: keep that many tokens (embedding and head rows, and the tokenizer itself, renumbered;
    the original ids of the kept tokens are stored in the bundle).
    target: "onnx" (default), or onnx with tflite and/or coreml: also write model.tflite
    (converters/export_tflite.py, needs litert-torch) / model.mlpackage (converters/export_coreml.py,
    needs coremltools); their weight precision follows quant.
    """
    if compute not in COMPUTE_ACCURACY_LEVEL:
        raise ValueError(f"compute must be one of {', '.join(COMPUTE_ACCURACY_LEVEL)}, not {compute!r}")
    if draft_of is None and (draft_layers is not None or draft_vocab is not None):
        raise ValueError("draft_layers and draft_vocab trim a draft: they need draft_of (the target bundle)")
    if (draft_layers is not None and draft_layers < 1) or (draft_vocab is not None and draft_vocab < 1):
        raise ValueError("draft_layers and draft_vocab must be positive")
    spec = QuantSpec(quant, block_size, symmetric)
    started = time.perf_counter()
    draft = None if draft_of is None else {"of": draft_of, "layers": draft_layers,
                                           "vocab": DEFAULT_VOCAB if draft_vocab is None else draft_vocab}
    split = DEFAULT_SPLIT_CHUNK if split_prefill is True else (int(split_prefill) if split_prefill else None)
    if split is not None and split < 1:
        raise ValueError("split_prefill must be a positive chunk size (tokens)")
    int8_opts = int8.options(int8_prefill)
    flash = "q4" if flash is True else (flash or None)
    if flash is not None and flash not in ("q4", "fp16"):
        raise ValueError(f"flash must be True, 'q4' or 'fp16', not {flash!r}")
    if any(n is not None and n < 1 for n in (trim_layers, trim_ffn, trim_heads, trim_vocab)):
        raise ValueError("trim_layers, trim_ffn, trim_heads and trim_vocab must be positive")
    trim = {k: v for k, v in (("layers", trim_layers), ("ffn", trim_ffn), ("heads", trim_heads),
                              ("vocab", trim_vocab)) if v is not None}
    if flash_predictor and flash is None:
        raise ValueError("flash_predictor trains the neuron predictor of a flash store: it needs flash")
    targets = _targets(target)
    others = [t for t in targets if t != "onnx"]
    if others and draft:
        raise ValueError(f"drafts run on the ONNX backend: convert a draft without the {others[0]} target")
    if "android" in targets and flash is not None:
        raise ValueError("the Android graph has no flash-store variant: convert it without --flash")
    if "tflite" in targets:  # before any work: a missing exporter should not cost a conversion
        from ondevice.converters.export_tflite import require_litert_torch

        require_litert_torch()
    if "coreml" in targets:
        from ondevice.converters.export_coreml import require_coremltools

        require_coremltools()
    with tqdm(total=4 + bool(draft) + (int8_opts is not None) + len(others), desc="convert",
              disable=not progress, unit="step") as steps:
        return _convert(source, out, spec, max_context, compute, force, steps, started, draft, split, int8_opts,
                        flash, flash_predictor, trim, targets)


TARGETS = ("onnx", "tflite", "coreml", "android")


def _targets(target: str | list[str]) -> list[str]:
    names = [t.strip() for t in (target.split(",") if isinstance(target, str) else target) if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target {', '.join(unknown)} (targets: {', '.join(TARGETS)})")
    if "onnx" not in names:
        raise ValueError("every bundle carries the ONNX graph: give onnx among the targets (e.g. onnx,tflite)")
    return names


def _convert(source, out, spec: QuantSpec, max_context, compute, force, steps, started, draft_opts,
             split_chunk: int | None = None, int8_opts: dict | None = None, flash: str | None = None,
             flash_predictor: bool = False, trim: dict | None = None, targets: list[str] = ("onnx",)) -> Path:
    quant = spec.mode
    accuracy_level = COMPUTE_ACCURACY_LEVEL[compute]
    path = resolve_source(source)

    steps.set_postfix_str(f"reading {path.name}")
    ckpt = read_source(path)
    arch = get_architecture(ckpt.architecture)
    _check_options(arch, ckpt.architecture, draft_of=draft_opts, split_prefill=split_chunk, int8_prefill=int8_opts,
                   flash=flash, **{f"trim_{k}": v for k, v in (trim or {}).items()})
    fmt = ckpt.provenance["format"]
    cfg = (arch.config_from_gguf if fmt == "gguf" else arch.config_from_hf)(ckpt.metadata, ckpt.weights)
    if fmt == "gguf":  # the tensors the metadata implies, before anything is reshaped by its sizes
        check_shapes(ckpt.weights, arch.gguf_shapes(cfg))
    if "tflite" in targets or "coreml" in targets:
        from ondevice.converters.torch_model import decoder_class

        decoder_class(cfg)  # architectures without a torch module fail here, before any export
    weights = (arch.canonical_from_gguf if fmt == "gguf" else arch.canonical_from_hf)(ckpt.weights, cfg)
    context = min(max_context or cfg.max_context, cfg.max_context)
    if context > MAX_CONTEXT:
        raise SourceFormatError(f"{path.name}: a context of {context} tokens is more than a bundle holds (at most "
                                f"{MAX_CONTEXT}: the graph carries rope tables of that many rows); convert with "
                                "a smaller max_context (--max-context)")
    trim_record, original_ids = None, None
    if trim:
        steps.set_postfix_str("trimming")
        trim = dict(trim)
        vocab = trim.pop("vocab", None)
        weights, cfg, trim_record = trim_model(weights, cfg, ckpt.tokenizer_json, **trim)
        if vocab is not None and vocab < cfg.vocab_size:
            ckpt, weights, cfg, original_ids = _trim_vocab(ckpt, weights, cfg, vocab)
            trim_record.update(vocab_size=cfg.vocab_size, original_ids=ORIGINAL_IDS)
    steps.update()
    draft: Draft | None = None
    if draft_opts:
        target = _draft_target(draft_opts["of"], ckpt, cfg, path)
        steps.set_postfix_str("calibrating the draft")
        special = _special_ids(ckpt)
        draft = make_draft(weights, cfg, ckpt.tokenizer_json, [special["bos_token_id"], *special["eos_token_ids"]],
                           layers=draft_opts["layers"], vocab=draft_opts["vocab"])
        source_layers, (weights, cfg) = cfg.num_layers, (draft.weights, draft.cfg)
        steps.update()

    with atomic_bundle_dir(out, force=force) as tmp, contextlib.ExitStack() as workers:
        coreml = _start_coreml(targets, cfg, weights, tmp, quant, context, workers)
        steps.set_postfix_str(f"quantizing ({quant}) and building the graph")
        g = GraphBuilder(f"{ckpt.architecture}-{quant}", accuracy_level=accuracy_level)
        quant_record = arch.build(g, cfg, weights, spec, context)
        steps.update()
        steps.set_postfix_str("writing the graph")
        graph_file, data_file = g.save(tmp)
        split = _split_prefill(arch, cfg, weights, spec, context, split_chunk, accuracy_level, tmp, graph_file,
                               data_file) if split_chunk else None
        steps.update()
        (tmp / "tokenizer.json").write_text(ckpt.tokenizer_json, encoding="utf-8")
        prefill_int8 = None
        if int8_opts is not None:
            steps.set_postfix_str("calibrating and building the int8 prefill graph")
            opts = dict(int8_opts)
            chunk = int(opts.pop("chunk", int8.CHUNK_SIZE))
            plan = int8.make_plan(weights, cfg, ckpt.tokenizer_json, **opts)
            g8 = int8.Int8GraphBuilder(f"{ckpt.architecture}-prefill-int8", plan, accuracy_level=accuracy_level)
            arch.build(g8, cfg, weights, spec, context)
            graph8, data8 = g8.save(tmp, int8.GRAPH_STEM)
            prefill_int8 = {"graph": graph8, "data": data8, "inputs": g8.signature["inputs"],
                            "outputs": g8.signature["outputs"], "chunk_sizes": [chunk],
                            "quantization": plan.summary()}
            steps.update()
        manifest = {
            "converter": {"name": "ondevice", "version": CONVERTER_VERSION},
            "source": ckpt.provenance,
            "architecture": ckpt.architecture,
            "config": cfg.to_dict(),
            "max_context": context,
            "quantization": {"mode": spec.mode, "block_size": spec.block_size, "symmetric": spec.symmetric,
                             "compute": compute, "accuracy_level": accuracy_level, "tensors": quant_record},
            "backends": {"onnx": {
                "graph": graph_file, "data": data_file,
                "inputs": g.signature["inputs"], "outputs": g.signature["outputs"],
                "kv_cache": {"layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
                             "head_dim": cfg.head_dim, "layout": "BNSH", "dtype": "float32",
                             "shared_past_present": True},
                **({"split_prefill": split} if split else {}),
            }},
            "tokenizer": {"file": "tokenizer.json",
                          "chat_template": ckpt.chat_template or getattr(arch, "DEFAULT_CHAT_TEMPLATE", None),
                          **_special_ids(ckpt)},
            "generation": dict(GENERATION_DEFAULTS),
        }
        if "tflite" in targets:
            from ondevice.converters.export_tflite import export_tflite

            steps.set_postfix_str("exporting the TFLite model (litert-torch)")
            manifest["backends"]["tflite"] = export_tflite(cfg, weights, tmp, quant, context=context)
            steps.update()
        if coreml is not None:
            steps.set_postfix_str("exporting the Core ML model (coremltools)")
            manifest["backends"]["coreml"] = coreml.result()
            steps.update()
        if prefill_int8 is not None:  # same signature and KV layout as the graph above
            manifest["backends"]["onnx"]["prefill_int8"] = prefill_int8
        if flash is not None:  # the FFN as a flash store; the weights outside it are the resident part
            from ondevice.converters.flash import resident_weight_bytes, write_flash_store
            from ondevice.converters.sparsity import for_bundle as predictors_for_bundle
            from ondevice.converters.sparsity import selection_entry

            steps.set_postfix_str("writing the flash store")
            manifest["flash"] = write_flash_store(weights, cfg.num_layers, tmp, flash)
            _, ffn = resident_weight_bytes(g.initializers)
            layered, resident = _flash_graphs(arch, cfg, weights, spec, context, accuracy_level, tmp, graph_file)
            manifest["backends"]["onnx"]["flash_graphs"] = layered
            manifest["flash"].update(graph_resident_bytes=resident, graph_ffn_bytes=ffn,
                                     resident_bytes=resident + manifest["flash"]["tables_bytes"])
            steps.set_postfix_str("calibrating the neuron selection")
            manifest["flash"]["selection"] = selection_entry(weights, cfg, ckpt.tokenizer_json)
            if flash_predictor:
                steps.set_postfix_str("training the neuron predictors")
                manifest["flash"]["predictor"] = predictors_for_bundle(tmp, weights, cfg, ckpt.tokenizer_json)
        if draft is not None:
            manifest["draft"] = {"target": target, "source_layers": source_layers,
                                 "layers_kept": draft.layers_kept, "layer_scores": draft.layer_scores,
                                 "vocab_kept": cfg.vocab_size if draft.vocab_map is None else len(draft.vocab_map),
                                 "calibration": draft.calibration}
            if draft.vocab_map is not None:
                draft.vocab_map.astype("<i4").tofile(tmp / VOCAB_MAP)
                manifest["vocab_map"] = {"file": VOCAB_MAP, "size": len(draft.vocab_map)}
        if trim_record is not None:
            manifest["trim"] = trim_record
        if original_ids is not None:
            original_ids.astype("<i4").tofile(tmp / ORIGINAL_IDS)
        manifest["conversion_seconds"] = round(time.perf_counter() - started, 2)
        write_manifest(tmp, manifest)
        if "android" in targets:  # the ONNX graph rewritten for the app's ONNX Runtime 1.17
            from ondevice.converters.export_android import export_android
            export_android(tmp)
        steps.update()
    return Path(out)


def _start_coreml(targets, cfg, weights, folder: Path, quant: str, context: int,
                  workers: contextlib.ExitStack):
    """The Core ML export (converters/export_coreml.py), to collect with .result(). Next to the TFLite
    export it runs in a child process: each takes about a minute of mostly single-threaded Python,
    so on two cores they overlap."""
    if "coreml" not in targets:
        return None
    from ondevice.converters.export_coreml import ExportProcess, export_coreml

    if "tflite" not in targets:
        done: Future = Future()
        done.set_result(export_coreml(cfg, weights, folder, quant, context=context))
        return done
    process = ExportProcess(cfg, weights, folder, quant, context)
    workers.callback(process.close)
    return process


def _trim_vocab(ckpt: Checkpoint, weights, cfg, size: int):
    """Keep `size` tokens: the tokenizer, its special ids, the embedding and head rows, renumbered."""
    special = _special_ids(ckpt)
    weights, cfg, tokenizer_json, keep = trim_vocab(weights, cfg, ckpt.tokenizer_json,
                                                    [special["bos_token_id"], *special["eos_token_ids"]], size)
    new_id = {int(old): new for new, old in enumerate(keep)}
    tokens = {k: (new_id.get(v) if k.endswith("_token_id") and isinstance(v, int) else v)
              for k, v in ckpt.special_tokens.items()}
    return dataclasses.replace(ckpt, tokenizer_json=tokenizer_json, special_tokens=tokens), weights, cfg, keep


def _check_options(arch, name: str, **requested) -> None:
    """Options an architecture's graph does not provide yet (its UNSUPPORTED_OPTIONS) fail up front."""
    asked = [k for k in getattr(arch, "UNSUPPORTED_OPTIONS", ()) if requested.get(k)]
    if asked:
        raise UnsupportedArchitectureError(f"{', '.join(asked)}: not supported for architecture {name!r} yet")


def _flash_graphs(arch, cfg, weights, spec, context, accuracy_level, folder, graph_file) -> tuple[dict, int]:
    """The decoder cut at its MLPs (converters/flash_graphs.py), for running with the FFN in the store;
    and the bytes of their weights (the resident part: all but the FFN's up and down projections)."""
    from ondevice.converters import flash_graphs

    graphs = flash_graphs.build_flash_graphs(arch, cfg, weights, spec, context, accuracy_level)
    sizes = {t.name: len(t.raw_data) if t.raw_data else int(np.prod(t.dims or [1])) * 4
             for g in graphs.values() for t in g.initializers}  # before saving moves the bytes out
    files, shared = flash_graphs.save_flash_graphs(graphs, folder, graph_file)
    return ({"embed": files["embed"], "head": files["head"], "shared_weight_bytes": shared,
             "layers": [files[f"layer.{i}"] for i in range(cfg.num_layers)]}, sum(sizes.values()))


def _split_prefill(arch, cfg, weights, spec, context, chunk, accuracy_level, folder, graph_file, data_file) -> dict:
    from ondevice.converters import split_prefill

    graphs = split_prefill.build_split_graphs(arch, cfg, weights, spec, context, chunk, accuracy_level)
    files, shared = split_prefill.save_split_graphs(graphs, folder, graph_file)
    return split_prefill.manifest_entry(graphs, files, chunk, cfg.num_layers, data_file, shared)


def _draft_target(target_path: str | Path, ckpt: Checkpoint, cfg, source: Path) -> dict:
    """The manifest record of the target a draft is made for; the draft must share its tokenizer."""
    target = read_bundle(target_path)
    tok_file = target.manifest["tokenizer"].get("file", "tokenizer.json")
    theirs = target.manifest["files"].get(tok_file, {}).get("sha256")
    ours = hashlib.sha256(ckpt.tokenizer_json.encode("utf-8")).hexdigest()
    if ours != theirs:
        raise TokenizerMismatchError(
            f"{source.name} has a different tokenizer from the target bundle {target_path} (tokenizer.json "
            f"sha256 {ours[:12]}… vs {str(theirs)[:12]}…): a draft must use its target's token ids; "
            "make the draft from a checkpoint of the same model family")
    if int(target.config["vocab_size"]) != cfg.vocab_size:
        raise TokenizerMismatchError(
            f"the target bundle {target_path} has {target.config['vocab_size']} token ids, {source.name} has "
            f"{cfg.vocab_size}: a draft needs the same vocabulary")
    src = target.manifest.get("source", {})
    return {"manifest_sha256": sha256_file(target.path / MANIFEST), "source_sha256": src.get("sha256"),
            "source_name": src.get("name"), "tokenizer_sha256": theirs, "vocab_size": cfg.vocab_size}


def _special_ids(ckpt: Checkpoint) -> dict:
    tok = Tokenizer.from_str(ckpt.tokenizer_json)
    special = ckpt.special_tokens

    def token_id(kind: str) -> int | None:
        if isinstance(special.get(f"{kind}_token_id"), int):
            return special[f"{kind}_token_id"]
        name = special.get(f"{kind}_token")
        return tok.token_to_id(name) if isinstance(name, str) else None

    bos, eos = token_id("bos"), token_id("eos")
    if eos is None:
        raise SourceFormatError("the checkpoint names no end-of-sequence token")
    special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    # only special tokens: in Gemma's vocabulary "</s>" is ordinary text (HTML strike-through)
    stops = [eos] + [i for t in _END_OF_TURN if (i := tok.token_to_id(t)) in special_ids and i != eos]
    return {"bos_token_id": bos, "eos_token_ids": stops,
            "add_bos_token": bool(special.get("add_bos_token", False)),
            "vocab_size": tok.get_vocab_size()}
