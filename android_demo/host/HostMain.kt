package dev.ondevice.demo.host

import dev.ondevice.demo.Json
import dev.ondevice.demo.Message
import dev.ondevice.demo.Model
import dev.ondevice.demo.ModelException
import dev.ondevice.demo.NativeBridge
import dev.ondevice.demo.Settings
import dev.ondevice.demo.TokenListener
import java.io.File

/** Runs the app's generation path (Kotlin tokenizer, chat format, loop, C bridge) on the host JVM.
 *  Reads a job (JSON): {"bundle": dir, "profile": path?, "runs": [{"messages": [...] | "raw": text,
 *  "max_tokens": n, "temperature": t, "cancel_after": k?, "reset": bool?}]} and prints one JSON object
 *  with each run's prompt ids, generated ids, streamed text and stats. Runs share the model (chat turns). */
fun main(args: Array<String>) {
    try {
        run(args[0])
    } catch (e: ModelException) {  // what the app shows the user: a message, not a crash
        println(Json.write(mapOf("error" to e.message)))
        System.exit(3)
    }
}

private fun run(jobFile: String) {
    val job = Json.parse(File(jobFile).readText()) as Map<*, *>
    val profile = (job["profile"] as? String)?.let { File(it).readText() }
    val loadStart = System.nanoTime()
    val model = Model.open(File(job["bundle"] as String), profile, verify = job["verify"] == true)
    val loadMs = (System.nanoTime() - loadStart) / 1e6
    val results = ArrayList<Any?>()
    for (r in job["runs"] as List<*>) {
        val run = r as Map<*, *>
        if (run["reset"] == true) model.reset()
        val settings = Settings()
        settings.maxTokens = (run["max_tokens"] as Long).toInt()
        settings.temperature = ((run["temperature"] as? Number)?.toFloat()) ?: 0f
        val cancelAfter = (run["cancel_after"] as? Long)?.toInt() ?: -1
        val messages = (run["messages"] as? List<*>)?.map { val m = it as Map<*, *>; Message(m["role"] as String, m["content"] as String) }
        val prompt = if (messages != null) model.encodePrompt(model.info.chat.render(messages))
                     else model.encodePrompt(run["raw"] as String)
        val ids = ArrayList<Int>()
        val text = StringBuilder()
        val pieces = ArrayList<String>()
        val listener = object : TokenListener {
            override fun onText(piece: String) { text.append(piece); pieces.add(piece) }
            override fun isCancelled(): Boolean = cancelAfter in 0..ids.size
        }
        val stats = model.generate(prompt, settings, listener) { ids.add(it) }
        val out = LinkedHashMap<String, Any?>()
        out["prompt_ids"] = prompt.toList()
        if (messages != null) out["rendered"] = model.info.chat.render(messages)
        out["ids"] = ids
        out["text"] = text.toString()
        out["pieces"] = pieces.size
        out["prefilled"] = stats.prefilledTokens
        out["ttft_ms"] = stats.ttftMs
        out["prefill_tok_s"] = stats.prefillTokPerS
        out["decode_tok_s"] = stats.decodeTokPerS
        out["finish"] = stats.finishReason
        results.add(out)
    }
    val report = LinkedHashMap<String, Any?>()
    report["ort_version"] = NativeBridge.ortVersion()
    report["providers"] = model.providers
    report["skipped_providers"] = model.skippedProviders
    report["load_ms"] = loadMs
    report["runs"] = results
    model.close()
    println(Json.write(report))
}
