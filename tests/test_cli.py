"""The `ondevice` command. In-process through `ondevice.cli.main` on the tiny bundle (fast); the installed
console script once on the real SmolLM2 bundle and once for an error."""

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ondevice.cli import main
from ondevice.tokenizer import load_tokenizer

SAMPLING = ["--max-tokens", "6", "--temperature", "0"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_json_object(out: str) -> dict:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    value = json.loads(lines[0])
    assert isinstance(value, dict)
    return value


# --- run -----------------------------------------------------------------------------------------

def test_run_json_prints_one_object_with_the_documented_keys(capsys, tiny_bundle, tiny_model):
    code, out, _ = cli(capsys, "run", tiny_bundle, "What is the capital of France?", "--json", *SAMPLING)
    assert code == 0
    result = one_json_object(out)
    assert set(result) >= {"token_ids", "text", "prompt_tokens", "ttft_s", "prefill_tok_s", "decode_tok_s"}
    expected = tiny_model.generate("What is the capital of France?", max_tokens=6, temperature=0)
    assert result["token_ids"] == expected.token_ids
    assert result["text"] == expected.text
    assert result["prompt_tokens"] == expected.prompt_tokens


def test_run_streams_the_same_text_as_json(capsys, tiny_bundle):
    _, out, _ = cli(capsys, "run", tiny_bundle, "Hello there", "--json", "--seed", "3", "--max-tokens", "12",
                    "--temperature", "1")
    text = json.loads(out)["text"]
    code, out, _ = cli(capsys, "run", tiny_bundle, "Hello there", "--seed", "3", "--max-tokens", "12",
                       "--temperature", "1")
    assert code == 0
    assert out == text + "\n"


@pytest.mark.parametrize("order", ["prompt-first", "flags-first"])
def test_run_raw_tokenizes_the_prompt_as_given(capsys, tiny_bundle, order):
    text = "The capital of France is"
    argv = ([tiny_bundle, text, "--raw"] if order == "prompt-first" else [tiny_bundle, "--raw", text])
    code, out, _ = cli(capsys, "run", *argv, "--json", *SAMPLING)
    assert code == 0
    raw_ids = load_tokenizer(tiny_bundle).encode(text)  # no special tokens added
    assert one_json_object(out)["prompt_tokens"] == len(raw_ids)

    _, out, _ = cli(capsys, "run", tiny_bundle, text, "--json", *SAMPLING)
    assert one_json_object(out)["prompt_tokens"] > len(raw_ids)  # the chat template wraps it


def test_run_reads_the_prompt_from_a_file(capsys, tiny_bundle, tmp_path):
    text = "Once upon a time,\na small model\n"
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    _, from_arg, _ = cli(capsys, "run", tiny_bundle, "--raw", text, "--json", *SAMPLING)
    code, from_file, _ = cli(capsys, "run", tiny_bundle, "--prompt-file", tmp_path / "prompt.txt", "--raw",
                             "--json", *SAMPLING)
    assert code == 0
    a, b = one_json_object(from_arg), one_json_object(from_file)
    assert a["prompt_tokens"] == b["prompt_tokens"] == len(load_tokenizer(tiny_bundle).encode(text))
    assert a["token_ids"] == b["token_ids"]


def test_run_stop_strings_cut_the_output(capsys, tiny_bundle):
    _, out, _ = cli(capsys, "run", tiny_bundle, "Hello there", "--json", *SAMPLING)
    full = json.loads(out)
    stop = full["text"][1:2]
    assert stop
    _, out, _ = cli(capsys, "run", tiny_bundle, "Hello there", "--json", "--stop", stop, *SAMPLING)
    cut = json.loads(out)
    assert cut["text"] == full["text"][:full["text"].index(stop)]
    assert cut["finish_reason"] == "stop"


# --- perplexity ----------------------------------------------------------------------------------

DIGITS = "12345678901234567"  # 17 tokens: the tiny tokenizer splits digits one per token


@pytest.mark.parametrize("window,expected", [(4, 3 + 3 + 3 + 3), (8, 7 + 7), (16, 15), (17, 16), (64, 16)])
def test_perplexity_scores_len_minus_1_tokens_per_non_overlapping_window(capsys, tiny_bundle, tmp_path,
                                                                          window, expected):
    (tmp_path / "t.txt").write_text(DIGITS)
    assert len(load_tokenizer(tiny_bundle).encode(DIGITS)) == 17
    code, out, _ = cli(capsys, "perplexity", tiny_bundle, tmp_path / "t.txt", "--window", window, "--json")
    assert code == 0
    result = one_json_object(out)
    assert set(result) >= {"perplexity", "tokens"}
    assert result["tokens"] == expected
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1


def test_perplexity_over_one_window_is_exp_of_the_mean_next_token_nll(capsys, tiny_bundle, tiny_model, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. Hello world!"
    (tmp_path / "t.txt").write_text(text)
    ids = tiny_model.tokenizer.encode(text)
    logits = tiny_model.backend.forward(ids, 0, all_logits=True).astype(np.float64)
    tiny_model.reset()
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    _, out, _ = cli(capsys, "perplexity", tiny_bundle, tmp_path / "t.txt", "--window", 128, "--json")
    result = one_json_object(out)
    assert result["tokens"] == len(ids) - 1
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)


# --- inspect, verify, bench ----------------------------------------------------------------------

def test_inspect_describes_the_bundle(capsys, tiny_bundle):
    code, out, _ = cli(capsys, "inspect", tiny_bundle)
    assert code == 0
    assert "architecture  llama" in out and "context       256" in out
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json"):
        assert name in out
    code, out, _ = cli(capsys, "inspect", tiny_bundle, "--json")
    assert code == 0
    assert json.loads(out) == json.loads((tiny_bundle / "manifest.json").read_text())


def test_verify_accepts_a_good_bundle(capsys, tiny_bundle):
    code, out, err = cli(capsys, "verify", tiny_bundle)
    assert code == 0
    assert "OK" in out and err == ""


def test_verify_rejects_a_modified_bundle_with_exit_2_and_the_file_named(capsys, tiny_bundle, copy_bundle):
    bundle = copy_bundle(tiny_bundle)
    data = bytearray((bundle / "model.onnx.data").read_bytes())
    data[100] ^= 1
    (bundle / "model.onnx.data").write_bytes(bytes(data))
    code, out, err = cli(capsys, "verify", bundle)
    assert code == 2
    assert out == ""
    assert err.startswith("error:") and "checksum mismatch for model.onnx.data" in err


def test_bench_json_has_the_documented_keys(capsys, tiny_bundle):
    code, out, _ = cli(capsys, "bench", tiny_bundle, "--json", "--repeat", 1, "--prompt-lengths", 16,
                       "--decode-tokens", 8)
    assert code == 0
    r = one_json_object(out)
    assert set(r) >= {"repeats", "load_s", "prefill_tok_s", "ttft_s", "decode_tok_s", "decode_tokens", "peak_rss_mb"}
    assert r["repeats"] == 1 and r["decode_tokens"] == 8
    assert set(r["prefill_tok_s"]) == {"16"}
    for summary in (r["load_s"], r["prefill_tok_s"]["16"], r["ttft_s"], r["decode_tok_s"]):
        assert set(summary) == {"median", "min", "max"}
        assert 0 < summary["min"] <= summary["median"] <= summary["max"]
    assert r["peak_rss_mb"] > 0


@pytest.mark.parametrize("flags", [["--lookup"], ["--draft", "SELF"], ["--draft", "SELF", "--lookup"]])
def test_run_with_speculation_gives_the_plain_tokens_and_reports_its_stats(capsys, tiny_bundle, tiny_model, flags):
    flags = [str(tiny_bundle) if f == "SELF" else f for f in flags]
    prompt = "Hello there, hello there, hello there"
    code, out, _ = cli(capsys, "run", tiny_bundle, prompt, "--json", "--max-tokens", "24", "--temperature", "0",
                       *flags)
    assert code == 0
    result = one_json_object(out)
    assert result["token_ids"] == tiny_model.generate(prompt, max_tokens=24, temperature=0).token_ids
    assert set(result["speculation"]) >= {"acceptance_rate", "accepted_per_verify", "draft_share", "verify_share"}


def test_bench_with_speculation_reports_it_per_prompt_kind(capsys, tiny_bundle):
    code, out, _ = cli(capsys, "bench", tiny_bundle, "--json", "--repeat", 1, "--prompt-lengths", 16,
                       "--decode-tokens", 8, "--lookup")
    assert code == 0
    r = one_json_object(out)["speculative"]
    assert "chat" in r  # the prompts that fit the tiny model's context
    for kind in r.values():
        assert kind["identical"] is True
        assert set(kind) >= {"plain_tok_s", "speculative_tok_s", "speedup", "acceptance_rate",
                             "accepted_per_verify", "draft_share", "verify_share"}


# --- chat ----------------------------------------------------------------------------------------

def chat(capsys, monkeypatch, bundle, lines: str, *flags):
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    return cli(capsys, "chat", bundle, *SAMPLING, *flags)


def test_chat_answers_each_line_with_the_whole_conversation_as_context(capsys, monkeypatch, tiny_bundle, tiny_model):
    code, out, _ = chat(capsys, monkeypatch, tiny_bundle, "Hello there\n\nWhat is the capital of France?\n")
    assert code == 0
    messages = [{"role": "user", "content": "Hello there"}]
    first = tiny_model.generate(messages, max_tokens=6, temperature=0).text
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is the capital of France?"}]
    second = tiny_model.generate(messages, max_tokens=6, temperature=0).text
    assert out == f"{first}\n{second}\n"


def test_chat_reset_starts_a_new_conversation_and_exit_quits(capsys, monkeypatch, tiny_bundle, tiny_model):
    code, out, _ = chat(capsys, monkeypatch, tiny_bundle,
                        "Hello there\n/reset\nWhat is the capital of France?\n/exit\nnever read\n",
                        "--system", "Be brief.")
    assert code == 0
    system = {"role": "system", "content": "Be brief."}
    first = tiny_model.generate([system, {"role": "user", "content": "Hello there"}], max_tokens=6, temperature=0).text
    second = tiny_model.generate([system, {"role": "user", "content": "What is the capital of France?"}],
                            max_tokens=6, temperature=0).text
    assert out == f"{first}\n{second}\n"


def test_chat_reports_a_turn_that_overflows_the_context_and_goes_on(capsys, monkeypatch, tiny_bundle):
    code, out, err = chat(capsys, monkeypatch, tiny_bundle, "Hello\nHi\n", "--max-tokens", "250")
    assert code == 0
    assert err.count("error:") == 2 and "/reset" in err
    assert "Traceback" not in err


# --- errors --------------------------------------------------------------------------------------

def test_errors_exit_2_with_a_message_and_no_traceback(capsys, tiny_bundle, tiny_gguf, tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "t.txt").write_text("hello world")
    cases = [
        ["run", tmp_path / "no-such.bundle", "hi"],
        ["run", tiny_bundle, "hi", "--top-p", "2"],
        ["run", tiny_bundle, "hi", "--max-tokens", "100000"],
        ["run", tiny_bundle, "--prompt-file", tmp_path / "missing.txt"],
        ["run", tiny_bundle, "--prompt-file", tmp_path / "adir", *SAMPLING],
        ["perplexity", tiny_bundle, tmp_path / "t.txt", "--window", "100000"],
        ["perplexity", tiny_bundle, tmp_path / "adir"],
        ["inspect", tmp_path / "adir"],
        ["verify", tmp_path / "adir"],
        ["convert", tmp_path / "missing.gguf", tmp_path / "out", "--quiet"],
        ["convert", tiny_gguf, tiny_bundle, "--quiet"],
    ]
    for argv in cases:
        code, out, err = cli(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("error:") and "Traceback" not in err, (argv, err)


# --- the installed console script ----------------------------------------------------------------

def console_script() -> str:
    found = Path(sys.executable).with_name("ondevice")
    return str(found) if found.exists() else (shutil.which("ondevice") or pytest.skip("no `ondevice` script"))


def test_console_script_errors_exit_2_without_a_traceback(tmp_path):
    proc = subprocess.run([console_script(), "verify", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "not a bundle" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_console_script_answers_with_the_real_smollm2(smollm2_bundle):
    proc = subprocess.run([console_script(), "run", str(smollm2_bundle), "What is the capital of France?",
                           "--json", "--max-tokens", "12", "--temperature", "0"],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    result = one_json_object(proc.stdout)
    assert "Paris" in result["text"]
    assert len(result["token_ids"]) <= 12 and result["prompt_tokens"] > 7


def test_bench_with_a_phone_profile_falls_back_to_the_cpu_and_says_so(capsys, tiny_bundle):
    from ondevice.profiles import load_profile, plan

    expected = plan(load_profile("snapdragon-8gen3-phone"))
    code, out, _ = cli(capsys, "bench", tiny_bundle, "--json", "--repeat", 1, "--prompt-lengths", 16,
                       "--decode-tokens", 8, "--profile", "snapdragon-8gen3-phone")
    assert code == 0
    r = one_json_object(out)
    assert r["providers"] == ["CPUExecutionProvider"]  # no QNN/XNNPACK in this onnxruntime build
    assert r["prefill_chunk"] == expected.prefill_chunk
    assert any("falling back" in line for line in r["provider_fallbacks"])
    assert set(r["node_placement"]) == {"CPUExecutionProvider"} and r["node_placement"]["CPUExecutionProvider"] > 10


def test_inspect_with_a_profile_shows_the_plan(capsys, tiny_bundle):
    code, out, _ = cli(capsys, "inspect", tiny_bundle, "--json", "--profile", "host")
    assert code == 0
    plan = json.loads(out)["plan"]
    assert plan["providers"][-1] == "CPUExecutionProvider" and plan["threads"] >= 1
