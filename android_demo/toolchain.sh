#!/usr/bin/env bash
# Installs the Gradle-free Android toolchain the app builds with (apt packages, three vendored
# .debs, ONNX Runtime 1.17.1 for Android from npm; ~20 s the first time, ~0.3 s after) from the
# project's shared folder (../shared/android-toolchain beside the repo; ANDROID_TOOLCHAIN_SRC to
# point elsewhere). Where that folder is absent it says so and exits 0: the Android tests then
# skip, except under CI=true, where they fail.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${ANDROID_TOOLCHAIN_SRC:-$REPO/../shared/android-toolchain}"
if [[ ! -f "$SRC/install.sh" ]]; then
  echo "android toolchain: no $SRC/install.sh; the Android app tests will be skipped" >&2
  exit 0
fi
LOG="$(mktemp)"
if ! bash "$SRC/install.sh" >"$LOG" 2>&1; then
  cat "$LOG" >&2
  echo "android toolchain: install failed" >&2
  exit 1
fi
tail -1 "$LOG"
rm -f "$LOG"
