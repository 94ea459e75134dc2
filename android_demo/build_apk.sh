#!/usr/bin/env bash
# Builds the Android demo APK with the Gradle-free toolchain (shared/android-toolchain, no Gradle,
# no SDK/NDK download), then checks it. Steps (as in shared/android-toolchain/hello/build.sh):
#   1. jni/ondevice_bridge.c -> lib/arm64-v8a/libondevice.so (clang --target=aarch64-linux-android24,
#      lld, sysroot-lite), linked against ONNX Runtime 1.17.1's libonnxruntime.so, which is packed too
#   2. aapt resources + R.java; kotlinc 1.3 of src/dev/ondevice/demo/*.kt + app/*.kt against android.jar
#   3. ProGuard (shrink only) app + kotlin-stdlib -> dx -> classes.dex
#   4. aapt package (manifest, res, assets: profiles/*.json and, with BUNDLE=dir, that bundle under
#      assets/bundle/ stored uncompressed) + dex + native libs -> zipalign -> apksigner (debug key)
#   5. checks; any failure stops the script: apksigner verify (v2+v3), zipalign -c, aapt badging,
#      dexdump (MainActivity, NativeBridge, its methods NATIVE and exported by the bridge),
#      llvm-readelf/llvm-nm on every packed .so (AArch64, NEEDED resolvable, bridge: no TEXTREL,
#      16 KiB LOAD alignment, every undefined symbol defined by libonnxruntime.so or a system-lib stub)
# Output: android_demo/build/ondevice-demo.apk and build/apk/apk_report.txt; prints "APK CHECKS PASSED".
#
# Env: BUNDLE=path/to/x.bundle  ship that bundle in the APK (the app copies it to filesDir/bundle)
#      ANDROID_TOOLCHAIN_HOME     toolchain prefix (default ~/.cache/android-toolchain)
#      WERROR=0                   do not turn C warnings of the bridge into errors
#      SHRINK=0                   dex the whole kotlin-stdlib instead of shrinking it with ProGuard
#      DEMO_KT_SRC=dir, BRIDGE_C=file  development overrides of the library sources
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"   # android_demo/
REPO="$(dirname "$HERE")"
cd "$HERE"

ENV_SH="${ANDROID_TOOLCHAIN_HOME:-$HOME/.cache/android-toolchain}/env.sh"
if [[ -z "${ANDROID_JAR:-}" ]]; then
  [[ -f "$ENV_SH" ]] || { echo "Android toolchain not found ($ENV_SH): run  bash android_demo/toolchain.sh  first" >&2; exit 1; }
  # shellcheck disable=SC1090
  source "$ENV_SH"
fi
for v in ANDROID_JAR DX ORT_SO ORT_INCLUDE KOTLIN_STDLIB ANDROID_SYSROOT_LITE ANDROID_CFLAGS ANDROID_LDFLAGS ANDROID_LDLIBS; do
  [[ -n "${!v:-}" ]] || { echo "toolchain env lacks \$$v: run  bash android_demo/toolchain.sh  (or source its env.sh)" >&2; exit 1; }
done
for f in "$ANDROID_JAR" "$DX" "$ORT_SO" "$KOTLIN_STDLIB"; do
  [[ -e "$f" ]] || { echo "toolchain file missing: $f (run  bash android_demo/toolchain.sh)" >&2; exit 1; }
done
for t in clang aapt zipalign apksigner dexdump kotlinc javac proguard keytool llvm-readelf llvm-nm unzip; do
  command -v "$t" >/dev/null || { echo "tool not found: $t (run  bash android_demo/toolchain.sh)" >&2; exit 1; }
done

KT_SRC="${DEMO_KT_SRC:-$HERE/src/dev/ondevice/demo}"
BRIDGE_C="${BRIDGE_C:-$HERE/jni/ondevice_bridge.c}"
PKG=dev.ondevice.demo
PKG_PATH=dev/ondevice/demo
MIN_SDK=24; TARGET_SDK=24
B="$HERE/build/apk"  # build/host is build_host.sh's
APK="$HERE/build/ondevice-demo.apk"
LIBDIR=lib/arm64-v8a
STUBS="$ANDROID_SYSROOT_LITE/lib/aarch64-linux-android"

