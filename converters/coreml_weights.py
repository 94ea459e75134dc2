"""The weights of a Core ML program: written from a GGUF's own blocks, or read back from a package.

Core ML's `constexpr_blockwise_shift_scale` computes scale * (data - offset) per block, which can hold
GGUF's Q4_0 / Q4_1 / Q8_0 and K-quant blocks as they are (the codes as data, offset = zero point -
min / scale in fp16), so the Core ML target keeps the source's quantization instead of re-quantizing
its dequantized values; and reading the program's weights back lets the exact torch module run
with them on Linux, where Core ML cannot predict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ondevice.converters.canonical import QTensor
from ondevice.converters.quantize import LOSSLESS, Blocks, concat_rows
from ondevice.converters.torch_model import STACKED
from ondevice.errors import OndeviceError


def source_blocks(cfg, weights: dict) -> dict[str, Blocks]:
    """The GGUF blocks behind each linear weight and the embedding, keyed by the Core ML const that
    holds it (coremltools names a torch parameter a.b.c as a_b_c_to_fp16); weights that are not
    losslessly repackable GGUF blocks are left out (they get coremltools' own quantization)."""
    def blocks(*names):
        parts = [weights.get(n) for n in names]
        if not all(isinstance(w, QTensor) and w.kind in LOSSLESS for w in parts):
            return None
        return concat_rows([LOSSLESS[w.kind](w) for w in parts])

    found = {"decoder_embed_tokens": blocks("model.embed_tokens.weight")}
    if not cfg.tie_embeddings and "lm_head.weight" in weights:
        found["decoder_head"] = blocks("lm_head.weight")
    for i in range(cfg.num_layers):
        for param, names in STACKED.items():
            found[f"decoder_layers_{i}_{param}_weight"] = blocks(*(f"model.layers.{i}.{n}.weight" for n in names))
    return {f"{k}_to_fp16": b for k, b in found.items() if b is not None}


def repack_exact(mlmodel, blocks: dict[str, Blocks]):
    """Replace the fp16 consts named in `blocks` with the source's own blocks: Core ML's
    constexpr_blockwise_shift_scale computes scale * (data - offset), so data = the codes, scale =
    the block scale, offset = zero point - min / scale (fp16) reproduces GGUF's Q4_0 / Q4_1 / Q8_0 /
    K-quant blocks up to fp16 rounding, instead of re-quantizing their dequantized values."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager
    from coremltools.models.utils import _apply_graph_pass

    class RepackBlocks(AbstractGraphPass):
        def apply(self, prog):
            @block_context_manager
            def apply_block(block):
                for op in list(block.operations):
                    b = blocks.get(op.outputs[0].name) if op.op_type == "const" else None
                    if b is None:
                        continue
                    data, scale, offset = _shift_scale(b)
                    n, k = b.shape
                    data = data.reshape(n, k).astype(types.np_uint4_dtype if b.bits == 4 else np.uint8)
                    new = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset, before_op=op,
                                                             name=op.name + "_quantized")
                    block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new,
                                                       no_check_var_types=True, force_replace=True)
                    block.remove_ops([op])

            for f in prog.functions.values():
                apply_block(f)

    return _apply_graph_pass(mlmodel, RepackBlocks(), spec_version=9)  # 9: iOS 18


def _shift_scale(b: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks as Core ML's (data, scale, offset): value = scale * (data - offset)."""
    codes = b.codes.copy()
    scale = b.scales.astype(np.float32).copy()
    offset = b.explicit_zero_points().astype(np.float32)
    if b.mins is not None:
        flat = scale == 0  # a constant block: value = min = min * (0 - (-1))
        safe = np.where(flat, 1.0, scale)
        offset = np.where(flat, -1.0, offset - b.mins / safe)
        scale = np.where(flat, b.mins, scale)
        codes[flat] = 0
    return codes, scale.astype(np.float16), offset.astype(np.float16)


def requantize(mlmodel, quant: str):
    """coremltools' own quantization of the fp16 weights left: q4 symmetric int4 blocks of 32, q8 int8
    per channel (other quants: unchanged)."""
    from coremltools.optimize import coreml as cto

    if quant == "q4":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                         block_size=32)
    elif quant == "q8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    else:
        return mlmodel
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))


def package_weights(package: Path, module) -> dict[str, torch.Tensor]:
    """The module's parameters as the Core ML program at `package` holds them (int4 blocks
    decompressed as Core ML does: data x scale; fp16 values as fp32), keyed like module.state_dict().
    Predicting needs macOS, but this reads the exported weights anywhere: run the torch module with
    them to measure what quantization did to the model."""
    from ondevice.converters.export_coreml import require_coremltools

    ct = require_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.utils.load_spec(str(package))
    program = load(spec, spec.specificationVersion, file_weights_dir=str(package / "Data/com.apple.CoreML/weights"))
    values = {}
    for op in program.functions["main"].operations:
        if op.op_type == "constexpr_blockwise_shift_scale":
            data, scale = op.data.val.astype(np.float32), op.scale.val.astype(np.float32)
            per_block = data.shape[-1] // scale.shape[-1]
            offset = 0.0 if op.offset is None else np.repeat(op.offset.val.astype(np.float32), per_block, axis=-1)
            values[op.outputs[0].name] = (data - offset) * np.repeat(scale, per_block, axis=-1)
        elif op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray):
            values[op.outputs[0].name] = op.outputs[0].val.astype(np.float32)
    out = {}
    for name in dict(module.named_parameters()):
        key = name.replace(".", "_") + "_to_fp16"  # coremltools' name for a torch parameter
        found = values.get(key + "_quantized", values.get(key))
        if found is None:
            raise OndeviceError(f"{package}: no weight for {name} in the Core ML program")
        out[name] = torch.from_numpy(np.ascontiguousarray(found))
    return out
