"""The Android demo's Kotlin tokenizer (android_demo/src/dev/ondevice/demo/Tokenizer.kt) gives the same
ids and text as Python `tokenizers` on the real SmolLM2 tokenizer.json (byte-level BPE) and on Gemma 3's
(SentencePiece-style BPE with byte fallback, as the converter rebuilds it from the GGUF).

Json.kt + Tokenizer.kt + host/TokenizerParity.kt are compiled once per session with the Debian kotlinc
from the Android toolchain (~10 s) and run on the host JVM. Without the toolchain the tests skip,
except under CI=true, where they fail. The Gemma tests also skip without the Gemma 3 GGUF, like
tests/test_gemma3.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from android_host import need_toolchain, toolchain_var
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "android_demo"
SOURCES = [DEMO / "src/dev/ondevice/demo/Json.kt", DEMO / "src/dev/ondevice/demo/Tokenizer.kt",
           DEMO / "host/TokenizerParity.kt"]
MAIN_CLASS = "dev.ondevice.demo.host.TokenizerParityKt"

LONG_PARAGRAPH = (
    "Small language models can run entirely on a phone: the weights are quantized to four bits, the "
    "key/value cache is kept in a fixed ring buffer, and the tokenizer, which turns text into integer ids "
    "and back, has to agree byte for byte with the one the model was trained with. If it does not, the "
    "model sees sequences it has never seen before, and its answers degrade in ways that are hard to "
    "notice: a missing space here, a split number there. That is why this test compares every id. "
) * 6

STRINGS = [
    "",
    "Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, but we'd've known. DON'T SHOUT'S",
    "def main():\n    x = 42\n    return x  *  2\n",
    "if (a && b) {\n\treturn foo(bar, 'baz');\n}\n",
    "    indented with four spaces\n        and eight\n",
    "x =     12345 + 678",
    "  12345",
    "1. First item\n2. Second item\n10. Tenth item",
    "Version 3.14.159, port 8080, 2024-12-31T23:59:59Z",
    "Price: $1,234.56 (≈ €1.100) — 50% off!",
    "emoji 😀🎉👍 done",
    "family 👩‍👩‍👧‍👦 and 👨🏽‍💻 at work",
    "flags 🇫🇷🇯🇵🇺🇸 and 🏳️‍🌈",
    "中文字符测试，你好世界。",
    "日本語のテキストです。カタカナとひらがな",
    "한국어 문장입니다",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "Привет, мир! Как дела?",
    "Ελληνικά: Ωμέγα αβγ",
    "Crème brûlée, naïve café, São Paulo, Zürich, Łódź, Ångström",
    "tabs\there\tand\tthere",
    "line one\nline two\r\nline three\rend",
    "trailing spaces   ",
    "   leading spaces",
    "\n\n\nthree newlines first",
    "mixed \t \n whitespace \u00a0 nbsp \u3000 ideographic \u2003 em",
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text before <|im_end|> text after<|endoftext|>",
    "almost special <|im_start| and <im_end|> and <|unknown|>",
    "<repo_name>ondevice<file_sep>tokenizer.py<filename>x.py",
    "superscripts x² y³ ½ ¼ Ⅻ ٣٤٥ ०१२",
    "punctuation!!! ??? ... --- *** ### @@@ \"quoted\" 'single'",
    "https://example.com/path?query=1&b=two#frag",
    "snake_case_name camelCaseName SCREAMING_CASE kebab-case",
    "a" * 300,
    " " * 17 + "x",
    "=" * 64,
    "math: ∑_{i=1}^{n} i = n(n+1)/2, ∀x ∈ ℝ, √2 ≈ 1.414",
    "zero\u200bwidth joiner\u200d and bom \ufeff here",
    "control \x00\x01\x1f chars",
    LONG_PARAGRAPH,
]


@pytest.fixture(scope="session")
def parity_classpath(request, tmp_path_factory) -> str:
    """Classpath of the compiled host program (the three Kotlin files + kotlin-stdlib). When Gemma
    tests are selected, their tokenizer.json is built meanwhile (both take ~10 s)."""
    need_toolchain()
    kotlinc, stdlib = toolchain_var("KOTLINC") or "kotlinc", toolchain_var("KOTLIN_STDLIB")
    if any("gemma_tokenizer_json" in getattr(item, "fixturenames", ()) for item in request.session.items):
        build, _ = _gemma_build(tmp_path_factory)
        request.addfinalizer(lambda: build.poll() is None and build.kill())  # a session cut short
    jar = tmp_path_factory.mktemp("kotlin-tokenizer") / "parity.jar"
    proc = subprocess.run([kotlinc, "-no-reflect", "-jvm-target", "1.6", *map(str, SOURCES), "-d", str(jar)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"kotlinc failed:\n{proc.stderr}"
    return f"{jar}{os.pathsep}{stdlib}"


def run_parity(classpath: str, tokenizer_json: Path, strings: list[str], workdir: Path,
               bench_text: str | None = None) -> tuple[list[dict], dict | None]:
    """Runs TokenizerParity; returns its per-string results and its --bench report (or None)."""
    inputs, output = workdir / "inputs.json", workdir / "results.json"
    inputs.write_text(json.dumps(strings), encoding="utf-8")
    cmd = ["java", "-cp", classpath, MAIN_CLASS, str(tokenizer_json), str(inputs), str(output)]
    if bench_text is not None:
        bench = workdir / "bench.txt"
        bench.write_text(bench_text, encoding="utf-8")
        cmd += ["--bench", str(bench)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"TokenizerParity failed ({proc.returncode}):\n{proc.stderr}"
    report = None
    for line in proc.stderr.splitlines():
        if line.startswith("BENCH "):
            report = json.loads(line[len("BENCH "):])
    return json.loads(output.read_text(encoding="utf-8")), report


def bench_text() -> str:
    """~200 KB of English, Python and Markdown: the repository's own sources plus the test strings."""
    files = sorted((ROOT / "ondevice").glob("*.py")) + [ROOT / "README.md"]
    return "\n".join([*STRINGS, *(f.read_text(encoding="utf-8") for f in files)])


