"""Canonical weights -> model.mlpackage: a Core ML ML program (iOS 18 / macOS 15) with a stateful KV cache.

The torch module coremltools converts is `StatefulDecoder`: converters/torch_model.py's blocks with
the KV cache moved into two buffers, which become the Core ML states `k_cache` and `v_cache`
[layers, kv_heads, slots, head_dim]. One prediction runs T tokens (T one of the enumerated chunk
sizes: 1 for decode, larger for prefill and tree verification) at positions position..position+T-1,
writes their keys and values into the states at those slots (slice_update: the cache is never
copied) and returns the logits of row `last`.

Choices that cost nothing and suit the Neural Engine: fp16 compute and fp16 states, static cache
length, enumerated (not ranged) token shapes, an attention mask value fp16 can hold (-1e4, not
-inf), an RMSNorm that cannot overflow fp16 (torch_model.RMSNorm). Weights: q4 = the GGUF source's
own blocks where they are Q4_0/Q4_1/Q8_0/K-quants (repacked into Core ML's per-block shift/scale:
exact up to fp16 rounding, as the ONNX path is exact), else int4 blocks of 32 (coremltools'
per-block linear quantization, symmetric); q8 = int8 per channel; fp16 / fp32 = fp16 (Core ML
computes in fp16 either way).

coremltools runs on Linux only as a converter: `predict` needs macOS. The exact module handed to
coremltools is kept importable so tests can check it against transformers and the ONNX path; the
program's weights (written from the source's blocks, read back) are converters/coreml_weights.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ondevice.converters.canonical import QTensor
from ondevice.converters.coreml_weights import repack_exact, requantize, source_blocks
from ondevice.converters.torch_model import decoder_class
from ondevice.errors import OndeviceError

PACKAGE = "model.mlpackage"
CACHE_LEN = 1024  # KV slots per layer: the Core ML model's context (static shapes)
CHUNKS = (1, 64)  # enumerated token counts per prediction: decode, prefill chunk
MASK_VALUE = -1e4  # exp(-1e4) is 0 in fp16 too; -inf or -1e30 are not fp16-safe on every compute unit

PRECISIONS = {  # --quant -> manifest description (the coremltools settings: coreml_weights.requantize)
    "fp32": {"weights": "float16", "compute": "float16", "exact": False},
    "fp16": {"weights": "float16", "compute": "float16", "exact": False},
    "q8": {"weights": "int8 per channel, symmetric", "compute": "float16", "exact": False},
    "q4": {"weights": "int4 blocks of 32, symmetric (re-quantized from the dequantized source)",
           "compute": "float16", "exact": False, "block_size": 32},
}


def _expected_noise(record: logging.LogRecord) -> bool:
    """False for coremltools' warnings that only say what is known: no Core ML framework off Apple
    platforms (it converts, it cannot predict), and torch newer than its release was tested with
    (this project's tests check the conversion)."""
    message = record.getMessage()
    return not (message.startswith("Failed to load _ML") or "has not been tested with coremltools" in message)


def require_coremltools():
    logging.getLogger("coremltools").addFilter(_expected_noise)
    try:
        import coremltools
    except ImportError as e:
        raise OndeviceError("--target coreml needs coremltools 9 (numpy < 2.4): pip install 'ondevice[coreml]'") from e
    return coremltools


class StatefulDecoder(nn.Module):
    """forward(tokens [1, T] int32, position [1] int32, last [1] int32) -> logits [1, vocab];
    the T tokens' keys and values go to slots position.. of the k_cache / v_cache buffers."""

    def __init__(self, cfg, weights: dict, cache_len: int = CACHE_LEN, mask_value: float = MASK_VALUE):
        super().__init__()
        self.decoder = decoder_class(cfg)(cfg, weights, cache_len, mask_value=mask_value)
        shape = (cfg.num_layers, cfg.num_kv_heads, cache_len, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape))
        self.register_buffer("v_cache", torch.zeros(shape))

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        start = position[0]
        input_pos = start + torch.arange(t, dtype=torch.int32)
        x, rope, biases = self.decoder.embed(tokens, input_pos)
        for i, layer in enumerate(self.decoder.layers):
            x, k, v = layer(x, *rope, *biases, self.k_cache[i:i + 1], self.v_cache[i:i + 1])
            self.k_cache[i:i + 1, :, start:start + t] = k
            self.v_cache[i:i + 1, :, start:start + t] = v
        return self.decoder.logits(x, last)


