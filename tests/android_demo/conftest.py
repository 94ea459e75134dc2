"""The real SmolLM2 bundle with its Android graph, for the app's host tests (tests/android_host.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def android_bundle(smollm2_bundle, tmp_path_factory) -> Path:
    """The real SmolLM2 bundle with its Android graph (ondevice export-android)."""
    from ondevice.converters.export_android import export_android

    path = Path(shutil.copytree(smollm2_bundle, tmp_path_factory.mktemp("android") / "smollm2.bundle"))
    export_android(path)
    return path