def python_tokens_per_s(tokenizer_json: Path, text: str) -> tuple[float, float]:
    """(cold, best warm) tokens/s of `tokenizers` on text, measured like the JVM --bench."""
    tok = Tokenizer.from_file(str(tokenizer_json))
    t = time.perf_counter()
    n = len(tok.encode(text, add_special_tokens=False).ids)
    cold = n / (time.perf_counter() - t)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        tok.encode(text, add_special_tokens=False)
        best = min(best, time.perf_counter() - t)
    return cold, n / best


@pytest.fixture(scope="module")
def tokenizer_json(smollm2_bundle) -> Path:
    path = smollm2_bundle / "tokenizer.json"
    assert path.is_file(), f"{smollm2_bundle} has no tokenizer.json"
    return path


@pytest.fixture(scope="module")
def kotlin_run(parity_classpath, tokenizer_json, tmp_path_factory):
    return run_parity(parity_classpath, tokenizer_json, STRINGS, tmp_path_factory.mktemp("parity"),
                      bench_text=bench_text())


@pytest.fixture(scope="module")
def reference(tokenizer_json) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_json))


def _mismatches(pairs) -> str:
    return "\n".join(f"  {s!r:.80}: kotlin {k!r:.200} != python {p!r:.200}" for s, k, p in pairs[:10])


def test_encode_matches_tokenizers(kotlin_run, reference, tokenizer_json):
    results, report = kotlin_run
    assert len(results) == len(STRINGS) >= 40
    expected = [reference.encode(s, add_special_tokens=False).ids for s in STRINGS]
    bad = [(s, r["ids"], e) for s, r, e in zip(STRINGS, results, expected) if r["ids"] != e]
    print(f"\nencode parity: {len(STRINGS) - len(bad)}/{len(STRINGS)} strings")
    assert not bad, f"{len(bad)}/{len(STRINGS)} strings tokenize differently:\n{_mismatches(bad)}"

    py_cold, py_warm = python_tokens_per_s(tokenizer_json, bench_text())
    print(f"encode speed on {report['chars']} chars ({report['tokens']} tokens): "
          f"JVM cold {report['cold_tokens_per_s']:,.0f} tok/s, warm {report['warm_tokens_per_s']:,.0f} tok/s; "
          f"Python tokenizers cold {py_cold:,.0f} tok/s, warm {py_warm:,.0f} tok/s; "
          f"JVM tokenizer.json load {report['load_ms']:.0f} ms")
    assert report["tokens"] == len(reference.encode(bench_text(), add_special_tokens=False).ids)