def prompt_logits(module: StatefulDecoder, ids: list[int]) -> np.ndarray:
    """Logits [T, vocab] at every position of ids from an empty cache, leaving the states alone
    (a prediction returns one row; this is for measuring the module, not part of the export)."""
    d = module.decoder
    x, rope, biases = d.embed(torch.tensor([ids], dtype=torch.int32), torch.arange(len(ids), dtype=torch.int32))
    empty = torch.zeros_like(module.k_cache[:1])
    with torch.no_grad():
        for layer in d.layers:
            x, _, _ = layer(x, *rope, *biases, empty, empty)
        return d.logits(x, torch.arange(len(ids))).float().numpy()


def convert_module(module: StatefulDecoder, chunks=CHUNKS):
    """The traced module as a Core ML ML program (fp16, iOS 18), not compiled: loading it needs macOS."""
    ct = require_coremltools()
    t = max(chunks)
    example = (torch.zeros(1, t, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
               torch.zeros(1, dtype=torch.int32))
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
    shape = tuple(module.k_cache.shape)
    return ct.convert(
        traced,
        inputs=[ct.TensorType("tokens", shape=ct.EnumeratedShapes([(1, c) for c in chunks], default=(1, chunks[0])),
                              dtype=np.int32),
                ct.TensorType("position", shape=(1,), dtype=np.int32),
                ct.TensorType("last", shape=(1,), dtype=np.int32)],
        outputs=[ct.TensorType("logits", dtype=np.float32)],
        states=[ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name)
                for name in ("k_cache", "v_cache")],
        minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
        convert_to="mlprogram", skip_model_load=True)


def export_coreml(cfg, weights: dict, folder: Path, quant: str = "q4", *, context: int | None = None,
                  cache_len: int = CACHE_LEN, chunks=CHUNKS) -> dict:
    """Write folder/model.mlpackage; returns its `backends.coreml` manifest entry. The states hold
    min(cache_len, context) positions: the Core ML model's context."""
    ct = require_coremltools()
    if quant not in PRECISIONS:
        raise ValueError(f"quant must be one of {', '.join(PRECISIONS)} for the Core ML target, not {quant!r}")
    started = time.perf_counter()
    cache_len = min(cache_len, context or cfg.max_context)
    chunks = tuple(sorted({c for c in chunks if c <= cache_len}))
    mlmodel = convert_module(StatefulDecoder(cfg, weights, cache_len), chunks)
    exact = source_blocks(cfg, weights) if quant == "q4" else {}
    if exact:
        mlmodel = repack_exact(mlmodel, exact)
    precision = dict(PRECISIONS[quant])
    linears = 4 * cfg.num_layers + (0 if cfg.tie_embeddings else 1)
    if len(exact) < linears + 1:  # whatever was not repacked (each pass re-serializes the whole program)
        mlmodel = requantize(mlmodel, quant)
    if exact:
        kinds = sorted({b.source for b in exact.values()})
        repacked = sum(name != "decoder_embed_tokens_to_fp16" for name in exact)
        precision.update(weights=f"the source's blocks ({', '.join(kinds)}) as Core ML shift/scale blocks, up to "
                                 f"fp16 rounding of the offsets; {repacked} of {linears} linear weights"
                                 + ("" if repacked == linears else ", the rest int4 blocks of 32 re-quantized"),
                         repacked=sorted(exact))
    mlmodel.short_description = f"{cfg.num_layers}-layer decoder, KV cache in states (ondevice)"
    mlmodel.save(str(folder / PACKAGE))
    shape = [cfg.num_layers, cfg.num_kv_heads, cache_len, cfg.head_dim]
    return {
        "graph": PACKAGE,
        "inputs": {"tokens": f"int32 [1, T], T in {list(chunks)}", "position": "int32 [1]: the first token's position",
                   "last": "int32 [1]: the row whose logits are returned"},
        "outputs": {"logits": "float32 [1, vocab]"},
        "states": {"k_cache": shape, "v_cache": shape},
        "chunks": list(chunks),
        "kv_cache": {"layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                     "layout": "LNSH", "dtype": "float16", "slots": cache_len,
                     "update": "the model writes the T new rows at slots position.. (Core ML states)"},
        "precision": {"quant": quant, **precision},
        "deployment_target": "iOS 18 / macOS 15",
        "export_seconds": round(time.perf_counter() - started, 2),
        "exporter": f"coremltools {ct.__version__}",
    }


