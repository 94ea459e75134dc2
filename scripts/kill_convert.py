"""Kill -9 `ondevice convert` and `ondevice export-android` at random points, many times, and check
after every kill that the output is absent or a complete bundle that loads with its checksums
verified (the previous bundle, with --force), never a partial one.

    python scripts/kill_convert.py                 # 100 kills per lane
    python scripts/kill_convert.py --kills 500 --seed 7

Three lanes run side by side: a fresh output, --force over a complete bundle, and export-android
over a bundle exported before. The loop is tests/test_crash_safety.py's, run longer; it exits 1 on
the first partial bundle (an AssertionError or BundleError with what was found).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from models import write_tiny_llama_gguf  # noqa: E402
from test_crash_safety import convert_lane, export_lane  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100, help="kills per lane")
    ap.add_argument("--seed", type=int, default=20261207)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ondevice-kill-") as work:
        work = Path(work)
        gguf = write_tiny_llama_gguf(work / "tiny.gguf", weight_type="Q4_1", seed=3)
        with ThreadPoolExecutor(3) as pool:
            lanes = {"fresh": pool.submit(convert_lane, gguf, work / "fresh", args.seed, args.kills, False),
                     "forced": pool.submit(convert_lane, gguf, work / "forced", args.seed + 1, args.kills, True),
                     "export": pool.submit(export_lane, gguf, work / "export", args.seed + 2, args.kills)}
            results = {name: lane.result() for name, lane in lanes.items()}
    kills = sum(r["kills"] for r in results.values())
    print(json.dumps(results, indent=1))
    print(f"{kills} kills in 3 lanes, 0 partial bundles (every state checked), "
          f"temp dirs left after the next conversion: {results['fresh']['left_after_next'] + results['forced']['left_after_next']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
