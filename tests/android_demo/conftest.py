"""The Android app's code on the host JVM: its C bridge built against the PyPI onnxruntime and
ONNX Runtime 1.17.0 (the app's C API), its Kotlin run by android_demo/host/HostMain.kt.

Needs the Gradle-free toolchain (`bash android_demo/toolchain.sh`). Without it these tests skip,
except under CI (CI=true), where a missing toolchain is a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLCHAIN_ENV = Path(os.environ.get("ANDROID_TOOLCHAIN_HOME", Path.home() / ".cache/android-toolchain")) / "env.sh"
RUNTIMES = ["pypi", "ort117"]


def need_toolchain() -> None:
    if TOOLCHAIN_ENV.is_file() and shutil.which("java") and shutil.which("kotlinc"):
        return
    message = f"no Android toolchain ({TOOLCHAIN_ENV}, java, kotlinc): run bash android_demo/toolchain.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def toolchain_var(name: str) -> str:
    out = subprocess.run(["bash", "-c", f"source {TOOLCHAIN_ENV} && printf %s \"${name}\""],
                         capture_output=True, text=True, check=True)
    return out.stdout


@pytest.fixture(scope="session")
def host_build() -> Path:
    need_toolchain()
    subprocess.run(["bash", str(REPO / "android_demo/build_host.sh")], check=True, capture_output=True, text=True)
    return REPO / "android_demo/build/host"


@pytest.fixture(scope="session")
def android_bundle(smollm2_bundle, tmp_path_factory) -> Path:
    """The real SmolLM2 bundle with its Android graph (ondevice export-android)."""
    from ondevice.converters.export_android import export_android

    path = Path(shutil.copytree(smollm2_bundle, tmp_path_factory.mktemp("android") / "smollm2.bundle"))
    export_android(path)
    return path


@pytest.fixture(scope="session")
def run_host(host_build, tmp_path_factory):
    """run_host(job, runtime='pypi') -> the HostMain report (or {"error": ...} with returncode 3)."""
    stdlib = toolchain_var("KOTLIN_STDLIB")
    folder = tmp_path_factory.mktemp("jobs")

    def run(job: dict, runtime: str = "pypi", expect_error: bool = False) -> dict:
        path = folder / f"job{len(list(folder.iterdir()))}.json"
        path.write_text(json.dumps(job))
        proc = subprocess.run(["java", f"-Djava.library.path={host_build / runtime}", "-cp",
                               f"{host_build / 'app.jar'}:{stdlib}", "dev.ondevice.demo.host.HostMainKt", str(path)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode not in (0, 3) or (proc.returncode == 3) != expect_error:
            raise AssertionError(f"HostMain exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run