step() { printf '\n== %s (t=%ss)\n' "$*" "$SECONDS"; }
fail() { echo "CHECK FAILED: $*" >&2; exit 1; }
ok() { echo "ok: $*"; echo "ok: $*" >> "$B/checks.txt"; }

shopt -s nullglob
KT_FILES=("$KT_SRC"/*.kt "$HERE"/app/*.kt)
shopt -u nullglob
[[ -f "$BRIDGE_C" ]] || fail "no JNI bridge source $BRIDGE_C"
[[ -f "$HERE/app/MainActivity.kt" ]] || fail "no app/MainActivity.kt"
[[ "${#KT_FILES[@]}" -gt 1 ]] || fail "no Kotlin sources in $KT_SRC"

if [[ -n "${BUNDLE:-}" ]]; then
  BUNDLE="$(cd "$BUNDLE" && pwd)" || fail "BUNDLE=$BUNDLE is not a directory"
  [[ -f "$BUNDLE/manifest.json" ]] || fail "BUNDLE=$BUNDLE has no manifest.json"
  python3 - "$BUNDLE/manifest.json" <<'PY' || fail "BUNDLE=$BUNDLE: manifest.json has no backends.android (export the bundle for Android first)"
import json, sys
sys.exit(0 if "android" in json.load(open(sys.argv[1])).get("backends", {}) else 1)
PY
fi

rm -rf "$B"; mkdir -p "$B"/{obj,gen,classes,dex,apk/$LIBDIR,assets/profiles,check}

step "native: libondevice.so for arm64-v8a ($ANDROID_CLANG_TARGET, lld, sysroot-lite)"
LDLIBS="$ANDROID_LDLIBS"
[[ " $LDLIBS " == *" -ldl "* ]] || LDLIBS="$LDLIBS -ldl"   # the stub libdl (dlopen/dlsym)
WFLAGS=(-Wall -Wextra); [[ "${WERROR:-1}" == 1 ]] && WFLAGS+=(-Werror)
# shellcheck disable=SC2086
clang $ANDROID_CFLAGS -O2 "${WFLAGS[@]}" -I"$ORT_INCLUDE" -I"$(dirname "$BRIDGE_C")" -c "$BRIDGE_C" -o "$B/obj/ondevice_bridge.o"
# shellcheck disable=SC2086
clang $ANDROID_LDFLAGS -Wl,-soname,libondevice.so -o "$B/apk/$LIBDIR/libondevice.so" \
  "$B/obj/ondevice_bridge.o" "$ORT_SO" $LDLIBS
cp "$ORT_SO" "$B/apk/$LIBDIR/libonnxruntime.so"
ls -l "$B/apk/$LIBDIR"

step "aapt: resources + R.java"
aapt package -f -m -J "$B/gen" -M AndroidManifest.xml -S res -I "$ANDROID_JAR" \
  --min-sdk-version $MIN_SDK --target-sdk-version $TARGET_SDK

step "javac R.java, kotlinc 1.3 of ${#KT_FILES[@]} files (against android.jar, no JDK)"
mapfile -t RJAVA < <(find "$B/gen" -name '*.java')
javac -nowarn --release 8 -cp "$ANDROID_JAR" -d "$B/classes" "${RJAVA[@]}"
printf '  %s\n' "${KT_FILES[@]#"$REPO"/}"
if ! kotlinc -no-jdk -no-reflect -jvm-target 1.6 -cp "$ANDROID_JAR:$B/classes" -d "$B/classes" \
    "${KT_FILES[@]}" >"$B/kotlinc.log" 2>&1; then
  grep -v 'Xverify:none' "$B/kotlinc.log" >&2 || true
  fail "kotlinc"
fi
grep -v 'Xverify:none' "$B/kotlinc.log" || true
for c in MainActivity NativeBridge; do
  [[ -f "$B/classes/$PKG_PATH/$c.class" ]] || fail "kotlinc produced no $c.class"
done

if [[ "${SHRINK:-1}" == 1 ]]; then
  step "proguard (shrink only): app classes + kotlin-stdlib -> app.jar"
  proguard -injars "$B/classes" -injars "$KOTLIN_STDLIB(!META-INF/**)" -outjars "$B/app.jar" \
    -libraryjars "$ANDROID_JAR" @proguard-rules.pro >"$B/proguard.log" 2>&1 || { cat "$B/proguard.log"; fail proguard; }
  DEX_IN=("$B/app.jar")
else
  DEX_IN=("$B/classes" "$KOTLIN_STDLIB")
fi
step "dx -> classes.dex"
"$DX" --dex --min-sdk-version=$MIN_SDK --output="$B/dex/classes.dex" "${DEX_IN[@]}"
ls -l "$B/dex/classes.dex"

step "assets: profiles${BUNDLE:+ + bundle $BUNDLE}"
for p in "$REPO"/profiles/*.json; do
  [[ "$(basename "$p")" == schema.json ]] && continue   # the profile format's JSON schema, not a device
  cp "$p" "$B/assets/profiles/"
done
ls "$B/assets/profiles"
[[ -n "$(ls "$B/assets/profiles")" ]] || fail "no profiles/*.json in $REPO/profiles"
NOCOMP=()
if [[ -n "${BUNDLE:-}" ]]; then
  mkdir -p "$B/assets/bundle"
  # hard links when on the same file system (the bundle can be hundreds of MB), else a copy
  cp -al "$BUNDLE"/. "$B/assets/bundle/" 2>/dev/null || { rm -rf "$B/assets/bundle"; cp -a "$BUNDLE" "$B/assets/bundle"; }
  # aapt skips hidden names (.*): leftovers such as a half-written .manifest.* are not bundle content
  find "$B/assets/bundle" -mindepth 1 -name '.*' -prune -print -exec rm -rf {} +
  du -sh "$B/assets/bundle"
  # ONNX Runtime mmaps the graph's external data: store every entry of this package step
  # uncompressed (aapt: -0 "" = no compression at all), so no bundle file is deflated
  NOCOMP=(-0 "")
fi

step "aapt package + add dex and native libs"
aapt package -f -M AndroidManifest.xml -S res -A "$B/assets" -I "$ANDROID_JAR" "${NOCOMP[@]}" \
  --min-sdk-version $MIN_SDK --target-sdk-version $TARGET_SDK -F "$B/unaligned.apk"
(cd "$B/dex" && aapt add -v "$B/unaligned.apk" classes.dex >/dev/null)
(cd "$B/apk" && aapt add -v "$B/unaligned.apk" $LIBDIR/libondevice.so $LIBDIR/libonnxruntime.so >/dev/null)

step "zipalign + apksigner (debug key)"
zipalign -f -p 4 "$B/unaligned.apk" "$B/aligned.apk"
KS="$ANDROID_TOOLCHAIN_HOME/debug.keystore"
if [[ ! -f "$KS" ]]; then
  keytool -genkeypair -keystore "$KS" -storepass android -keypass android -alias androiddebugkey \
    -keyalg RSA -keysize 2048 -validity 10000 -dname "CN=Android Debug,O=Android,C=US" >/dev/null 2>&1
fi
apksigner sign --ks "$KS" --ks-pass pass:android --ks-key-alias androiddebugkey \
  --min-sdk-version $MIN_SDK --out "$APK" "$B/aligned.apk"
rm -f "$B/unaligned.apk" "$B/aligned.apk"

step "verify"
# (outputs go to files/variables first: grep -q on a pipe + pipefail gives false failures)
apksigner verify --verbose --min-sdk-version $MIN_SDK "$APK" > "$B/apksigner_verify.txt" 2>&1 \
  || { cat "$B/apksigner_verify.txt"; fail "apksigner verify"; }
grep -v '^WARNING' "$B/apksigner_verify.txt" | grep -E '^Verifies|v[123]' || true
grep -qx 'Verifies' "$B/apksigner_verify.txt" || fail "apksigner: no 'Verifies'"
grep -q 'Verified using v2 scheme (APK Signature Scheme v2): true' "$B/apksigner_verify.txt" || fail "apksigner: not v2-signed"
grep -q 'Verified using v3 scheme (APK Signature Scheme v3): true' "$B/apksigner_verify.txt" || fail "apksigner: not v3-signed"
ok "apksigner verify: Verifies, v2 + v3 signatures"

zipalign -c -p 4 "$APK" || fail "zipalign -c"
ok "zipalign -c -p 4"

aapt dump badging "$APK" > "$B/badging_full.txt" || fail "aapt dump badging"
grep -E "^(package|sdkVersion|targetSdkVersion|application-label|launchable-activity|native-code):" \
  "$B/badging_full.txt" | tee "$B/badging.txt"
BADGING="$(cat "$B/badging.txt")"
[[ "$BADGING" == *"package: name='$PKG'"* ]] || fail "badging: package is not $PKG"
[[ "$BADGING" == *"sdkVersion:'$MIN_SDK'"* ]] || fail "badging: sdkVersion is not $MIN_SDK"
[[ "$BADGING" == *"targetSdkVersion:'$TARGET_SDK'"* ]] || fail "badging: targetSdkVersion is not $TARGET_SDK"
[[ "$BADGING" == *"launchable-activity: name='$PKG.MainActivity'"* ]] || fail "badging: launchable activity is not $PKG.MainActivity"
[[ "$BADGING" == *"native-code: 'arm64-v8a'"* ]] || fail "badging: native-code is not exactly 'arm64-v8a'"
[[ "$BADGING" == *"application-label:'ondevice'"* ]] || fail "badging: label is not 'ondevice'"
ok "badging: package $PKG, sdkVersion/targetSdkVersion $MIN_SDK/$TARGET_SDK, launchable $PKG.MainActivity, native-code arm64-v8a"

unzip -o -q "$APK" classes.dex -d "$B/check"
dexdump "$B/check/classes.dex" > "$B/dexdump.txt"
for c in MainActivity NativeBridge; do
  grep -q "Class descriptor  : 'L$PKG_PATH/$c;'" "$B/dexdump.txt" || fail "dex lacks $PKG.$c"
  ok "dex has $PKG.$c"
done
# methods of NativeBridge: "name access" pairs; every method but the constructors must be NATIVE
awk -v cls="L$PKG_PATH/NativeBridge;" '
  /Class descriptor/ { inside = index($0, "\x27" cls "\x27") > 0; methods = 0 }
  /^  (Direct|Virtual) methods/ { methods = 1 }
  /^  (Static|Instance) fields/ { methods = 0 }
  inside && methods && /^ +name +: / { n = $0; sub(/^[^\x27]*\x27/, "", n); sub(/\x27.*$/, "", n) }
  inside && /^ +access +: / && n != "" { print n, ($0 ~ /NATIVE/ ? "NATIVE" : "java"); n = "" }
' "$B/dexdump.txt" > "$B/nativebridge_methods.txt"
NATIVE_METHODS="$(awk '$2 == "NATIVE" { print $1 }' "$B/nativebridge_methods.txt" | sort -u)"
[[ -n "$NATIVE_METHODS" ]] || fail "NativeBridge has no NATIVE method in the dex"
NON_NATIVE="$(awk '$2 != "NATIVE" && $1 != "<init>" && $1 != "<clinit>" { print $1 }' "$B/nativebridge_methods.txt" | sort -u)"
[[ -z "$NON_NATIVE" ]] || fail "NativeBridge methods that are not NATIVE: $(echo $NON_NATIVE)"
ok "NativeBridge methods all NATIVE: $(echo $NATIVE_METHODS)"

# every NEEDED of every packed .so must be packed too or be an Android system (NDK public) library
SYSTEM_LIBS="libc.so libm.so libdl.so liblog.so libandroid.so libz.so libjnigraphics.so libEGL.so libGLESv2.so libGLESv3.so libOpenSLES.so libmediandk.so libneuralnetworks.so libvulkan.so libnativewindow.so libstdc++.so"
unzip -Z1 "$APK" "$LIBDIR/*" > "$B/packed_libs.txt"
PACKED="$(xargs -n1 basename < "$B/packed_libs.txt")"
[[ "$(unzip -Z1 "$APK" 'lib/*' | wc -l)" == "$(wc -l < "$B/packed_libs.txt")" ]] || fail "native libs outside $LIBDIR"
for so in $PACKED; do
  unzip -o -q "$APK" "$LIBDIR/$so" -d "$B/check"
  f="$B/check/$LIBDIR/$so"
  [[ "$(llvm-readelf -h "$f")" == *"Machine:"*"AArch64"* ]] || fail "$so is not AArch64"
  for n in $(llvm-readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    if grep -qx "$n" <<<"$PACKED"; then where=packed
    elif [[ " $SYSTEM_LIBS " == *" $n "* ]]; then where=system
    else fail "$so NEEDED $n: not packed and not an Android system library"; fi
    echo "$so (AArch64) NEEDED $n -> $where"
  done
done
ok "packed libs AArch64, every NEEDED packed or an Android system lib: $(echo $PACKED)"
BR="$B/check/$LIBDIR/libondevice.so"
ORT="$B/check/$LIBDIR/libonnxruntime.so"
[[ -f "$BR" && -f "$ORT" ]] || fail "libondevice.so and libonnxruntime.so must both be packed"
llvm-readelf -d "$BR" > "$B/bridge_dyn.txt"; llvm-readelf -lW "$BR" > "$B/bridge_phdr.txt"
grep -E 'NEEDED|SONAME' "$B/bridge_dyn.txt"
grep -q '(SONAME).*\[libondevice.so\]' "$B/bridge_dyn.txt" || fail "bridge SONAME is not libondevice.so"
grep -q '(NEEDED).*\[libonnxruntime.so\]' "$B/bridge_dyn.txt" || fail "bridge does not link libonnxruntime.so"
! grep -qE 'TEXTREL|\(FLAGS\).*TEXTREL' "$B/bridge_dyn.txt" || fail "bridge has text relocations"
grep -qE '\(GNU_HASH\)' "$B/bridge_dyn.txt" && grep -qE '\(HASH\)' "$B/bridge_dyn.txt" || fail "bridge lacks DT_HASH/DT_GNU_HASH"
grep -E '^\s*GNU_STACK' "$B/bridge_phdr.txt" | grep -q ' RW ' || fail "bridge stack not RW (non-exec)"
ALIGNS="$(grep -E '^\s*LOAD' "$B/bridge_phdr.txt" | awk '{print $NF}' | sort -u)"
[[ "$ALIGNS" == 0x4000 ]] || fail "bridge LOAD segments not all 16 KiB aligned: $(echo $ALIGNS)"
ok "libondevice.so: SONAME libondevice.so, NEEDED libonnxruntime.so, no TEXTREL, DT_HASH+DT_GNU_HASH, non-exec stack, 16 KiB-aligned LOAD segments"

# every undefined symbol of the bridge is defined by libonnxruntime.so or by a system-lib stub
llvm-nm -D --undefined-only "$BR" | awk '{print $NF}' | sed 's/@.*//' | sort -u > "$B/undef.txt"
llvm-nm -D --defined-only "$ORT" | awk '{print $NF}' | sed 's/@.*//' | sort -u > "$B/ort_defined.txt"
: > "$B/stub_defined.txt"
for s in "$STUBS"/*.so; do
  llvm-nm -D --defined-only "$s" | awk -v lib="$(basename "$s")" '{print $NF, lib}' >> "$B/stub_defined.txt"
done
[[ -s "$B/stub_defined.txt" ]] || fail "no system-lib stubs in $STUBS"
while read -r s; do
  [[ -n "$s" ]] || continue
  if grep -qx "$s" "$B/ort_defined.txt"; then echo "undef $s -> libonnxruntime.so"
  elif lib="$(awk -v s="$s" '$1 == s { print $2; exit }' "$B/stub_defined.txt")" && [[ -n "$lib" ]]; then
    echo "undef $s -> $lib (system)"
  else fail "bridge's undefined symbol $s is defined neither by libonnxruntime.so nor by a system-lib stub"; fi
done < "$B/undef.txt"
grep -qx 'OrtGetApiBase' "$B/undef.txt" || fail "bridge does not import OrtGetApiBase"
ok "all $(wc -l < "$B/undef.txt") undefined symbols of libondevice.so resolved (libonnxruntime.so or a system-lib stub)"

# every native method of NativeBridge is exported by the bridge (or registered in JNI_OnLoad)
llvm-nm -D --defined-only "$BR" | awk '{print $NF}' > "$B/bridge_exports.txt"
if grep -q '^Java_' "$B/bridge_exports.txt"; then
  for m in $NATIVE_METHODS; do
    sym="Java_${PKG//./_}_NativeBridge_${m//_/_1}"
    grep -qE "^${sym}(__.*)?\$" "$B/bridge_exports.txt" || fail "NativeBridge.$m is native but libondevice.so exports no $sym"
  done
  ok "libondevice.so exports a Java_* symbol for each of the $(wc -w <<<"$NATIVE_METHODS") NativeBridge native methods"
elif grep -qx JNI_OnLoad "$B/bridge_exports.txt"; then
  echo "bridge exports no Java_* symbols: natives are registered in JNI_OnLoad (RegisterNatives), not checked here"
else
  fail "bridge exports neither Java_* symbols nor JNI_OnLoad"
fi

# assets: the profiles, and the bundle complete and stored uncompressed
unzip -Z1 "$APK" 'assets/*' > "$B/assets_list.txt" || true
grep -q '^assets/profiles/generic-arm64-cpu.json$' "$B/assets_list.txt" || fail "assets lack profiles/generic-arm64-cpu.json"
ok "assets/profiles: $(grep -c '^assets/profiles/' "$B/assets_list.txt") device profiles"
if [[ -n "${BUNDLE:-}" ]]; then
  (cd "$B/assets" && find bundle -type f | sed 's|^|assets/|' | sort) > "$B/bundle_expected.txt"
  grep '^assets/bundle/' "$B/assets_list.txt" | sort > "$B/bundle_packed.txt" || true
  MISSING="$(comm -23 "$B/bundle_expected.txt" "$B/bundle_packed.txt")"
  [[ -z "$MISSING" ]] || fail "bundle files aapt left out of the APK (hidden or ignored names?): $(echo $MISSING)"
  unzip -v "$APK" 'assets/bundle/*' > "$B/bundle_methods.txt"
  DEFLATED="$(awk '$8 ~ /^assets\/bundle\// && $2 != "Stored" { print $8 }' "$B/bundle_methods.txt")"
  [[ -z "$DEFLATED" ]] || fail "bundle files stored compressed: $(echo $DEFLATED)"
  ok "assets/bundle: all $(wc -l < "$B/bundle_packed.txt") files of the bundle packed, all stored uncompressed"
fi

step "report"
SIZE="$(stat -c %s "$APK")"
{
  echo "ondevice Android demo APK report ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  echo
  echo "APK: android_demo/build/$(basename "$APK")"
  echo "size: $SIZE bytes ($(awk -v s="$SIZE" 'BEGIN { printf "%.1f MiB", s / 1048576 }'))"
  echo "sha256: $(sha256sum "$APK" | cut -d' ' -f1)"
  echo "bundle in assets: ${BUNDLE:-none}"
  echo
  echo "== aapt dump badging"
  cat "$B/badging.txt"
  echo
  echo "== native libs (unzip -l)"
  unzip -l "$APK" "$LIBDIR/*" | grep "$LIBDIR/"
  echo
  echo "== NativeBridge native methods"
  echo "$NATIVE_METHODS"
  echo
  echo "== checks"
  cat "$B/checks.txt"
  echo
  echo "== apksigner verify --verbose"
  grep -v '^WARNING' "$B/apksigner_verify.txt" || true
  echo
  echo "== assets"
  sed 's/^/  /' "$B/assets_list.txt" | head -40
  echo
  echo "classes.dex: $(stat -c %s "$B/check/classes.dex") bytes"
  echo "build + checks: ${SECONDS}s"
} > "$B/apk_report.txt"
cat "$B/apk_report.txt"
echo
echo "APK CHECKS PASSED in ${SECONDS}s: $APK ($SIZE bytes)"