@pytest.mark.parametrize("skip_special", [False, True])
def test_decode_matches_tokenizers(kotlin_run, reference, skip_special):
    results, _ = kotlin_run
    key = "decoded_skip" if skip_special else "decoded"
    bad = [(s, r[key], reference.decode(r["ids"], skip_special_tokens=skip_special))
           for s, r in zip(STRINGS, results)]
    bad = [b for b in bad if b[1] != b[2]]
    assert not bad, f"decode differs:\n{_mismatches(bad)}"


@pytest.mark.parametrize("skip_special", [False, True])
def test_stream_detokenizer_equals_decode(kotlin_run, reference, skip_special):
    """push() of each id, one at a time, then flush(), concatenated, is the whole decode."""
    results, _ = kotlin_run
    key = "streamed_skip" if skip_special else "streamed"
    bad = [(s, r[key], reference.decode(r["ids"], skip_special_tokens=skip_special))
           for s, r in zip(STRINGS, results)]
    bad = [b for b in bad if b[1] != b[2]]
    assert not bad, f"streamed text differs from decode:\n{_mismatches(bad)}"


# Added tokens with the flags SmolLM2's own tokens don't use (all of them are special, unstripped,
# non-normalized), checked against the library on the same vocabulary.
EXTRA_TOKENS = [
    ("<L>", {"lstrip": True}),
    ("<R>", {"rstrip": True}),
    ("<LR>", {"lstrip": True, "rstrip": True}),
    ("word", {"single_word": True}),
    ("<N>", {"normalized": True}),
    ("hello", {"normalized": True, "special": False}),
    ("<|im_end|>x", {}),
    ("ĠĠ", {"special": False}),  # already in the vocabulary: keeps its vocabulary id
]
FLAG_STRINGS = [
    "a  <L>b", "a <R>  b", " \t<LR>\n c", "<L><L>  <L>", "word words sword word_ word1 wordé -word- 'word'",
    "x<N>y hello helloworld", "<|im_end|>x <|im_end|>", "ĠĠ  Ā", " <R> <L> ", "a\u00a0<L>\u3000<R>\u2003z",
    "  <|im_start|>  ",
]


def test_added_token_flags_match_tokenizers(parity_classpath, tokenizer_json, tmp_path):
    config = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    next_id = len(config["model"]["vocab"])
    for content, flags in EXTRA_TOKENS:
        config["added_tokens"].append({"id": next_id, "content": content, "single_word": False, "lstrip": False,
                                       "rstrip": False, "normalized": False, "special": True, **flags})
        next_id += 1
    path = tmp_path / "flags.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    reference = Tokenizer.from_file(str(path))
    results, _ = run_parity(parity_classpath, path, FLAG_STRINGS, tmp_path)
    for s, r in zip(FLAG_STRINGS, results):
        ids = reference.encode(s, add_special_tokens=False).ids
        assert r["ids"] == ids, s
        assert r["decoded"] == reference.decode(ids, skip_special_tokens=False), s
        assert r["decoded_skip"] == reference.decode(ids, skip_special_tokens=True), s


