"""Long fuzz run of the SDK's input boundaries: GGUF files, bundles, tokenizer.json, chat templates.

    python scripts/fuzz.py                      # 200 cases per target
    python scripts/fuzz.py --examples 2000      # more per target
    python scripts/fuzz.py --seconds 300        # a time budget shared by the targets
    python scripts/fuzz.py --targets gguf,chat --seed 7
    python scripts/fuzz.py --targets gguf --case 123   # replay one case (as printed by a FAIL line)

Each case runs in a worker process with an address-space limit and a timeout (tests/fuzz_harness.py).
Prints the number of cases per target and per outcome and exits 1 if any case crashed, hung, or
raised an error that is not an OndeviceError with a message (each such case is printed, with what
was mutated, so it can be replayed).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fuzz_harness as fh  # noqa: E402

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=200, help="cases per target (default 200)")
    ap.add_argument("--seconds", type=float, default=None, help="time budget in total, split evenly among targets")
    ap.add_argument("--targets", default=",".join(fh.CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory", type=int, default=fh.MEMORY_LIMIT >> 20, help="worker address-space limit, MB")
    ap.add_argument("--case", type=int, default=None, help="run only this case number of each target (a replay)")
    args = ap.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(fh.CASES))
    if unknown:
        ap.error(f"unknown targets {unknown}; choose from {', '.join(fh.CASES)}")
    tally = fh.Tally()
    work = Path(tempfile.mkdtemp(prefix="ondevice-fuzz-"))
    started = time.monotonic()
    try:
        ctx = fh.setup(work)
        with fh.Worker(args.memory << 20) as worker:
            for target in targets:
                deadline = (time.monotonic() + args.seconds / len(targets)) if args.seconds else None
                first = n = 0 if args.case is None else args.case
                t0 = time.monotonic()
                while True:
                    # one generator per case: a FAIL line's case number replays it alone (--case)
                    rng = fh.case_rng(args.seed, target, n)
                    for name, outcome, detail, what in fh.CASES[target](ctx, rng, work, worker, n):
                        if not tally.add(name, outcome, detail, what):
                            print(f"FAIL {name} case {n}: {outcome}: {what[:300]}\n    {detail.strip()[-600:]}",
                                  flush=True)
                        elif args.case is not None:
                            print(f"{name} case {n}: {outcome}: {what}\n    {detail.strip()[-600:]}", flush=True)
                    n += 1
                    if args.case is not None or (n >= args.examples if deadline is None
                                                 else time.monotonic() >= deadline):
                        break
                print(f"{target}: {n - first} cases in {time.monotonic() - t0:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'target':16} {'cases':>6}  outcomes")
    for name, per in tally.counts.items():
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
        print(f"{name:16} {sum(per.values()):6}  {outcomes}")
    print(f"\n{sum(sum(p.values()) for p in tally.counts.values())} cases in {time.monotonic() - started:.0f} s; "
          f"{len(tally.failures)} failures (crash, hang or wrong error type)")
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
