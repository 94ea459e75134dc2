"""Split prefill: in-order vs out-of-order for real, the simulator checked against it, a phone simulated.

1. Subgraph latencies, measured here: in-order runs of the split graphs (one task at a time, so each
   task's time is its own), the median per task over --calibration runs.
2. Real runs, interleaved round by round in one process: one-shot prefill (the whole graph, --threads
   threads), split in order, split out of order (two workers, one thread each; the out-of-order
   order comes from the measured latencies). tok/s medians and ranges.
3. The simulator fed with the latencies of 1. predicts both split runs' time; printed next to the
   measured medians with the error.
4. A phone: the same DAG with task latencies from the device profile's cost model
   (`ondevice.schedule.DeviceModel`, every assumption printed), for this bundle's model and for a
   Qwen1.5-1.8B-shaped model, next to what mllm-NPU reports.

    python benchmarks/split_prefill.py BUNDLE [--lengths 512 1024] [--rounds 3] [--calibration 2]
        [--threads 2] [--profile snapdragon-8gen3-phone] [--json out.json]

BUNDLE must be converted with --split-prefill. The phone part alone (no bundle needed):
    python benchmarks/split_prefill.py --phone-only [--profile ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import ondevice
from ondevice.evaluate import bench_prompt
from ondevice.profiles import load_profile
from ondevice.schedule import (CPU, NPU, POLICIES, DeviceModel, ModelShape, Task, chunks_for, prefill_dag,
                               simulate)

# Qwen1.5-1.8B's dimensions (its config.json: hidden_size 2048, intermediate_size 5504, 24 layers,
# 16 attention heads, 16 key/value heads, vocab 151936): the model mllm-NPU reports >1000 tok/s for.
QWEN15_18B = ModelShape(layers=24, hidden=2048, intermediate=5504, heads=16, kv_heads=16, head_dim=128, vocab=151936)
# What mllm-NPU reports (PAPERS.md section 1; arXiv:2407.05858): the figures we can compare with.
MLLM_NPU = [
    ("Qwen1.5-1.8B prefill on a Snapdragon 8 Gen 3 (Xiaomi 14 / Redmi K70 Pro)", "> 1000 tok/s",
     "PAPERS.md section 1; paper abstract: 'more than 1,000 tokens/sec prefilling for a billion-sized model'"),
    ("prefill speed-up over competitive baselines, average", "22.4x", "PAPERS.md section 1; paper abstract"),
    ("NPU INT8 MatMul vs CPU INT8 MatMul (Redmi K70 Pro)", "4.4-5.8x faster",
     "arXiv:2407.05858v2 Table 3, as cited in profiles/snapdragon-8gen3-phone.json (npu.precisions)"),
]
PAPER_QWEN_TOK_S = 1000.0


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.1f}-{max(values):.1f})"


def measure(bundle: str, lengths: list[int], rounds: int, calibration: int, threads: int) -> dict:
    model = ondevice.load(bundle, threads=threads, split_prefill=True)
    backend, split = model.backend, model.backend.split_prefill
    backend.ensure_capacity(max(chunks_for(n, split.chunk) * split.chunk for n in lengths) + 8)
    prompts = {n: bench_prompt(model, n) for n in lengths}

    def run(variant: str, n: int) -> float:
        backend.split_prefill = None if variant == "one-shot" else split
        if variant != "one-shot":
            split.policy = variant
        t = time.perf_counter()
        backend.forward(prompts[n], 0)
        return time.perf_counter() - t

    for n in lengths:  # warm-up: first runs allocate
        for variant in ("one-shot", *POLICIES):
            run(variant, n)
    # 1. subgraph latencies: in-order runs, a task at a time
    samples: dict[Task, list[float]] = defaultdict(list)
    for _ in range(calibration):
        for n in lengths:
            run("in-order", n)
            for s in split.last.slots:
                samples[s.task].append(s.end - s.start)
    latencies = {t: statistics.median(v) for t, v in samples.items()}
    split.latencies = latencies  # the out-of-order order from measured latencies
    # 2. real runs, interleaved
    wall: dict[tuple, list[float]] = defaultdict(list)
    makespan: dict[tuple, list[float]] = defaultdict(list)
    busy: dict[tuple, list[dict]] = defaultdict(list)
    replayed: dict[tuple, list[float]] = defaultdict(list)  # simulated with the run's own task times / measured
    for _ in range(rounds):
        for n in lengths:
            for variant in ("one-shot", *POLICIES):
                wall[variant, n].append(run(variant, n))
                if variant != "one-shot":
                    makespan[variant, n].append(split.last.makespan)
                    busy[variant, n].append(split.last.busy)
                    own = {x.task: x.end - x.start for x in split.last.slots}
                    orders = {p: split.last.order(p) for p in (NPU, CPU)}
                    dag = prefill_dag(chunks_for(n, split.chunk), split.layers)
                    replayed[variant, n].append(simulate(dag, own, orders=orders).makespan / split.last.makespan)
    backend.split_prefill = split
    result = {"chunk": split.chunk, "threads_one_shot": threads, "lengths": {}}
    for n in lengths:
        dag = prefill_dag(chunks_for(n, split.chunk), split.layers)
        row = {"tok_s": {v: [n / s for s in wall[v, n]] for v in ("one-shot", *POLICIES)}, "split": {}}
        for policy in POLICIES:
            predicted = simulate(dag, latencies, policy)
            measured = statistics.median(makespan[policy, n])
            row["split"][policy] = {
                "predicted_s": predicted.makespan, "measured_s": measured,
                "measured_wall_s": statistics.median(wall[policy, n]),
                "error": measured / predicted.makespan - 1,
                "replay_ratio": statistics.median(replayed[policy, n]),
                "predicted_idle_s": predicted.idle,
                "measured_busy_s": {p: statistics.median(b[p] for b in busy[policy, n]) for p in (NPU, CPU)},
            }
        row["calibrated_busy_s"] = {p: sum(latencies[t] for t in dag if t.processor == p) for p in (NPU, CPU)}
        result["lengths"][n] = row
    result["task_latency_ms"] = {kind: statistics.median(1e3 * v for t, v in latencies.items() if t.kind == kind)
                                 for kind in ("embed", "pre", "attn", "post", "head")}
    return result


def print_measured(r: dict) -> None:
    print(f"\n## Measured here (chunk {r['chunk']}; one-shot with {r['threads_one_shot']} threads; split: two "
          "workers, one thread each)")
    print("median subgraph latency (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in r["task_latency_ms"].items())
          + "  (attn: median over chunks; it grows with the cache)")
    print(f"{'tokens':>6} {'one-shot tok/s':>22} {'split in-order':>22} {'split out-of-order':>22} "
          f"{'ooo/one-shot':>12} {'ooo/in-order':>12}")
    for n, row in r["lengths"].items():
        t = row["tok_s"]
        med = {v: statistics.median(x) for v, x in t.items()}
        print(f"{n:>6} {spread(t['one-shot']):>22} {spread(t['in-order']):>22} {spread(t['out-of-order']):>22} "
              f"{med['out-of-order'] / med['one-shot']:11.2f}x {med['out-of-order'] / med['in-order']:11.2f}x")
    print("\nsimulator (fed the measured subgraph latencies) vs the measured split runs:")
    print(f"{'tokens':>6} {'policy':>13} {'predicted s':>12} {'measured s':>11} {'error':>7} {'replay':>7}   "
          "busy npu/cpu s: calibrated -> measured")
    for n, row in r["lengths"].items():
        for policy, s in row["split"].items():
            cal, got = row["calibrated_busy_s"], s["measured_busy_s"]
            print(f"{n:>6} {policy:>13} {s['predicted_s']:12.3f} {s['measured_s']:11.3f} {100 * s['error']:+6.1f}%"
                  f" {s['replay_ratio']:7.3f}   {cal[NPU]:.2f}/{cal[CPU]:.2f} -> {got[NPU]:.2f}/{got[CPU]:.2f}")
    print("replay: the simulator replaying each run's own order with that run's own task times, over the run's "
          "measured time\n(1.000: the DAG and the workers' waits are modelled exactly; an error beyond it comes "
          "from tasks slowing down when both workers run at once)")


def implied_npu_utilisation(profile: dict, tokens: int, chunk: int, target_tok_s: float, **assumptions) -> float | None:
    """The NPU utilisation at which the simulated out-of-order prefill of Qwen1.5-1.8B reaches the paper's
    figure (bisection); None when it cannot (the CPU's attention alone takes longer)."""
    dag = prefill_dag(chunks_for(tokens, chunk), QWEN15_18B.layers)

    def tok_s(u: float) -> float:
        m = DeviceModel.from_profile(profile, npu_utilisation=u, **assumptions)
        return tokens / simulate(dag, m.latencies(QWEN15_18B, chunk), "out-of-order").makespan

    if tok_s(1.0) < target_tok_s:
        return None
    lo, hi = 1e-4, 1.0
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if tok_s(mid) < target_tok_s else (lo, mid)
    return hi


def phone(profile_name: str, own: ModelShape | None, lengths: list[int]) -> dict:
    profile = load_profile(profile_name)
    chunk = profile["prefill_chunk"] or 256
    base = DeviceModel.from_profile(profile)
    print(f"\n## Simulated: {profile_name} (chunk {chunk}, the profile's prefill_chunk)")
    print("assumptions (DeviceModel.from_profile defaults; the table varies the two utilisations):")
    for key, text in base.assumptions.items():
        print(f"  {key:18s} {text}")
    attention = sum(QWEN15_18B.attention_flops(chunk, c * chunk) for c in range(chunks_for(1024, chunk)))
    need = attention * QWEN15_18B.layers / (1024 / PAPER_QWEN_TOK_S)
    print(f"mllm-NPU's > {PAPER_QWEN_TOK_S:.0f} tok/s for Qwen1.5-1.8B at 1024 tokens needs, in this model, CPU "
          f"attention at >= {need / 1e9:.0f} GFLOP/s ({attention * QWEN15_18B.layers / 1e9:.0f} GFLOP in "
          f"<= {1024 / PAPER_QWEN_TOK_S:.2f} s)")
    implied = {cu: implied_npu_utilisation(profile, 1024, chunk, PAPER_QWEN_TOK_S, cpu_utilisation=cu)
               for cu in (0.2, 0.5)}
    for cu, u in implied.items():
        print(f"  with CPU utilisation {cu}: NPU utilisation needed "
              + (f"{u:.3f}" if u else "- (unreachable: the CPU's attention alone takes longer)"))
    models = {"this bundle's model": own, "Qwen1.5-1.8B shape": QWEN15_18B}
    rows = []
    print(f"{'model':>20} {'npu/cpu util':>12} {'tokens':>6} {'in-order tok/s':>15} {'out-of-order tok/s':>19} "
          f"{'gain':>6} {'npu idle (in/out)':>18} {'cpu busy':>9}")
    for label, shape in models.items():
        if shape is None:
            continue
        for nu in (0.1, 0.25):
            for cu in (0.2, 0.5):
                m = DeviceModel.from_profile(profile, npu_utilisation=nu, cpu_utilisation=cu)
                for n in lengths:
                    dag = prefill_dag(chunks_for(n, chunk), shape.layers)
                    s = {p: simulate(dag, m.latencies(shape, chunk), p) for p in POLICIES}
                    ino, ooo = s["in-order"], s["out-of-order"]
                    r = {"model": label, "npu_utilisation": nu, "cpu_utilisation": cu, "tokens": n,
                         "in_order_tok_s": n / ino.makespan, "out_of_order_tok_s": n / ooo.makespan,
                         "gain": ino.makespan / ooo.makespan, "npu_idle_in_order": ino.idle[NPU] / ino.makespan,
                         "npu_idle_out_of_order": ooo.idle[NPU] / ooo.makespan,
                         "cpu_busy_share": ooo.busy[CPU] / ooo.makespan}
                    rows.append(r)
                    print(f"{label:>20} {nu:5.2f}/{cu:4.2f}  {n:>6} {r['in_order_tok_s']:15.0f} "
                          f"{r['out_of_order_tok_s']:19.0f} {r['gain']:5.2f}x "
                          f"{100 * r['npu_idle_in_order']:7.0f}% / {100 * r['npu_idle_out_of_order']:3.0f}%"
                          f" {100 * r['cpu_busy_share']:8.0f}%")
    print("\nmllm-NPU's reported figures (what there is to compare with):")
    for what, figure, where in MLLM_NPU:
        print(f"  {what}: {figure}  [{where}]")
    print("  (the paper has no model near 135M parameters: the SmolLM2 rows have no paper figure to match)")
    return {"profile": profile_name, "chunk": chunk, "assumptions": base.assumptions,
            "cpu_attention_gflops_needed_for_paper": need / 1e9, "implied_npu_utilisation": implied,
            "rows": rows, "mllm_npu": MLLM_NPU}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calibration", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", default="snapdragon-8gen3-phone")
    ap.add_argument("--phone-only", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    report = {}
    own = None
    if not args.phone_only:
        if not args.bundle:
            ap.error("give a bundle converted with --split-prefill (or --phone-only)")
        report["measured"] = measure(args.bundle, args.lengths, args.rounds, args.calibration, args.threads)
        print_measured(report["measured"])
        from ondevice.bundle import read_bundle

        own = ModelShape.from_config(read_bundle(args.bundle, verify=False).config)
    else:
        own = ModelShape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152)
    report["phone"] = phone(args.profile, own, args.lengths)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
