"""The Android app's code on the host JVM: its C bridge built against the PyPI onnxruntime and
ONNX Runtime 1.17.0 (the app's C API), its Kotlin run by android_demo/host/HostMain.kt.

Needs the Gradle-free toolchain (`bash android_demo/toolchain.sh`). Without it the tests that use
it skip, except under CI (CI=true), where a missing toolchain is a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLCHAIN_ENV = Path(os.environ.get("ANDROID_TOOLCHAIN_HOME", Path.home() / ".cache/android-toolchain")) / "env.sh"
HOST_BUILD = REPO / "android_demo/build/host"


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


def build_host() -> Path:
    need_toolchain()
    subprocess.run(["bash", str(REPO / "android_demo/build_host.sh")], check=True, capture_output=True, text=True)
    return HOST_BUILD


class HostRunner:
    """runner(job, runtime='pypi') -> the HostMain report (or {"error": ...} with expect_error)."""

    def __init__(self, build: Path, folder: Path):
        self.build, self.folder, self.stdlib = build, folder, toolchain_var("KOTLIN_STDLIB")

    def __call__(self, job: dict, runtime: str = "pypi", expect_error: bool = False) -> dict:
        path = self.folder / f"job{len(list(self.folder.iterdir()))}.json"
        path.write_text(json.dumps(job))
        proc = subprocess.run(["java", f"-Djava.library.path={self.build / runtime}", "-cp",
                               f"{self.build / 'app.jar'}:{self.stdlib}", "dev.ondevice.demo.host.HostMainKt", str(path)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode not in (0, 3) or (proc.returncode == 3) != expect_error:
            raise AssertionError(f"HostMain exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
