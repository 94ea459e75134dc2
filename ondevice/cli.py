"""The `ondevice` command: convert, run, chat, bench, inspect, verify, perplexity, export-android."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ondevice.errors import OndeviceError


def _load(args):
    import ondevice

    speculation = {"draft": getattr(args, "draft", None), "lookup": getattr(args, "lookup", False)}
    return ondevice.load(args.bundle, threads=args.threads, verify=not args.no_verify,
                         prefill_chunk=getattr(args, "prefill_chunk", None), profile=getattr(args, "profile", None),
                         split_prefill=getattr(args, "split_prefill", None) or False,
                         int8_prefill=getattr(args, "int8_prefill", False), dram_budget=args.dram_budget,
                         ffn_fraction=args.ffn_fraction, ffn_select=args.ffn_select, backend=args.backend,
                         **speculation)


def _sampling(args) -> dict:
    opts = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
            "seed": args.seed}
    return {k: v for k, v in opts.items() if v is not None}


def cmd_convert(args) -> int:
    from ondevice.converters.convert import convert

    t = time.perf_counter()
    out = convert(args.source, args.out, quant=args.quant, block_size=args.block_size,
                  symmetric=args.symmetric, max_context=args.context, compute=args.compute,
                  draft_of=args.draft_of, draft_layers=args.draft_layers, draft_vocab=args.draft_vocab,
                  split_prefill=args.split_prefill, int8_prefill=args.int8_prefill or False,
                  force=args.force, progress=not args.quiet, flash=args.flash or False,
                  flash_predictor=args.flash_predictor, trim_layers=args.trim_layers, trim_ffn=args.trim_ffn,
                  trim_heads=args.trim_heads, trim_vocab=args.trim_vocab, target=args.target)
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 1e6
    print(f"wrote {out} ({size:.1f} MB) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    if args.prompt_file:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        prompt = sys.stdin.read()
    model = _load(args)
    opts = dict(_sampling(args), raw=args.raw, stop=args.stop or ())
    if args.json:
        g = model.generate(prompt, **opts)
        print(json.dumps(dict(g.to_dict(), load_s=model.load_s), ensure_ascii=False))
        return 0
    for piece in model.stream(prompt, **opts):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    model = _load(args)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()

        print("Chat with the model. /reset starts over, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                return 0
        else:
            line = sys.stdin.readline()
            if not line:
                return 0
            line = line.rstrip("\n")
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            model.reset()
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        pieces = []
        try:
            for piece in model.stream(messages, **_sampling(args)):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except OndeviceError as e:  # e.g. the conversation outgrew the context
            messages.pop()
            print(f"\nerror: {one_line(e)} (use /reset to start a new conversation)", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print("\n[stopped]", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(pieces)})


def cmd_bench(args) -> int:
    import ondevice
    from ondevice.evaluate import benchmark

    model = _load(args)
    results = benchmark(model, prompt_lengths=args.prompt_lengths, decode_tokens=args.decode_tokens,
                        repeats=args.repeat,
                        load=lambda: ondevice.load(args.bundle, threads=args.threads, verify=not args.no_verify,
                                                   dram_budget=args.dram_budget, ffn_fraction=args.ffn_fraction,
                                                   ffn_select=args.ffn_select, backend=args.backend))
    if args.json:
        print(json.dumps(results))
    else:
        print(format_bench(results))
    if args.plot:
        others = {}
        if args.compare:  # figures of other engines, as written by benchmarks/compare.py --json
            report = json.loads(Path(args.compare).read_text())["report"]
            others = {name: {"decode_tok_s": {"median": e["decode_tok_s"]},
                             "prefill_tok_s": {str(report["prompt_len"]): {"median": e["prefill_tok_s"]}}}
                      for name, e in report["engines"].items()}
        plot_bench(results, args.plot, others)
    return 0


def format_bench(r: dict) -> str:
    fmt = lambda s, unit: f"{s['median']:.3f} {unit} (min {s['min']:.3f}, max {s['max']:.3f})"  # noqa: E731
    lines = []
    if "load_s" in r:
        lines.append(f"load            {fmt(r['load_s'], 's')}")
    for n, s in r["prefill_tok_s"].items():
        lines.append(f"prefill {n:>5}   {fmt(s, 'tok/s')}")
    lines.append(f"decode          {fmt(r['decode_tok_s'], 'tok/s')} over {r['decode_tokens']} tokens")
    lines.append(f"ttft (128 tok)  {fmt(r['ttft_s'], 's')}")
    lines.append(f"peak RSS        {r['peak_rss_mb']:.0f} MB   ({r['repeats']} runs each, median)")
    if r.get("providers"):
        chunk = f", prefill in chunks of {r['prefill_chunk']}" if r.get("prefill_chunk") else ""
        chunk += " (int8 graph)" if r.get("int8_prefill") else ""
        lines.append(f"ran on          {', '.join(r['providers'])}{chunk}")
    if r.get("flash"):
        f = r["flash"]
        lines.append(f"flash FFN       budget {f['budget_bytes'] / 1e6:.0f} MB (in use {f['dram_bytes'] / 1e6:.0f}), "
                     f"{f['neurons_per_token']} neurons/token/layer of which {f['slots_per_layer']} fit the window; "
                     f"decode reads {f['decode_bytes_per_token'] / 1e6:.2f} MB in {f['decode_reads_per_token']:.0f} "
                     f"reads per token, window hit rate {100 * f['window_hit_rate']:.1f}%, I/O wait "
                     f"{100 * f['io_wait_share']:.0f}% of decode time" + ("" if f["direct_io"] else " (page cache)"))
    if r.get("node_placement"):
        lines.append("graph nodes     " + ", ".join(f"{n} on {p}" for p, n in r["node_placement"].items()))
    for kind, v in r.get("speculative", {}).items():
        lines.append(f"speculative {kind:10s} {v['speculative_tok_s']['median']:6.1f} vs plain "
                     f"{v['plain_tok_s']['median']:6.1f} tok/s = {v['speedup']['median']:.2f}x "
                     f"(min {v['speedup']['min']:.2f}, max {v['speedup']['max']:.2f}); accepted "
                     f"{100 * v['acceptance_rate']:.0f}%, {v['accepted_per_verify']:.2f}/verify; draft "
                     f"{100 * v['draft_share']:.0f}% verify {100 * v['verify_share']:.0f}% of decode time"
                     + ("" if v["identical"] else "  OUTPUT DIFFERS"))
    return "\n".join(lines)


def plot_bench(results: dict, out: str, others: dict[str, dict] | None = None) -> None:
    """Bar charts of prefill and decode tok/s; `others` adds engines side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise OndeviceError("--plot needs matplotlib: pip install 'ondevice[plot]'") from e
    engines = {"ondevice bench": results, **(others or {})}
    metrics = [f"prefill {n}" for n in results["prefill_tok_s"]] + ["decode"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(engines)
    for i, (name, r) in enumerate(engines.items()):
        vals = [r.get("prefill_tok_s", {}).get(m.split()[1], {}).get("median", 0) for m in metrics[:-1]]
        vals.append(r.get("decode_tok_s", {}).get("median", 0))
        ax.bar([j + i * width for j in range(len(metrics))], vals, width, label=name)
    ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_ylabel("tokens / s")
    ax.legend()
    ax.set_title("ondevice bench")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def cmd_inspect(args) -> int:
    from ondevice.bundle import read_bundle

    bundle = read_bundle(args.bundle, verify=False)
    m = bundle.manifest
    run_plan = None
    if args.profile:  # what would run where on that device, with this onnxruntime build
        from ondevice.profiles import detect_host, load_profile, plan

        p = plan(detect_host() if args.profile == "host" else load_profile(args.profile), m)
        run_plan = {"profile": args.profile, "providers": [name for name, _ in p.providers],
                    "prefill_chunk": p.prefill_chunk, "threads": p.threads, "fallbacks": p.fallbacks}
    if args.json:
        print(json.dumps(dict(m, plan=run_plan) if run_plan else m, indent=2))
        return 0
    c, q = m["config"], m["quantization"]
    print(f"bundle        {bundle.path}")
    print(f"architecture  {m['architecture']}  ({c['num_layers']} layers, hidden {c['hidden_size']}, "
          f"heads {c['num_heads']}/{c['num_kv_heads']}, vocab {c['vocab_size']})")
    print(f"context       {m['max_context']}")
    print(f"quantization  {q['mode']} g{q['block_size']}, {q.get('compute', 'float')} compute "
          f"(MatMulNBits accuracy_level {q['accuracy_level']})")
    for group, how in q["tensors"].items():
        print(f"  {group:<16} {how}")
    int8 = m["backends"].get("onnx", {}).get("prefill_int8")
    if int8:
        iq = int8["quantization"]
        print(f"int8 prefill  {iq.get('preset', 'custom')}: {iq['int8_linears']} linears on int8 kernels "
              f"({iq['activation_bits']}-bit activations, {iq['weight_bits']}-bit weights, static scales), "
              f"{iq['outlier_channels_total']} outlier channels in float, chunks of {int8['chunk_sizes'][0]}")
    tfl = m["backends"].get("tflite")
    if tfl:
        pr, kv = tfl["precision"], tfl["kv_cache"]
        print(f"tflite        {tfl['graph']}: {pr['weights']}, {pr['compute']} compute; signatures decode (1 token) "
              f"and prefill ({tfl['signatures']['prefill']['tokens']}-token chunks); KV cache {kv['slots']} slots")
    droid = m["backends"].get("android")
    if droid:
        print(f"android       {droid['graph']}: ONNX Runtime 1.{droid['ort_api']}+ (C API {droid['ort_api']}), opset {droid['opset']}; "
              f"KV cache read in place, new rows written by the app (ondevice export-android)")
    cml = m["backends"].get("coreml")
    if cml:
        pr, kv = cml["precision"], cml["kv_cache"]
        print(f"coreml        {cml['graph']}: {pr['weights']}, {pr['compute']} compute, {cml['deployment_target']}; "
              f"tokens per call {cml['chunks']}; KV cache in states, {kv['slots']} slots")
    if isinstance(m.get("flash"), dict):
        f = m["flash"]
        print(f"flash store   {f['file']}: {f['encoding']} ({'exact' if f['exact'] else 'max error %.3g' % f['max_abs_error']}), "
              f"{f['num_layers']} layers x {f['intermediate_size']} neurons x {f['record_size']} B records "
              f"({f['record_payload']} B of weights), sections aligned to {f['page_size']} B, neuron order "
              f"{'identity' if all(x['order'] == 'identity' for x in f['layers']) else 'permuted'}")
        print(f"  resident    {f['resident_bytes'] / 1e6:9.2f} MB  (weights outside the store: graph "
              f"{f['graph_resident_bytes'] / 1e6:.2f} MB + store tables {f['tables_bytes'] / 1e6:.2f} MB)")
        print(f"  in flash    {f['file_bytes'] / 1e6:9.2f} MB  (the graph's own copy of the FFN: "
              f"{f['graph_ffn_bytes'] / 1e6:.2f} MB)")
        sel, pred = f.get("selection"), f.get("predictor")
        print("  selection   top-k |silu(gate)| (gate rows resident)"
              + (f"; thresholds for {', '.join(f'{x:g}' for x in sel['fractions'])}" if sel else "")
              + (f"; rank-{pred['rank']} predictors, {pred['bytes'] / 1e6:.1f} MB" if pred else ""))
    if "trim" in m:
        t = m["trim"]
        print("trimmed       " + "; ".join(
            ([f"layers {t['layers_kept']}"] if "layers_kept" in t else [])
            + ([f"{t['ffn_neurons']} FFN neurons per layer"] if "ffn_neurons" in t else [])
            + ([f"{t['query_heads']} query heads per layer"] if "query_heads" in t else [])
            + ([f"{t['vocab_size']} tokens (original ids in {t['original_ids']})"] if "vocab_size" in t else [])))
    print(f"source        {m['source'].get('format')} {m['source'].get('file') or m['source'].get('folder')}")
    if "draft" in m:
        d = m["draft"]
        print(f"draft         of {d['target'].get('source_name') or 'target'}: layers {d['layers_kept']} of "
              f"{d['source_layers']}, {d['vocab_kept']} vocabulary rows")
    if run_plan:
        print(f"plan          {run_plan['profile']}: {', '.join(run_plan['providers'])} (first available "
              f"runs the graph), prefill {'chunks of ' + str(run_plan['prefill_chunk']) if run_plan['prefill_chunk'] else 'one-shot'}, "
              f"{run_plan['threads']} threads")
    print("files")
    for name, info in m["files"].items():
        print(f"  {name:<20} {info['bytes'] / 1e6:9.2f} MB  sha256 {info['sha256'][:16]}…")
    return 0


APP_FILES = "/sdcard/Android/data/dev.ondevice.demo/files/"


def cmd_export_android(args) -> int:
    from ondevice.converters.export_android import export_android

    t = time.perf_counter()
    record = export_android(args.bundle)
    bundle = Path(args.bundle)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 1e6
    print(f"wrote {bundle / record['graph']} for ONNX Runtime 1.{record['ort_api']}+ in {time.perf_counter() - t:.1f} s "
          f"(bundle now {size:.1f} MB)", file=sys.stderr)
    print(f"install on a phone with the demo app (android_demo/):\n"
          f"  adb install android_demo/build/ondevice-demo.apk\n"
          f"  adb push {bundle} {APP_FILES}\n"
          f"then pick '{bundle.name}' in the app (or build the APK with it inside: "
          f"BUNDLE={bundle} bash android_demo/build_apk.sh)")
    return 0


def cmd_verify(args) -> int:
    from ondevice.bundle import read_bundle

    t = time.perf_counter()
    bundle = read_bundle(args.bundle, verify=True)
    print(f"{bundle.path}: OK ({len(bundle.manifest['files'])} files, checksums match, "
          f"{time.perf_counter() - t:.2f} s)")
    return 0


def cmd_perplexity(args) -> int:
    from ondevice.evaluate import perplexity

    model = _load(args)
    ids = model.tokenizer.encode(Path(args.file).read_text(encoding="utf-8"))
    result = perplexity(model, ids, window=args.window)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens (window {args.window})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ondevice", description="Run LLMs on phones and laptops.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="GGUF file / HF folder / model alias -> bundle")
    c.add_argument("source", help="a .gguf file, a Hugging Face folder, or an alias (smollm2-135m)")
    c.add_argument("out", help="the bundle directory to write")
    c.add_argument("--quant", default="q4", choices=["q4", "q8", "fp16", "fp32"])
    c.add_argument("--block-size", type=int, default=32, help="quantization group size (default 32)")
    c.add_argument("--symmetric", action="store_true", help="symmetric (no zero point) re-quantization")
    c.add_argument("--context", type=int, default=None, help="max context (default: the model's)")
    c.add_argument("--compute", default="float", choices=["float", "int8"],
                   help="float: exact, equals a float reference (default); int8: int8 activations, faster")
    c.add_argument("--draft-of", metavar="TARGET_BUNDLE", default=None,
                   help="trim the model into a draft for speculative decoding with this target bundle")
    c.add_argument("--draft-layers", type=int, default=None,
                   help="decoder layers the draft keeps (default: all)")
    c.add_argument("--draft-vocab", type=int, default=None,
                   help="LM-head rows (most frequent tokens) the draft keeps (default 16384)")
    c.add_argument("--int8-prefill", nargs="?", const="a16w16", default=None, choices=["a16w16", "a16w8", "a8w8"],
                   help="also write the NPU-style int8 prefill graph: static int8 QDQ activations calibrated on "
                        "shipped text, int8 weights, shadow outlier channels in float; a16w16 (default) carries "
                        "activations and weights as two int8 halves (close to float), a8w8 is plain int8")
    c.add_argument("--split-prefill", type=int, nargs="?", const=256, default=None, metavar="C",
                   help="also write split prefill graphs for chunks of C tokens (default 256): per-layer "
                        "linear graphs (an NPU's share) and an attention graph (the CPU's)")
    c.add_argument("--flash", nargs="?", const="q4", default=None, choices=["q4", "fp16"],
                   help="also write the FFN weights as a flash store read on demand under a DRAM budget "
                        "(ffn_flash.bin: one record per neuron, q4 exact for 4-bit sources, or fp16)")
    c.add_argument("--flash-predictor", action="store_true",
                   help="with --flash: also train the low-rank neuron predictors (run/chat/bench --ffn-select predictor)")
    c.add_argument("--trim-layers", type=int, default=None, metavar="N",
                   help="keep N decoder layers (those that change the hidden state most on calibration text)")
    c.add_argument("--trim-heads", type=int, default=None, metavar="H",
                   help="keep H query heads per layer (a multiple of the KV heads; largest mean contribution)")
    c.add_argument("--trim-ffn", type=int, default=None, metavar="N",
                   help="keep N FFN neurons per layer (largest mean contribution, whole 32-neuron groups)")
    c.add_argument("--trim-vocab", type=int, default=None, metavar="V",
                   help="keep V tokens (frequent ones, closed under their merges): tokenizer, embedding and head")
    c.add_argument("--target", default="onnx", metavar="onnx[,coreml][,tflite][,android]",
                   help="what the bundle carries: the ONNX graph (default), and a Core ML model (coreml: needs "
                        "pip install 'ondevice[coreml]') and/or a LiteRT model (tflite: pip install "
                        "'ondevice[tflite]'); their precision follows --quant; android: the graph the Android "
                        "demo app runs (as ondevice export-android)")
    c.add_argument("--force", action="store_true", help="overwrite an existing bundle")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)

    def model_args(sp, sampling=True, speculation=True):
        sp.add_argument("bundle")
        sp.add_argument("--threads", type=int, default=None)
        sp.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle")
        sp.add_argument("--backend", default="onnx", choices=["onnx", "tflite", "coreml"],
                        help="run the bundle's ONNX graph (default), its LiteRT model (convert --target onnx,tflite) "
                             "or its Core ML model (--target onnx,coreml; macOS 15+)")
        sp.add_argument("--profile", default=None, help="device profile (a name in profiles/, a path, or "
                        "'host'): execution providers, prefill chunk and threads come from its plan")
        sp.add_argument("--prefill-chunk", type=int, default=None, metavar="C",
                        help="prefill in fixed chunks of C tokens (static shapes, as for an NPU)")
        sp.add_argument("--int8-prefill", action="store_true",
                        help="prefill in fixed-size chunks through the bundle's int8 graph (convert --int8-prefill); "
                             "decode stays on the float graph")
        sp.add_argument("--dram-budget", default=None, metavar="SIZE",
                        help="keep the FFN weights in the bundle's flash store (convert --flash) and hold at most "
                             "SIZE in DRAM (e.g. 150MB): resident weights plus a window of recent FFN neurons")
        sp.add_argument("--ffn-fraction", type=float, default=None, metavar="F",
                        help="with --dram-budget: the share of FFN neurons each token uses (default 0.8; 1 = all)")
        sp.add_argument("--ffn-select", default="top-k", choices=["top-k", "threshold", "predictor"],
                        help="with --dram-budget: how a token's neurons are chosen: top-k |silu(gate)| (default), "
                             "calibrated per-layer thresholds, or the low-rank predictors (convert --flash-predictor)")
        sp.add_argument("--split-prefill", nargs="?", const="out-of-order", default=None,
                        choices=["out-of-order", "in-order"],
                        help="prefill through the bundle's split graphs (convert --split-prefill): linear "
                             "subgraphs and attention on two workers, out of order (default) or in order")
        if speculation:
            sp.add_argument("--draft", metavar="DRAFT_BUNDLE", default=None,
                            help="speculative decoding with this draft (same tokenizer; output unchanged)")
            sp.add_argument("--lookup", action="store_true",
                            help="speculative decoding with prompt-lookup drafts (output unchanged)")
        if sampling:
            sp.add_argument("--max-tokens", type=int, default=None)
            sp.add_argument("--temperature", type=float, default=None)
            sp.add_argument("--top-k", type=int, default=None)
            sp.add_argument("--top-p", type=float, default=None)
            sp.add_argument("--min-p", type=float, default=None)
            sp.add_argument("--repetition-penalty", type=float, default=None)
            sp.add_argument("--seed", type=int, default=None)

    r = sub.add_parser("run", help="generate from one prompt (streams text, or --json)")
    model_args(r)
    r.add_argument("prompt", nargs="?")
    r.add_argument("--prompt-file")
    r.add_argument("--raw", action="store_true", help="tokenize the prompt as is: no chat template, no BOS")
    r.add_argument("--stop", action="append", help="stop string (repeatable)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_run)

    ch = sub.add_parser("chat", help="interactive chat, streaming, keeps the KV cache between turns")
    model_args(ch)
    ch.add_argument("--system", default=None, help="system prompt")
    ch.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="load time, prefill and decode speed, TTFT, peak RSS")
    model_args(b, sampling=False)
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512, 1024])
    b.add_argument("--decode-tokens", type=int, default=128)
    b.add_argument("--json", action="store_true")
    b.add_argument("--plot", help="write a chart of the figures to this PNG (needs matplotlib)")
    b.add_argument("--compare", help="add the engines of a `benchmarks/compare.py --json` file to the chart")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", help="what a bundle holds")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true")
    i.add_argument("--profile", default=None, help="also show the plan for this device profile (or 'host')")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("verify", help="check a bundle's files against their checksums")
    v.add_argument("bundle")
    v.set_defaults(func=cmd_verify)

    ea = sub.add_parser("export-android", help="add the graph the Android demo app runs (ONNX Runtime 1.17) "
                                                 "to a bundle, and say how to put it on a phone")
    ea.add_argument("bundle")
    ea.set_defaults(func=cmd_export_android)

    pp = sub.add_parser("perplexity", help="perplexity of a text file over non-overlapping windows")
    model_args(pp, sampling=False, speculation=False)
    pp.add_argument("file")
    pp.add_argument("--window", type=int, default=512)
    pp.add_argument("--json", action="store_true")
    pp.set_defaults(func=cmd_perplexity)
    return p


def one_line(error: BaseException) -> str:
    """An error's message on one line (some wrap ONNX Runtime's own, which span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse leaves an optional positional that follows flags (`run B --raw "text"`) unparsed.
    if getattr(args, "prompt", "") is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.prompt, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (OndeviceError, ValueError, OSError) as e:  # OSError: a missing or unreadable file, a directory, ...
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
