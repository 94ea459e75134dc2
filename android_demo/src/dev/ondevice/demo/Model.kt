package dev.ondevice.demo

import java.io.File
import java.io.FileInputStream
import java.security.MessageDigest

class ModelException(message: String) : RuntimeException(message)

interface TokenListener {
    fun onText(piece: String)
    fun isCancelled(): Boolean
}

class Stats(val promptTokens: Int, val prefilledTokens: Int, val generatedTokens: Int, val ttftMs: Double,
            val prefillTokPerS: Double, val decodeTokPerS: Double, val finishReason: String) {
    override fun toString(): String = "prompt $promptTokens tokens ($prefilledTokens prefilled), $generatedTokens new, " +
        "TTFT ${"%.0f".format(ttftMs)} ms, prefill ${"%.1f".format(prefillTokPerS)} tok/s, " +
        "decode ${"%.1f".format(decodeTokPerS)} tok/s, $finishReason"
}

/** What the app needs of a bundle's manifest.json (the same contract the Python runtime reads):
 *  backends.android (converters/export_android.py), the tokenizer section, every file's size and sha256. */
class BundleInfo(val dir: File, manifest: Map<String, Any?>) {
    val name: String
    val graph: File
    val tokenizerFile: File
    val layers: Int
    val kvHeads: Int
    val headDim: Int
    val vocab: Int
    val maxContext: Int
    val chat: ChatFormat
    val bosId: Int?
    val addBos: Boolean
    val eosIds: Set<Int>
    val files: Map<String, Pair<Long, String>>

    init {
        if (manifest["format"] != "ondevice-bundle" || manifest["format_version"] != 1L)
            throw ModelException("$dir: not an ondevice bundle of format version 1")
        val backends = manifest["backends"] as? Map<*, *> ?: throw ModelException("$dir: manifest has no backends")
        val android = backends["android"] as? Map<*, *>
            ?: throw ModelException("$dir: the bundle has no Android graph; run `ondevice export-android` on it")
        val kv = android["kv_cache"] as? Map<*, *> ?: throw ModelException("$dir: backends.android has no kv_cache")
        val tok = manifest["tokenizer"] as? Map<*, *> ?: throw ModelException("$dir: manifest has no tokenizer")
        name = ((manifest["source"] as? Map<*, *>)?.get("name") as? String) ?: dir.name
        graph = inside(android["graph"] as? String)
        tokenizerFile = inside(tok["file"] as? String ?: "tokenizer.json")
        layers = int(kv, "layers")
        kvHeads = int(kv, "num_kv_heads")
        headDim = int(kv, "head_dim")
        vocab = int(android, "vocab_size")
        maxContext = int(manifest, "max_context")
        @Suppress("UNCHECKED_CAST")
        chat = ChatFormat.fromManifest(android["chat_format"] as? Map<String, Any?>
            ?: throw ModelException("$dir: backends.android has no chat_format"))
        bosId = (tok["bos_token_id"] as? Long)?.toInt()
        addBos = tok["add_bos_token"] == true
        eosIds = ((tok["eos_token_ids"] as? List<*>) ?: emptyList<Any>()).mapNotNull { (it as? Long)?.toInt() }.toSet()
        val listed = LinkedHashMap<String, Pair<Long, String>>()
        for ((n, info) in manifest["files"] as? Map<*, *> ?: throw ModelException("$dir: manifest lists no files")) {
            val i = info as? Map<*, *>
            val bytes = i?.get("bytes") as? Long
            val sha = i?.get("sha256") as? String
            if (n !is String || bytes == null || sha == null) throw ModelException("$dir: bad files entry $n")
            inside(n)
            listed[n] = Pair(bytes, sha)
        }
        files = listed
    }

    /** A file the manifest names: a relative path that stays inside the bundle. */
    private fun inside(name: String?): File {
        if (name.isNullOrEmpty() || name.startsWith("/") || name.split('/', '\\').any { it == ".." })
            throw ModelException("$dir: manifest path '$name' leaves the bundle")
        val f = File(dir, name)
        if (!f.canonicalPath.startsWith(dir.canonicalPath + File.separator))
            throw ModelException("$dir: '$name' resolves outside the bundle")
        return f
    }

    private fun int(m: Map<*, *>, key: String): Int {
        val v = m[key] as? Long ?: throw ModelException("$dir: manifest lacks integer '$key'")
        if (v <= 0 || v > Int.MAX_VALUE) throw ModelException("$dir: manifest '$key' = $v is out of range")
        return v.toInt()
    }

