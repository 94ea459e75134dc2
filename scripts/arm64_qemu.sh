#!/usr/bin/env bash
# The Python runtime on ARM64 Linux under qemu-user, greedy tokens compared with the host (x86_64).
#
#   sudo scripts/arm64_qemu.sh [BUNDLE] [N_TOKENS]
#
# 1. host packages (qemu-user-static, binfmt-support, debootstrap) if missing; the qemu-aarch64
#    binfmt handler registered (flag F, so the chroot needs no qemu binary of its own);
# 2. a Debian bookworm arm64 rootfs made with debootstrap, once, in $ARM64_ROOTFS
#    (default ~/.cache/ondevice-arm64/rootfs), with python3 + venv;
# 3. a venv in the chroot (/opt/venv) with only what ondevice.load + generate import (numpy,
#    onnxruntime, tokenizers, jinja2, pinned to the host venv's versions), and this repo installed
#    into it with `pip install --no-deps` from a copy of the working tree (reinstalled only when the
#    tree changed);
# 4. the same Python snippet on the host and in the chroot: ondevice.load(BUNDLE), greedy
#    (temperature 0) generation of N tokens for a chat prompt and a raw prompt, JSON out;
# 5. prompt and generated token ids compared: exit 1 if they differ.
#
# BUNDLE defaults to $ARM64_CACHE/smollm2.bundle, converted on the host with the host venv's
# `ondevice convert smollm2-135m` when it does not exist. N_TOKENS defaults to $ARM64_TOKENS or 16.
# Only /proc is mounted in the chroot (mounting /sys as well made onnxruntime segfault there); the
# bundle is bind-mounted read-only at /mnt/bundle. Both are unmounted on exit.
#
# Environment: ARM64_CACHE (~/.cache/ondevice-arm64), ARM64_ROOTFS ($ARM64_CACHE/rootfs),
# ARM64_OUT ($ARM64_CACHE/results: host.json, arm64.json), ARM64_TOKENS (16), HOST_PYTHON (the
# repo's .venv/bin/python, else python3), DEBIAN_MIRROR (http://deb.debian.org/debian),
# ARM64_THREADS (unset: the runtime's default on both sides).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${ARM64_CACHE:-$HOME/.cache/ondevice-arm64}
ROOTFS=${ARM64_ROOTFS:-$CACHE/rootfs}
OUT=${ARM64_OUT:-$CACHE/results}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
BUNDLE=${1:-}
N_TOKENS=${2:-${ARM64_TOKENS:-16}}
THREADS=${ARM64_THREADS:-}
if [[ -z ${HOST_PYTHON:-} ]]; then
  if [[ -x $REPO/.venv/bin/python ]]; then HOST_PYTHON=$REPO/.venv/bin/python; else HOST_PYTHON=python3; fi
fi
# What the runtime path (ondevice.load + generate) imports, of pyproject's base dependencies;
# onnx, gguf and tqdm are the converter's.
RUNTIME_DEPS=(numpy onnxruntime tokenizers jinja2)

