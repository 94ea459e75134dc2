#!/usr/bin/env bash
# The app's code on the host JVM: the same C bridge (jni/ondevice_bridge.c) built for x86_64
# against (a) the PyPI onnxruntime wheel's libonnxruntime.so and (b) ONNX Runtime 1.17.0 (C API 17,
# like the app's Android 1.17.1), and the app's Kotlin (src/, minus the Activity) + host/ as one jar.
#   bash android_demo/build_host.sh          -> android_demo/build/host/{app.jar,pypi/,ort117/}
# Run: java -Djava.library.path=build/host/pypi -cp build/host/app.jar:$KOTLIN_STDLIB \
#        dev.ondevice.demo.host.HostMainKt job.json      (tests/android_demo/ do this)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
ENV_SH="${ANDROID_TOOLCHAIN_HOME:-$HOME/.cache/android-toolchain}/env.sh"
[[ -f "$ENV_SH" ]] || { echo "no Android toolchain: run bash android_demo/toolchain.sh first" >&2; exit 1; }
# shellcheck disable=SC1090
source "$ENV_SH"
B="$HERE/build/host"
rm -rf "$B"; mkdir -p "$B"
JAVA_HOME="${JAVA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v javac)")")")}"

# bridge NAME LIBONNXRUNTIME: libondevice.so against that runtime, in $B/NAME/
bridge() {
  local d="$B/$1" lib="$2"
  mkdir -p "$d/ortlib"
  # wheels and npm ship libonnxruntime.so.1.N.M while the SONAME is libonnxruntime.so.1
  local soname; soname="$(llvm-readelf -d "$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')"
  ln -sf "$lib" "$d/ortlib/${soname:-libonnxruntime.so.1}"
  cc -O2 -Wall -Wextra -Werror -fPIC -shared -I"$JAVA_HOME/include" -I"$JAVA_HOME/include/linux" -I"$ORT_INCLUDE" \
    -o "$d/libondevice.so" jni/ondevice_bridge.c "$d/ortlib/${soname:-libonnxruntime.so.1}" -ldl -Wl,-rpath,"$d/ortlib"
  echo "$1: $lib"
}

PYPI_CAPI="$(python3 -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')"
bridge pypi "$(ls "$PYPI_CAPI"/libonnxruntime.so.* | head -1)"

N="$ANDROID_TOOLCHAIN_HOME/host-ort/onnxruntime-node-1.17.0"
ORT117="$N/package/bin/napi-v3/linux/x64/libonnxruntime.so.1.17.0"
if [[ ! -f "$ORT117" ]]; then  # PyPI's 1.17 wheels export no C API; the npm package ships the .so
  rm -rf "$N"; mkdir -p "$N"
  (cd "$N" && npm pack --silent onnxruntime-node@1.17.0 >/dev/null \
    && tar -xzf onnxruntime-node-1.17.0.tgz package/bin/napi-v3/linux/x64/libonnxruntime.so.1.17.0 package/package.json \
    && rm -f onnxruntime-node-1.17.0.tgz)
fi
bridge ort117 "$ORT117"

mapfile -t SOURCES < <(ls src/dev/ondevice/demo/*.kt host/*.kt)
kotlinc -nowarn -no-reflect -jvm-target 1.6 -d "$B/app.jar" "${SOURCES[@]}" 2>&1 | grep -v 'Xverify:none' || true
[[ -f "$B/app.jar" ]] || { echo "kotlinc failed" >&2; exit 1; }
echo "$KOTLIN_STDLIB" > "$B/kotlin_stdlib.path"
echo "host build ready: $B"