    /** Sizes of every file the app reads, and their sha256 when `hashes` (a bundle off storage may be cut short). */
    fun verify(hashes: Boolean) {
        for (f in listOf(graph, tokenizerFile) + dataFiles()) {
            val rel = f.relativeTo(dir).path.replace(File.separatorChar, '/')
            val (bytes, sha) = files[rel] ?: throw ModelException("$dir: $rel is not listed in the manifest")
            if (!f.isFile) throw ModelException("$dir: $rel is missing")
            if (f.length() != bytes) throw ModelException("$dir: $rel has ${f.length()} bytes, the manifest says $bytes: " +
                "the copy is incomplete (push the bundle again)")
            if (hashes && sha256(f) != sha) throw ModelException("$dir: $rel fails its checksum: the file is corrupted")
        }
    }

    /** The external-data files the graph reads besides itself. */
    private fun dataFiles(): List<File> = files.keys.filter { it.endsWith(".onnx.data") }.map { File(dir, it) }

    companion object {
        fun read(dir: File): BundleInfo {
            val f = File(dir, "manifest.json")
            if (!f.isFile) throw ModelException("$dir: no manifest.json (not a bundle folder)")
            @Suppress("UNCHECKED_CAST")
            val m = try { Json.parse(f.readText(Charsets.UTF_8)) as? Map<String, Any?> } catch (e: JsonException) {
                throw ModelException("$dir: manifest.json is not valid JSON (${e.message})")
            } ?: throw ModelException("$dir: manifest.json is not an object")
            return BundleInfo(dir, m)
        }

        fun sha256(f: File): String {
            val md = MessageDigest.getInstance("SHA-256")
            val buf = ByteArray(1 shl 20)
            FileInputStream(f).use { s -> while (true) { val n = s.read(buf); if (n < 0) break; md.update(buf, 0, n) } }
            return md.digest().joinToString("") { "%02x".format(it) }
        }
    }
}

/** A device profile's execution providers and thread count (a JSON file of profiles/; ondevice/profiles.py plans the same way). */
class Profile(val providers: List<String>, val threads: Int) {
    companion object {
        val CPU = Profile(listOf("CPUExecutionProvider"), 2)

        fun parse(json: String?): Profile {
            if (json == null) return CPU
            val p = try { Json.parse(json) as? Map<*, *> } catch (e: JsonException) { null }
                ?: throw ModelException("the device profile is not a JSON object")
            val names = (p["execution_providers"] as? List<*> ?: emptyList<Any>()).mapNotNull {
                (it as? Map<*, *>)?.get("name") as? String ?: it as? String
            }
            val big = (((p["cpu"] as? Map<*, *>)?.get("cores") as? Map<*, *>)?.get("big") as? Long)?.toInt() ?: 2
            return Profile(if (names.isEmpty()) CPU.providers else names, maxOf(1, minOf(big, 8)))
        }
    }
}

/** A bundle loaded for generation: tokenizer, chat template, one bridge session with its KV cache.
 *  The cache carries over between calls: a prompt that starts with what is cached prefills only the rest. */
