"""The signed arm64 APK builds with the Gradle-free toolchain and passes its checks
(android_demo/build_apk.sh: apksigner verify, zipalign, aapt badging, dex classes and native
methods, every packed .so AArch64 with its NEEDED entries packed or Android system libraries,
the bridge's imports resolved and its JNI names exported)."""

import subprocess
import zipfile

from android_host import REPO, need_toolchain


def test_the_apk_builds_signed_and_checked_with_the_bridge_and_onnx_runtime_inside():
    need_toolchain()
    proc = subprocess.run(["bash", str(REPO / "android_demo/build_apk.sh")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "APK CHECKS PASSED" in proc.stdout
    report = (REPO / "android_demo/build/apk/apk_report.txt").read_text()
    assert "package: name='dev.ondevice.demo'" in report
    assert "launchable-activity: name='dev.ondevice.demo.MainActivity'" in report
    assert "native-code: 'arm64-v8a'" in report
    assert "Verified using v2 scheme (APK Signature Scheme v2): true" in report
    names = zipfile.ZipFile(REPO / "android_demo/build/ondevice-demo.apk").namelist()
    assert {"lib/arm64-v8a/libondevice.so", "lib/arm64-v8a/libonnxruntime.so", "classes.dex"} <= set(names)
    assert "assets/profiles/generic-arm64-cpu.json" in names