@pytest.mark.parametrize("section, value, message", [
    ("normalizer", {"type": "NFC"}, "normalizer"),
    ("pre_tokenizer", {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
     "pre-tokenizer 'Metaspace' is not supported"),
    ("decoder", {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
     "decoder 'Metaspace' is not supported"),
    ("model", {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0]]}, "model type 'Unigram' is not supported"),
])
def test_unsupported_configs_are_rejected(parity_classpath, tokenizer_json, tmp_path, section, value, message):
    config = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    config[section] = value
    path = tmp_path / "unsupported.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "inputs.json").write_text("[]", encoding="utf-8")
    proc = subprocess.run(["java", "-cp", parity_classpath, MAIN_CLASS, str(path), str(tmp_path / "inputs.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "TokenizerException" in proc.stderr and message in proc.stderr


# --- Gemma 3: SentencePiece-style BPE --------------------------------------------------------------
# normalizer Replace(" " -> "▁"), no pre-tokenizer (the text between added tokens is one word), BPE
# with byte_fallback, decoder Replace("▁" -> " ") + ByteFallback + Fuse, added tokens for runs of
# spaces, tabs and newlines. The tokenizer.json is the converter's own (tokenizer_json_from_gguf on
# the GGUF), without converting the model.

GEMMA_LONG = (LONG_PARAGRAPH + "Ein Absatz auf Deutsch, 中文的一段话，une phrase en français, 😀 и по-русски. " * 6
              + LONG_PARAGRAPH[:1500])
# Characters Gemma's vocabulary lacks, so they become <0xNN> byte tokens.
BYTE_FALLBACK = "𝔘𝔫𝔦 ꙮ 𓀀𓀁 ᚠᛇᚻ ߒߞߏ 𐌰𐌱 \U000e0041 \u0378 \U0010ffff"

GEMMA_STRINGS = STRINGS + [
    "<start_of_turn>user\nHi<end_of_turn>\n",
    "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><unk><mask>[multimodal]<start_of_image><end_of_image><unused0>",
    "almost special <start_of_turn <end_of_turn> x<eos>y",
    "html <b>bold</b> <table><tr><td>x</td></tr></table> <h1>T</h1>",
    BYTE_FALLBACK,
    "mixed " + BYTE_FALLBACK[:6] + "text" + BYTE_FALLBACK[-3:] + "end",
    "spaces  two   three    four\t\ttabs\n\n\n\nnewlines" + " " * 40 + "x" + "\t" * 35 + "y" + "\n" * 33,
    "\x00 NUL, \x7f DEL, \x1b[31mred\x1b[0m, \x0b\x0c",
    "literal ▁ lower blocks ▁▁x▁ and <0x41> and <0xZZ> text",
    GEMMA_LONG,
]

# Gemma's tokenizer.json comes from the GGUF as the converter makes it (tokenizer_json_from_gguf), in a
# separate process (~13 s, most of it gguf's GGUFReader) started while kotlinc compiles.
_GEMMA_BUILD_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from models import gemma3_gguf_path
from ondevice.converters.sources.gguf import open_gguf
from ondevice.converters.sources.gguf_tokenizer import tokenizer_json_from_gguf
gguf_path = gemma3_gguf_path()
if gguf_path is None:
    sys.exit(10)
Path(sys.argv[1]).write_text(tokenizer_json_from_gguf(open_gguf(gguf_path)), encoding="utf-8")
"""
_GEMMA_BUILD: dict[str, tuple[subprocess.Popen, Path]] = {}


def _gemma_build(tmp_path_factory) -> tuple[subprocess.Popen, Path]:
    """The process building Gemma's tokenizer.json, started once per session, and its output path."""
    if "build" not in _GEMMA_BUILD:
        out = tmp_path_factory.mktemp("gemma-tokenizer") / "tokenizer.json"
        proc = subprocess.Popen([sys.executable, "-c", _GEMMA_BUILD_SCRIPT, str(out), str(ROOT / "tests")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _GEMMA_BUILD["build"] = (proc, out)
    return _GEMMA_BUILD["build"]


@pytest.fixture(scope="session")
def gemma_tokenizer_json(tmp_path_factory) -> Path:
    from models import GEMMA3_PIP

    proc, out = _gemma_build(tmp_path_factory)
    stdout, stderr = proc.communicate(timeout=600)
    if proc.returncode == 10:
        pytest.skip(f"needs the real model: {GEMMA3_PIP}")
    assert proc.returncode == 0, f"building Gemma's tokenizer.json failed:\n{stdout}{stderr}"
    return out


@pytest.fixture(scope="session")
def gemma_reference(gemma_tokenizer_json) -> Tokenizer:
    return Tokenizer.from_file(str(gemma_tokenizer_json))


def gemma_id_sequences(ref: Tokenizer) -> list[list[int]]:
    """Ids to decode as they are: byte tokens forming invalid UTF-8 (lone continuation bytes,
    truncated, overlong, surrogates, > U+10FFFF, a valid character run together with a broken one),
    runs split by a special token (joined when it is skipped), unknown ids, and random sequences."""
    import random

    def b(*values):
        return [ref.token_to_id(f"<0x{v:02X}>") for v in values]

    tid = ref.token_to_id
    sot, eot, hello = tid("<start_of_turn>"), tid("<end_of_turn>"), ref.encode("Hello", add_special_tokens=False).ids
    size = ref.get_vocab_size()
    seqs = [
        b(0x80), b(0xE4, 0xB8) + hello, b(0xC3, 0xA9, 0xE4) + hello, hello + b(0xF0, 0x9F),
        b(0xE4) + [sot] + b(0xB8, 0xAD) + hello, b(0xC0, 0x80), b(0xED, 0xA0, 0x80), b(0xF4, 0x90, 0x80, 0x80),
        b(0xF0, 0x9F, 0x98, 0x80) + [eot] + b(0xF0, 0x9F, 0x98, 0x80, 0xFF), [tid("▁"), tid("  ")] + hello + [size + 5],
        [tid("▁"), tid("▁")] + b(0x41, 0xE2, 0x96, 0x81) + [sot, tid("▁")] + hello,
    ]
    assert all(i is not None for seq in seqs for i in seq)
    rng = random.Random(0)
    byte_ids = b(*range(256))
    for _ in range(6):
        seqs.append([rng.randrange(size) for _ in range(60)])
    for _ in range(6):  # mostly byte tokens, some UTF-8 lead/continuation structure by chance
        seqs.append([rng.choice(byte_ids) if rng.random() < 0.7 else rng.randrange(size) for _ in range(60)])
    return seqs


@pytest.fixture(scope="session")
def gemma_run(parity_classpath, gemma_tokenizer_json, gemma_reference, tmp_path_factory):
    """TokenizerParity on GEMMA_STRINGS, then on gemma_id_sequences (decode only), in one JVM."""
    seqs = gemma_id_sequences(gemma_reference)
    results, report = run_parity(parity_classpath, gemma_tokenizer_json, [*GEMMA_STRINGS, *seqs],
                                 tmp_path_factory.mktemp("gemma-parity"), bench_text=bench_text())
    return results[:len(GEMMA_STRINGS)], list(zip(seqs, results[len(GEMMA_STRINGS):])), report


def test_gemma_encode_matches_tokenizers(gemma_run, gemma_reference, trimmed_gemma):
    results, _, report = gemma_run
    assert len(results) == len(GEMMA_STRINGS) >= 40 and 4500 <= len(GEMMA_LONG) <= 6000
    config = json.loads(trimmed_gemma)
    assert config["pre_tokenizer"] is None and config["model"]["byte_fallback"] is True
    expected = [gemma_reference.encode(s, add_special_tokens=False) for s in GEMMA_STRINGS]
    assert any(t.startswith("<0x") for t in expected[GEMMA_STRINGS.index(BYTE_FALLBACK)].tokens)
    bad = [(s, r["ids"], e.ids) for s, r, e in zip(GEMMA_STRINGS, results, expected) if r["ids"] != e.ids]
    print(f"\nGemma encode parity: {len(GEMMA_STRINGS) - len(bad)}/{len(GEMMA_STRINGS)} strings")
    assert not bad, f"{len(bad)}/{len(GEMMA_STRINGS)} strings tokenize differently:\n{_mismatches(bad)}"

    print(f"Gemma encode speed on {report['chars']} chars ({report['tokens']} tokens): "
          f"JVM cold {report['cold_tokens_per_s']:,.0f} tok/s, warm {report['warm_tokens_per_s']:,.0f} tok/s; "
          f"JVM tokenizer.json load {report['load_ms']:.0f} ms")
    assert report["tokens"] == len(gemma_reference.encode(bench_text(), add_special_tokens=False).ids)


@pytest.mark.parametrize("key, skip_special", [("decoded", False), ("decoded_skip", True),
                                               ("streamed", False), ("streamed_skip", True)])
def test_gemma_decode_and_stream_match_tokenizers(gemma_run, gemma_reference, key, skip_special):
    """decode, and StreamDetokenizer's push() of each id then flush(), equal `tokenizers` decode, on the
    strings' ids and on raw id sequences (invalid byte runs: one U+FFFD per byte of the run)."""
    results, sequences, _ = gemma_run
    cases = [(s, r) for s, r in zip(GEMMA_STRINGS, results)] + [(f"ids {ids[:8]}...", r) for ids, r in sequences]
    bad = [(s, r[key], gemma_reference.decode(r["ids"], skip_special_tokens=skip_special)) for s, r in cases]
    bad = [x for x in bad if x[1] != x[2]]
    print(f"\nGemma {key}: {len(cases) - len(bad)}/{len(cases)} equal")
    assert not bad, f"{len(bad)}/{len(cases)} differ:\n{_mismatches(bad)}"


@pytest.fixture(scope="session")
def trimmed_gemma(gemma_tokenizer_json) -> str:
    """Gemma's tokenizer.json (as JSON text) cut to ids < 20000, merges among kept tokens only:
    the same configuration, fast to load."""
    config = json.loads(gemma_tokenizer_json.read_text(encoding="utf-8"))
    model = config["model"]
    vocab = model["vocab"] = {t: i for t, i in model["vocab"].items() if i < 20000}
    model["merges"] = [[a, b] for a, b in model["merges"] if a in vocab and b in vocab and a + b in vocab]
    config["added_tokens"] = [t for t in config["added_tokens"] if t["id"] < 20000]
    return json.dumps(config)


SP_EXTRA_TOKENS = [
    ("a b", {"normalized": True}),                      # matched as "a▁b"; decoded from "a▁b" (not skipped)
    ("<N>", {"normalized": True}),
    ("hello world", {"normalized": True, "special": False}),
    ("<NL>", {"normalized": True, "lstrip": True}),     # "▁" is no whitespace: nothing to strip
    ("<L>", {"lstrip": True}),
    ("<R>", {"rstrip": True}),
    ("word", {"single_word": True}),
]
SP_STRINGS = ["x a b y a  b a b", "hello world helloworld hello  world", "a <L>b a <NL>b  <NL>", "<R>  b <R>\tc",
              "word words sword word_ word", "a b<N>a b <N> ", "𝔘𝔫 ꙮꙮ x 𝔘 ꙮ", "The quick brown fox", ""]


@pytest.mark.parametrize("variant", ["added_token_flags", "unk_fused", "unk_unfused", "no_unk", "ignore_merges"])
def test_sentencepiece_variants_match_tokenizers(parity_classpath, trimmed_gemma, tmp_path, variant):
    """What Gemma's file does not use, on its configuration with a trimmed vocabulary: added tokens with
    normalized=true (matched in the normalized text by their normalized content) and the other flags;
    unk instead of byte fallback (fused or not, or no unk token: dropped); ignore_merges."""
    config = json.loads(trimmed_gemma)
    model = config["model"]
    if variant == "added_token_flags":
        next_id = len(model["vocab"])
        for content, flags in SP_EXTRA_TOKENS:
            config["added_tokens"].append({"id": next_id, "content": content, "single_word": False, "lstrip": False,
                                           "rstrip": False, "normalized": False, "special": True, **flags})
            next_id += 1
    elif variant == "ignore_merges":
        model["ignore_merges"] = True
    else:
        model["byte_fallback"] = False
        model["fuse_unk"] = variant == "unk_fused"
        if variant == "no_unk":
            model["unk_token"] = None
    path = tmp_path / f"{variant}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    reference = Tokenizer.from_file(str(path))
    results, _ = run_parity(parity_classpath, path, SP_STRINGS + STRINGS[:12], tmp_path)
    for s, r in zip(SP_STRINGS + STRINGS[:12], results):
        ids = reference.encode(s, add_special_tokens=False).ids
        assert r["ids"] == ids, s
        for key, skip in [("decoded", False), ("decoded_skip", True), ("streamed", False), ("streamed_skip", True)]:
            assert r[key] == reference.decode(ids, skip_special_tokens=skip), (s, key)


@pytest.mark.parametrize("section, value, message", [
    ("normalizer", {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
     "normalizer 'Prepend' is not supported"),
    ("normalizer", {"type": "Replace", "pattern": {"Regex": " +"}, "content": "▁"}, "only {\"String\": ...}"),
    # what the converter writes for SentencePiece GGUFs with add_space_prefix (Llama 2), not Gemma 3
    ("decoder", {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                  {"type": "ByteFallback"}, {"type": "Fuse"},
                                                  {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
     "decoder 'Strip' is not supported"),
    ("decoder", {"type": "Sequence", "decoders": [{"type": "ByteFallback"},
                                                  {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}]},
     "decoder Replace after ByteFallback is not supported"),
])
def test_unsupported_sentencepiece_configs_are_rejected(parity_classpath, trimmed_gemma, tmp_path, section, value,
                                                        message):
    config = json.loads(trimmed_gemma)
    config[section] = value
    path = tmp_path / "unsupported.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "inputs.json").write_text("[]", encoding="utf-8")
    proc = subprocess.run(["java", "-cp", parity_classpath, MAIN_CLASS, str(path), str(tmp_path / "inputs.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "TokenizerException" in proc.stderr and message in proc.stderr