class Model private constructor(val info: BundleInfo, val tokenizer: Tokenizer, private var handle: Long,
                                val providers: List<String>, val skippedProviders: String) {
    val name: String get() = info.name
    private val logits = FloatArray(info.vocab)
    private var cached = IntArray(0)  // the tokens whose keys and values are in the cache, in order
    private val lock = Object()

    /** One chat turn: `history` ends with the user's message; the answer streams to `listener`. */
    fun chat(history: List<Message>, settings: Settings, listener: TokenListener): Stats =
        generate(encodePrompt(info.chat.render(history)), settings, listener)

    fun encodePrompt(text: String): IntArray {
        val ids = tokenizer.encode(text)
        val bos = info.bosId
        if (info.addBos && bos != null && (ids.isEmpty() || ids[0] != bos)) return intArrayOf(bos) + ids
        return ids
    }

    /** The generation loop: prefill what the cache lacks, then sample, stream, step, until a stop
     *  token, max_tokens, or cancellation. Same policy as the Python engine (ondevice/engine.py). */
    fun generate(prompt: IntArray, settings: Settings, listener: TokenListener, onToken: ((Int) -> Unit)? = null): Stats {
        synchronized(lock) {
            if (handle == 0L) throw ModelException("the model is closed")
            if (settings.maxTokens < 1) throw ModelException("max_tokens must be at least 1")
            if (prompt.isEmpty()) throw ModelException("the prompt is empty")
            if (prompt.size >= info.maxContext) throw ModelException("the prompt has ${prompt.size} tokens but the " +
                "context holds ${info.maxContext}: shorten the prompt")
            if (prompt.size + settings.maxTokens > info.maxContext) throw ModelException("${prompt.size} prompt tokens " +
                "+ max_tokens ${settings.maxTokens} exceed the context of ${info.maxContext}: ask for at most " +
                "${info.maxContext - prompt.size} new tokens")
            val start = System.nanoTime()
            var past = commonPrefix(cached, prompt)
            if (past == prompt.size) past--  // the last prompt token runs again: its logits start the answer
            val fresh = prompt.size - past
            cached = cached.copyOf(past)  // rows from `past` on are rewritten now: a failed step must not leave them claimed
            var pos = past
            while (pos < prompt.size) {
                val n = minOf(PREFILL_CHUNK, prompt.size - pos)
                NativeBridge.step(handle, prompt.copyOfRange(pos, pos + n), n, pos, logits)
                pos += n
            }
            val fed = TokenList(prompt.size + settings.maxTokens)
            fed.addAll(prompt)
            cached = prompt
            val prefillS = (System.nanoTime() - start) / 1e9
            val sampler = Sampler(settings)
            val detok = StreamDetokenizer(tokenizer)
            val one = IntArray(1)
            var produced = 0
            var finish = "length"
            var firstAt = 0L
            while (true) {
                val token = sampler.next(logits, info.vocab)
                if (produced == 0) firstAt = System.nanoTime()
                if (token in info.eosIds) { finish = "stop"; break }
                produced++
                onToken?.invoke(token)
                val piece = detok.push(token)
                if (piece.isNotEmpty()) listener.onText(piece)
                if (produced == settings.maxTokens) break
                if (listener.isCancelled()) { finish = "cancelled"; break }
                one[0] = token
                NativeBridge.step(handle, one, 1, fed.size, logits)
                fed.add(token)
            }
            cached = fed.toArray()
            val tail = detok.flush()
            if (tail.isNotEmpty()) listener.onText(tail)
            val end = System.nanoTime()
            val decodeS = (end - firstAt) / 1e9
            return Stats(prompt.size, fresh, produced, (firstAt - start) / 1e6, fresh / maxOf(prefillS, 1e-9),
                         if (produced > 1 && decodeS > 0) (produced - 1) / decodeS else 0.0, finish)
        }
    }

    /** Forget the cache (a new conversation prefills from the start). */
    fun reset() = synchronized(lock) { cached = IntArray(0) }

    fun close() = synchronized(lock) {
        if (handle != 0L) NativeBridge.close(handle)
        handle = 0L
    }

    companion object {
        const val PREFILL_CHUNK = 128  // bounds a chunk's attention masks [chunk, cache]
        const val INITIAL_CAPACITY = 256  // slots; attention reads them all, so the cache starts small and doubles

        /** Opens the bundle folder (checked: manifest, paths inside it, file sizes; sha256 when `verify`). */
        fun open(bundleDir: File, profileJson: String?, verify: Boolean = false): Model {
            val info = BundleInfo.read(bundleDir)
            info.verify(hashes = verify)
            val profile = Profile.parse(profileJson)
            val tokenizer = try { Tokenizer.fromFile(info.tokenizerFile) } catch (e: TokenizerException) {
                throw ModelException("${info.tokenizerFile}: ${e.message}")
            }
            val handle = try {
                NativeBridge.open(info.graph.path, profile.providers.toTypedArray(), profile.threads, info.layers,
                                  info.kvHeads, info.headDim, info.vocab, minOf(INITIAL_CAPACITY, info.maxContext),
                                  info.maxContext)
            } catch (e: RuntimeException) {
                throw ModelException("ONNX Runtime cannot load ${info.graph.name}: ${e.message}")
            }
            val used = NativeBridge.providers(handle).split(";skipped:")
            return Model(info, tokenizer, handle, used[0].split(","), if (used.size > 1) used[1] else "")
        }

        private fun commonPrefix(a: IntArray, b: IntArray): Int {
            var i = 0
            while (i < a.size && i < b.size && a[i] == b[i]) i++
            return i
        }
    }
}

/** A growable IntArray (no boxing in the decode loop). */
class TokenList(capacity: Int) {
    private var data = IntArray(maxOf(capacity, 4))
    var size = 0
        private set

    fun add(v: Int) {
        if (size == data.size) data = data.copyOf(size * 2)
        data[size++] = v
    }

    fun addAll(vs: IntArray) { for (v in vs) add(v) }
    fun toArray(): IntArray = data.copyOf(size)
}
