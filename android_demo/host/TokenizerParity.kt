package dev.ondevice.demo.host

import dev.ondevice.demo.Json
import dev.ondevice.demo.StreamDetokenizer
import dev.ondevice.demo.Tokenizer
import dev.ondevice.demo.TokenizerException
import java.io.File

/**
 * Host check of the Kotlin tokenizer against Python `tokenizers`:
 *
 *     TokenizerParity tokenizer.json inputs.json [out.json] [--bench text.txt]
 *
 * inputs.json is a JSON list of strings (encoded, then decoded) or lists of ids (only decoded).
 * Writes (to out.json or stdout) a JSON list with, per input, `ids`, `decoded` (decode),
 * `decoded_skip` (decode skipping specials), and `streamed` / `streamed_skip` (the same through
 * StreamDetokenizer, one id at a time). With --bench, encodes the
 * text repeatedly and prints one JSON line with the timings to stderr. A tokenizer.json the Kotlin
 * tokenizer rejects exits with status 3 and the TokenizerException message on stderr.
 */
fun main(args: Array<String>) {
    val positional = ArrayList<String>()
    var benchPath: String? = null
    var i = 0
    while (i < args.size) {
        if (args[i] == "--bench" && i + 1 < args.size) {
            benchPath = args[i + 1]
            i += 2
        } else {
            positional.add(args[i++])
        }
    }
    if (positional.size !in 2..3) {
        System.err.println("usage: TokenizerParity tokenizer.json inputs.json [out.json] [--bench text.txt]")
        System.exit(2)
    }
    val t0 = System.nanoTime()
    val tok = try {
        Tokenizer.fromFile(File(positional[0]))
    } catch (e: TokenizerException) {
        System.err.println("TokenizerException: ${e.message}")
        System.exit(3)
        return
    }
    val loadMs = (System.nanoTime() - t0) / 1e6
    val inputs = Json.parse(File(positional[1]).readText(Charsets.UTF_8)) as List<*>
    val results = ArrayList<Any?>()
    for (item in inputs) {
        val ids = if (item is List<*>) IntArray(item.size) { (item[it] as Long).toInt() } else tok.encode(item as String)
        results.add(check(tok, ids))
    }
    val json = Json.write(results)
    if (positional.size == 3) File(positional[2]).writeText(json, Charsets.UTF_8) else println(json)
    if (benchPath != null) bench(tok, File(benchPath).readText(Charsets.UTF_8), loadMs)
}

private fun check(tok: Tokenizer, ids: IntArray): Map<String, Any?> {
    val out = LinkedHashMap<String, Any?>()
    out["ids"] = ids
    out["decoded"] = tok.decode(ids)
    out["decoded_skip"] = tok.decode(ids, skipSpecial = true)
    out["streamed"] = stream(tok, ids, false)
    out["streamed_skip"] = stream(tok, ids, true)
    return out
}

private fun stream(tok: Tokenizer, ids: IntArray, skipSpecial: Boolean): String {
    val d = StreamDetokenizer(tok, skipSpecial)
    val sb = StringBuilder()
    for (id in ids) sb.append(d.push(id))
    sb.append(d.flush())
    return sb.toString()
}

/** Tokens/s of encode on [text]: the first (cold-cache) run, then the best of several warm runs. */
private fun bench(tok: Tokenizer, text: String, loadMs: Double) {
    var t = System.nanoTime()
    val n = tok.encode(text).size
    val coldS = (System.nanoTime() - t) / 1e9
    var best = Double.MAX_VALUE
    for (r in 0 until 10) {
        t = System.nanoTime()
        tok.encode(text)
        best = Math.min(best, (System.nanoTime() - t) / 1e9)
    }
    val report = LinkedHashMap<String, Any?>()
    report["load_ms"] = loadMs
    report["tokens"] = n
    report["chars"] = text.length
    report["cold_tokens_per_s"] = n / coldS
    report["warm_tokens_per_s"] = n / best
    System.err.println("BENCH " + Json.write(report))
}
