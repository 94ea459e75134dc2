"""Speculative decoding against the same target decoding alone, side by side in one process.

For each prompt kind (ondevice/prompts/*.txt: summarize a passage, edit code, a free chat answer)
and each draft setting, runs plain and speculative greedy decoding in turn (A B A B ...), checks
that both produce the same tokens, and reports decode tok/s, the ratio, and the speculation stats.

    python benchmarks/speculative.py TARGET_BUNDLE [--draft DRAFT_BUNDLE] [--tokens 128] [--rounds 3]
        [--threads 2] [--json]

Settings tried: lookup; and with --draft also draft, draft + lookup, and the draft pipelined (it
drafts the next chain while the target verifies; load() turns that on only when the draft has
compute of its own: an NPU target, or cores to spare).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import ondevice
from ondevice.evaluate import speculation_benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target")
    ap.add_argument("--draft")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--setting", help=argparse.SUPPRESS)  # one setting, in this process (see below)
    args = ap.parse_args()
    settings = {"lookup": {"lookup": True}}
    if args.draft:
        settings.update({"draft": {"draft": args.draft}, "draft+lookup": {"draft": args.draft, "lookup": True},
                         "draft pipelined": {"draft": args.draft, "pipeline": True}})
    if args.setting:
        options = dict(settings[args.setting])
        pipeline = options.pop("pipeline", None)
        model = ondevice.load(args.target, threads=args.threads, **options)
        if pipeline is not None:
            model.speculator.config.pipeline = pipeline
        print(json.dumps(speculation_benchmark(model, args.tokens, args.rounds)))
        return
    rows = {}
    for name in settings:  # each in a fresh process: a draft's thread-pool set-up needs one
        cmd = [sys.executable, __file__, *sys.argv[1:], "--setting", name]
        rows[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'prompt':10s} {'setting':13s} {'plain':>7s} {'spec':>7s} {'ratio':>6s} {'(min-max)':>11s} "
          f"{'accept':>6s} {'/verify':>7s} {'draft%':>6s} {'verify%':>7s} same")
    for name, kinds in rows.items():
        for kind, r in kinds.items():
            print(f"{kind:10s} {name:13s} {r['plain_tok_s']['median']:7.1f} {r['speculative_tok_s']['median']:7.1f} "
                  f"{r['speedup']['median']:6.2f} {r['speedup']['min']:5.2f}-{r['speedup']['max']:<5.2f} "
                  f"{r['acceptance_rate']:6.2f} {r['accepted_per_verify']:7.2f} {100 * r['draft_share']:6.0f} "
                  f"{100 * r['verify_share']:7.0f} {r['identical']}")


if __name__ == "__main__":
    main()