class ExportProcess:
    """export_coreml in a child process (`python -m ondevice.converters.export_coreml JOB`), so that it
    overlaps the TFLite export: each is about a minute of mostly single-threaded Python. The weights
    go through an .npz (no pickle) in a temporary folder. result() waits and returns the manifest
    entry; close() stops the child if it still runs and removes the folder."""

    def __init__(self, cfg, weights: dict, folder: Path, quant: str, context: int | None):
        self.tmp = tempfile.TemporaryDirectory(prefix="ondevice-coreml-")
        job = Path(self.tmp.name)
        save_weights(weights, job / "weights.npz")
        (job / "job.json").write_text(json.dumps({"config_class": type(cfg).__name__, "config": cfg.to_dict(),
                                                  "folder": str(folder), "quant": quant, "context": context}))
        self.log = open(job / "log.txt", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "ondevice.converters.export_coreml", str(job)],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def result(self) -> dict:
        code = self.proc.wait()
        job = Path(self.tmp.name)
        if code != 0:
            self.log.flush()
            tail = (job / "log.txt").read_text(errors="replace").strip().splitlines()[-5:]
            raise OndeviceError(f"the Core ML export failed (exit code {code}): " + " | ".join(tail))
        return json.loads((job / "result.json").read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.tmp.cleanup()


def save_weights(weights: dict, path: Path) -> None:
    """Canonical weights as one .npz: float arrays as they are, QTensors as their raw blocks."""
    arrays, quantized = {}, {}
    for i, (name, w) in enumerate(weights.items()):
        arrays[f"w{i}"] = w.blocks if isinstance(w, QTensor) else np.asarray(w)
        quantized[name] = ({"i": i, "kind": w.kind, "shape": list(w.shape), "type_id": w.type_id}
                           if isinstance(w, QTensor) else {"i": i})
    arrays["index"] = np.frombuffer(json.dumps(quantized).encode(), np.uint8)
    np.savez(path, **arrays)


def load_weights(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as npz:
        index = json.loads(npz["index"].tobytes())
        return {name: (QTensor(e["kind"], tuple(e["shape"]), npz[f"w{e['i']}"], e["type_id"]) if "kind" in e
                       else npz[f"w{e['i']}"]) for name, e in index.items()}


def _main(job: Path) -> None:
    from ondevice.converters.arch.gemma3 import Gemma3Config
    from ondevice.converters.arch.llama import LlamaConfig

    spec = json.loads((job / "job.json").read_text())
    config_class = {c.__name__: c for c in (LlamaConfig, Gemma3Config)}[spec["config_class"]]
    config = config_class(**spec["config"])
    entry = export_coreml(config, load_weights(job / "weights.npz"), Path(spec["folder"]), spec["quant"],
                          context=spec["context"])
    (job / "result.json").write_text(json.dumps(entry))


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