die() { echo "arm64_qemu: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "needs root (apt-get, debootstrap, mount, chroot): run it with sudo"
[[ $N_TOKENS =~ ^[1-9][0-9]*$ ]] || die "N_TOKENS must be a positive integer, not '$N_TOKENS'"

now() { date +%s.%N; }
STAGES=()
T_STAGE=0
STAGE_NAME=
stage() { STAGE_NAME=$1; T_STAGE=$(now); echo; echo "== $1"; }
stage_done() {  # stage_done [note]
  local dt; dt=$(awk -v a="$T_STAGE" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')
  STAGES+=("$(printf '%-34s %8s s  %s' "$STAGE_NAME" "$dt" "${1:-}")")
  echo "-- $STAGE_NAME: ${dt} s ${1:+($1)}"
}
T_ALL=$(now)

mkdir -p "$CACHE" "$OUT"
exec 9>"$CACHE/.lock"
flock -n 9 || die "another arm64_qemu.sh holds $CACHE/.lock"

# -- mounts, undone on any exit ---------------------------------------------------------------
MOUNTS=()
cleanup() {
  local i m
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    m=${MOUNTS[i]}
    if mountpoint -q "$m"; then umount "$m" 2>/dev/null || umount -l "$m" || echo "arm64_qemu: could not unmount $m" >&2; fi
  done
  MOUNTS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mount_proc() {
  mountpoint -q "$ROOTFS/proc" || { mount -t proc proc "$ROOTFS/proc"; MOUNTS+=("$ROOTFS/proc"); }
}
in_chroot() {  # a clean environment: no host PIP_* settings or paths leak in
  chroot "$ROOTFS" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ondevice-host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
    PIP_NO_INPUT=1 "$@"
}

# -- 1. host packages and binfmt ------------------------------------------------------------------
stage "host packages + binfmt"
missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [[ ! -e /proc/sys/fs/binfmt_misc/register ]]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc (a container without the privilege?)"
fi
if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
  update-binfmts --enable qemu-aarch64 || update-binfmts --import qemu-aarch64
fi
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "the qemu-aarch64 binfmt handler is not enabled"
grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 ||
  die "the qemu-aarch64 binfmt handler lacks flag F (fix binary): a chroot could not find the interpreter"
stage_done "${missing[*]:-nothing to install}"

# -- 2. rootfs -----------------------------------------------------------------------------------
stage "rootfs (debootstrap arm64 $SUITE)"
if [[ -f $ROOTFS/.ondevice-rootfs-ok ]]; then
  stage_done "reused $ROOTFS"
else
  partial=$ROOTFS.partial
  for m in dev/pts dev proc sys; do  # a debootstrap that was interrupted may leave these mounted
    if mountpoint -q "$partial/$m" 2>/dev/null; then umount -l "$partial/$m"; fi
  done
  rm -rf "$partial"
  mkdir -p "$(dirname "$ROOTFS")"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$partial" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  rm -f "$partial"/var/cache/apt/archives/*.deb  # ~40 MB of downloaded packages, already installed
  [[ ! -e $ROOTFS ]] || rm -rf "$ROOTFS"
  mv "$partial" "$ROOTFS"
  touch "$ROOTFS/.ondevice-rootfs-ok"
  stage_done "built $ROOTFS"
fi
# DNS and the host's CA bundle (pip may go through a TLS-intercepting proxy the host trusts)
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
cp -L "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$ROOTFS/etc/ondevice-host-ca.crt"
mount_proc
[[ $(in_chroot uname -m) == aarch64 ]] || die "uname -m in the chroot is not aarch64"
if ! in_chroot python3 -c 'import ensurepip, venv' 2>/dev/null; then  # an older rootfs without them
  stage "python3 + venv in the rootfs (apt)"
  in_chroot apt-get update -qq
  in_chroot env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
  stage_done
fi

# -- 3. venv with the runtime's deps, and the repo -------------------------------------------------
stage "venv + runtime deps (pip, in chroot)"
# the host venv's versions of the runtime deps (same code on both sides), else pyproject's specifiers
mapfile -t REQS < <("$HOST_PYTHON" - "$REPO/pyproject.toml" "${RUNTIME_DEPS[@]}" <<'EOF'
import re, sys, tomllib
from importlib import metadata
specs = {}
for dep in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower()
    specs[name] = dep.split(";")[0].strip()
for name in sys.argv[2:]:
    if name not in specs:
        sys.exit(f"{name} is not a base dependency in pyproject.toml")
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(specs[name])
EOF
)
((${#REQS[@]} == ${#RUNTIME_DEPS[@]})) || die "could not read the runtime deps from pyproject.toml"
REQS+=("setuptools>=68")  # to build the repo without build isolation
want="${REQS[*]}"
if [[ -x $ROOTFS/opt/venv/bin/python && $(cat "$ROOTFS/opt/venv/.ondevice-reqs" 2>/dev/null) == "$want" ]]; then
  stage_done "reused /opt/venv: $want"
else
  rm -rf "$ROOTFS/opt/venv"
  in_chroot python3 -m venv /opt/venv
  in_chroot /opt/venv/bin/pip install -q --only-binary=:all: "${REQS[@]}"
  echo "$want" >"$ROOTFS/opt/venv/.ondevice-reqs"
  stage_done "$want"
fi

stage "repo -> chroot (pip install --no-deps)"
# The working tree (tracked and untracked files, .gitignore honoured), not a commit: what is being edited.
SRC=$ROOTFS/opt/ondevice-src
tree_files() {  # NUL-separated, sorted; files deleted in the tree are left out
  (cd "$REPO" && git ls-files -co --exclude-standard -z | sort -z |
    while IFS= read -r -d '' f; do if [[ -f $f ]]; then printf '%s\0' "$f"; fi; done)
}
tree_hash=$(tree_files | (cd "$REPO" && xargs -0 sha256sum) | sha256sum | cut -c1-16)
if [[ $(cat "$ROOTFS/opt/venv/.ondevice-src" 2>/dev/null) == "$tree_hash" ]]; then
  stage_done "reused (working tree $tree_hash unchanged)"
else
  rm -rf "$SRC"
  mkdir -p "$SRC"
  tree_files | tar -C "$REPO" --null -T - -cf - | tar -C "$SRC" -xf -
  in_chroot sh -c 'cd /opt/ondevice-src && pip install -q --no-deps --no-build-isolation .'
  rm -rf "$SRC"  # installed into site-packages; the copy is not needed any more
  echo "$tree_hash" >"$ROOTFS/opt/venv/.ondevice-src"
  stage_done "working tree $tree_hash"
fi
ROOTFS_SIZE=$(du -sxh "$ROOTFS" | cut -f1)  # before the bundle is bind-mounted; du -x skips /proc
VENV_SIZE=$(du -sxh "$ROOTFS/opt/venv" | cut -f1)

# -- 4. bundle -----------------------------------------------------------------------------------
if [[ -z $BUNDLE ]]; then
  BUNDLE=$CACHE/smollm2.bundle
  if [[ ! -f $BUNDLE/manifest.json ]]; then
    stage "convert smollm2-135m (host)"
    HOST_BIN=$(dirname "$HOST_PYTHON")
    if [[ -x $HOST_BIN/ondevice ]]; then "$HOST_BIN/ondevice" convert smollm2-135m "$BUNDLE" --force
    else "$HOST_PYTHON" -m ondevice.cli convert smollm2-135m "$BUNDLE" --force; fi
    stage_done "$BUNDLE"
  fi
fi
BUNDLE=$(cd "$BUNDLE" && pwd)
[[ -f $BUNDLE/manifest.json ]] || die "$BUNDLE is not a bundle (no manifest.json)"
mkdir -p "$ROOTFS/mnt/bundle"
if ! mountpoint -q "$ROOTFS/mnt/bundle"; then
  mount --bind "$BUNDLE" "$ROOTFS/mnt/bundle"
  MOUNTS+=("$ROOTFS/mnt/bundle")
  mount -o remount,bind,ro "$ROOTFS/mnt/bundle"
fi

# -- 5. the same snippet on both sides ------------------------------------------------------------------
SNIPPET=$(cat <<'EOF'
import json, platform, sys, time
t0 = time.perf_counter()
import numpy, onnxruntime, tokenizers
import ondevice
import_s = time.perf_counter() - t0
bundle, n, threads = sys.argv[1], int(sys.argv[2]), (int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else None)
model = ondevice.load(bundle, threads=threads)
PROMPTS = [
    {"name": "chat", "prompt": "What is the capital of France? Answer in one sentence.", "raw": False},
    {"name": "raw", "prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "raw": True},
]
runs = []
for p in PROMPTS:
    t = time.perf_counter()
    # ignore_eos: always n tokens, so both sides are compared over the same length
    g = model.generate(p["prompt"], max_tokens=n, temperature=0, raw=p["raw"], ignore_eos=True)
    runs.append({**p, "prompt_ids": model.encode_prompt(p["prompt"], raw=p["raw"]), "token_ids": g.token_ids,
                 "text": g.text, "finish_reason": g.finish_reason, "prefill_s": round(g.prefill_s, 4),
                 "ttft_s": round(g.ttft_s, 4), "decode_s": round(g.decode_s, 4),
                 "decode_tok_s": round(g.decode_tok_s, 3), "total_s": round(time.perf_counter() - t, 4)})
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                  "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__,
                  "tokenizers": tokenizers.__version__, "providers": list(model.backend.providers),
                  "n_tokens": n, "import_s": round(import_s, 3), "load_s": round(model.load_s, 3),
                  "generate_s": round(sum(r["total_s"] for r in runs), 3), "runs": runs}, indent=1))
EOF
)
printf '%s\n' "$SNIPPET" >"$ROOTFS/opt/parity_snippet.py"
printf '%s\n' "$SNIPPET" >"$OUT/parity_snippet.py"  # run from /, so a source tree in the cwd is not imported

stage "host run ($(uname -m))"
T_HOST=$(now)
(cd / && "$HOST_PYTHON" "$OUT/parity_snippet.py" "$BUNDLE" "$N_TOKENS" "$THREADS") >"$OUT/host.json"
HOST_S=$(awk -v a="$T_HOST" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')
stage_done "$OUT/host.json"

stage "qemu run (aarch64 chroot)"
T_QEMU=$(now)
in_chroot /opt/venv/bin/python /opt/parity_snippet.py /mnt/bundle "$N_TOKENS" "$THREADS" >"$OUT/arm64.json"
QEMU_S=$(awk -v a="$T_QEMU" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')
stage_done "$OUT/arm64.json"
cleanup

# -- 6. compare ----------------------------------------------------------------------------------
echo
echo "== stages"
printf '%s\n' "${STAGES[@]}"
echo "rootfs $ROOTFS: $ROOTFS_SIZE (venv $VENV_SIZE); total $(awk -v a="$T_ALL" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}') s"
"$HOST_PYTHON" - "$OUT/host.json" "$OUT/arm64.json" "$HOST_S" "$QEMU_S" <<'EOF'
import json, sys
host, arm = (json.load(open(p)) for p in sys.argv[1:3])
host_s, qemu_s = float(sys.argv[3]), float(sys.argv[4])
if arm["machine"] != "aarch64":
    sys.exit(f"ARM64 GREEDY PARITY: the chroot ran on {arm['machine']!r}, not aarch64")
print()
for side in (host, arm):
    print(f"{side['machine']:8s} python {side['python']} numpy {side['numpy']} onnxruntime {side['onnxruntime']} "
          f"tokenizers {side['tokenizers']} {side['providers']}: import {side['import_s']} s, load {side['load_s']} s, "
          f"generate {side['generate_s']} s")
ok = True
for h, a in zip(host["runs"], arm["runs"]):
    same_prompt, same_out = h["prompt_ids"] == a["prompt_ids"], h["token_ids"] == a["token_ids"]
    ok &= same_prompt and same_out
    print(f"\n[{h['name']}] {len(h['prompt_ids'])} prompt tokens {'equal' if same_prompt else 'DIFFER'}; "
          f"{len(h['token_ids'])} generated tokens {'equal' if same_out else 'DIFFER'}")
    print(f"  prefill  {h['prefill_s']:.3f} s x86_64 | {a['prefill_s']:.3f} s aarch64 (x{a['prefill_s'] / max(h['prefill_s'], 1e-9):.0f})")
    print(f"  decode   {h['decode_tok_s']:.1f} tok/s x86_64 | {a['decode_tok_s']:.2f} tok/s aarch64 "
          f"(x{h['decode_tok_s'] / max(a['decode_tok_s'], 1e-9):.0f} slower)")
    print(f"  x86_64:  {h['token_ids']} {h['text']!r}")
    if not same_out or not same_prompt:
        print(f"  aarch64: {a['token_ids']} {a['text']!r}")
        ids_h, ids_a = (h["prompt_ids"], a["prompt_ids"]) if not same_prompt else (h["token_ids"], a["token_ids"])
        i = next((i for i, (x, y) in enumerate(zip(ids_h, ids_a)) if x != y), min(len(ids_h), len(ids_a)))
        print(f"  first difference at {'prompt' if not same_prompt else 'generated'} index {i}")
n, k = host["n_tokens"], len(host["runs"])
print(f"\nhost run {host_s:.1f} s (generate {host['generate_s']} s); qemu run {qemu_s:.1f} s "
      f"(load {arm['load_s']} s, generate {arm['generate_s']} s, x{arm['generate_s'] / max(host['generate_s'], 1e-9):.0f})")
if not ok:
    print(f"ARM64 GREEDY PARITY: FAILED (token ids differ; {n} tokens x {k} prompts)")
    sys.exit(1)
print(f"ARM64 GREEDY PARITY: OK ({n} tokens x {k} prompts) - qemu run {qemu_s:.1f} s vs host {host_s:.1f} s")
EOF
