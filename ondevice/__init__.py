"""ondevice: run LLMs on phones and laptops.

    import ondevice
    ondevice.convert("smollm2-135m", "smollm2.bundle")
    model = ondevice.load("smollm2.bundle")
    print(model.generate("What is the capital of France?").text)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ondevice.engine import Generation, Model
from ondevice.errors import (BundleError, BundleExistsError, ChatTemplateError, ContextOverflowError,
                             ModelNotFoundError, OndeviceError, SourceFormatError,
                             UnsupportedArchitectureError)

__version__ = "0.1.0"
__all__ = ["load", "convert", "Model", "Generation", "OndeviceError", "BundleError", "BundleExistsError",
           "ChatTemplateError", "ContextOverflowError", "ModelNotFoundError", "SourceFormatError",
           "UnsupportedArchitectureError"]


def load(path: str | os.PathLike, *, threads: int | None = None, verify: bool = True,
         providers: list[str] | None = None) -> Model:
    """Open a bundle: check it (sha256 of every file unless verify=False) and create the session once."""
    from ondevice.bundle import read_bundle
    from ondevice.runtimes.onnx import OnnxBackend

    started = time.perf_counter()
    bundle = read_bundle(path, verify=verify)
    backend = OnnxBackend(bundle, threads=threads, providers=providers)
    return Model(bundle, backend, load_s=time.perf_counter() - started)


def convert(source: str | os.PathLike, out: str | os.PathLike, **options) -> Path:
    """Convert a GGUF file, a Hugging Face folder or a model alias into a bundle (see `ondevice convert -h`)."""
    from ondevice.converters.convert import convert as _convert

    return _convert(source, out, **options)
