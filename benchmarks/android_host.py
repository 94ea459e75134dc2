"""The Android app's generation path on the host JVM against the Python engine, side by side.

    python benchmarks/android_host.py BUNDLE [--tokens 128] [--rounds 3]

BUNDLE must carry the Android graph (`ondevice export-android BUNDLE`); the host build must exist
(`bash android_demo/build_host.sh`). Each round runs, each in a fresh process and in turn: the
Python engine (bundle's own graph, PyPI ONNX Runtime), the app's Kotlin + C bridge on the JVM over
the PyPI ONNX Runtime, and the same over ONNX Runtime 1.17.0 (the app's C API). Every run is a
greedy answer of --tokens tokens (EOS ignored in Python; the app stops at EOS, so the prompt asks
for a long answer) after the same chat prompt; reported: medians over rounds of decode tok/s,
prefill tok/s, TTFT and load time, and whether the token ids agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = REPO / "android_demo/build/host"
PROMPT = "Tell me a long story about a dragon who learns to read."

PYTHON_RUN = """
import json, sys, time
import ondevice
t = time.perf_counter()
m = ondevice.load(sys.argv[1], threads=2)
load = time.perf_counter() - t
g = m.generate([{"role": "user", "content": sys.argv[2]}], max_tokens=int(sys.argv[3]), temperature=0)
print(json.dumps({"load_ms": load * 1e3, "ids": g.token_ids, "ttft_ms": g.ttft_s * 1e3,
                  "prefill_tok_s": g.prefill_tok_s, "decode_tok_s": (len(g.token_ids) - 1) / g.decode_s}))
"""


def kotlin_stdlib() -> str:
    env = Path.home() / ".cache/android-toolchain/env.sh"
    return subprocess.run(["bash", "-c", f"source {env} && printf %s \"$KOTLIN_STDLIB\""], capture_output=True,
                          text=True, check=True).stdout


def run_python(bundle: str, tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PYTHON_RUN, bundle, PROMPT, str(tokens)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def run_jvm(bundle: str, tokens: int, runtime: str, stdlib: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"bundle": bundle, "runs": [{"messages": [{"role": "user", "content": PROMPT}],
                                               "max_tokens": tokens}]}, f)
    out = subprocess.run(["java", f"-Djava.library.path={HOST / runtime}", "-cp", f"{HOST / 'app.jar'}:{stdlib}",
                          "dev.ondevice.demo.host.HostMainKt", f.name], capture_output=True, text=True, check=True)
    Path(f.name).unlink()
    report = json.loads(out.stdout.splitlines()[-1])
    return dict(report["runs"][0], load_ms=report["load_ms"], ort=report["ort_version"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    stdlib = kotlin_stdlib()
    engines = {"python engine (ORT 1.32, bundle graph)": lambda: run_python(args.bundle, args.tokens),
               "app on JVM (PyPI ORT, android graph)": lambda: run_jvm(args.bundle, args.tokens, "pypi", stdlib),
               "app on JVM (ORT 1.17.0, android graph)": lambda: run_jvm(args.bundle, args.tokens, "ort117", stdlib)}
    results: dict[str, list[dict]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, run in engines.items():
            results[name].append(run())
    reference = results[next(iter(engines))][0]["ids"]
    print(f"| engine | decode tok/s | prefill tok/s | TTFT ms | load ms | same ids as Python |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms", "load_ms")}
        same = all(r["ids"] == reference[:len(r["ids"])] and len(r["ids"]) >= len(reference) - 1 for r in runs)
        print(f"| {name} | {med['decode_tok_s']:.1f} | {med['prefill_tok_s']:.0f} | {med['ttft_ms']:.0f} | "
              f"{med['load_ms']:.0f} | {'yes' if same else 'NO'} ({len(runs[0]['ids'])} tokens) |")


if __name__ == "__main__":
    main()
