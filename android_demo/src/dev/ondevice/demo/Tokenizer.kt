package dev.ondevice.demo

import java.io.File

/** A tokenizer.json this implementation cannot load (or would tokenize differently from `tokenizers`). */
class TokenizerException(message: String) : RuntimeException(message)

/**
 * A BPE tokenizer read from a Hugging Face `tokenizer.json`, giving the same ids as the Rust
 * `tokenizers` library (`encode(text, add_special_tokens=False)`) and the same text on decode.
 *
 * Supported, in the two shapes real models use:
 * - byte-level BPE (SmolLM2, GPT-2 style): no normalizer; pre-tokenizer ByteLevel, optionally after
 *   Digits (in a Sequence); the ByteLevel decoder;
 * - SentencePiece-style BPE (Gemma 3): normalizer Replace with string patterns (alone or in a
 *   Sequence); no pre-tokenizer, so each stretch of text between added tokens is one word; BPE with
 *   byte_fallback (characters missing from the vocabulary become `<0xNN>` tokens of their UTF-8
 *   bytes); the decoder Replace (string patterns), then ByteFallback, then Fuse, in a Sequence.
 *
 * The BPE model: merges as "a b" strings or pairs, optional unk_token with fuse_unk, ignore_merges,
 * byte_fallback. Added tokens with their lstrip/rstrip/single_word/normalized/special flags (those
 * with normalized=true matched in the normalized text, by their normalized content). Anything else
 * (other normalizers, pre-tokenizers and decoders, regex patterns, dropout, Prepend, Strip, ...) is
 * rejected with a [TokenizerException] when loading.
 *
 * [encode] keeps a cache of short words and is safe to call from several threads.
 */
class Tokenizer private constructor(
    private val vocab: HashMap<String, Int>,
    private val vocabById: Array<String?>,
    private val normalizer: Normalizer?,
    private val preTokenizer: PreTokenizer?,
    private val bpe: Bpe,
    private val decoder: Decoder,
    private val added: AddedVocabulary
) {
    companion object {
        fun fromJson(text: String): Tokenizer {
            val root = try {
                Json.parse(text)
            } catch (e: JsonException) {
                throw TokenizerException("tokenizer.json is not valid JSON: ${e.message}")
            }
            val map = root as? Map<*, *> ?: throw TokenizerException("tokenizer.json is not a JSON object")
            return Config.build(map)
        }

        fun fromFile(f: File): Tokenizer = fromJson(f.readText(Charsets.UTF_8))

        private fun create(vocab: HashMap<String, Int>, normalizer: Normalizer?, preTokenizer: PreTokenizer?,
                           bpe: Bpe, decoder: Decoder, added: AddedVocabulary): Tokenizer {
            var maxId = -1
            for (id in vocab.values) if (id > maxId) maxId = id
            val byId = arrayOfNulls<String>(maxId + 1)
            for ((token, id) in vocab) byId[id] = token
            return Tokenizer(vocab, byId, normalizer, preTokenizer, bpe, decoder, added)
        }
    }

    /** Largest id (model vocabulary or added token) + 1. */
    val vocabSize: Int = Math.max(vocabById.size, added.maxId + 1)

    private val cache = HashMap<String, IntArray>()

    /**
     * As `tokenizers`' AddedVocabulary.extract_and_normalize, then the model: added tokens with
     * normalized=false are cut out of the raw text; each remaining piece is normalized, and the added
     * tokens with normalized=true are cut out of that; what is left is pre-tokenized and BPE'd.
     */
    fun encode(text: String): IntArray {
        val out = IntList()
        for (piece in added.split(text, normalized = false)) {
            if (piece.id >= 0) {
                out.add(piece.id)
                continue
            }
            val normalized = if (normalizer == null) piece.text else normalizer.normalize(piece.text)
            for (sub in added.split(normalized, normalized = true)) {
                if (sub.id >= 0) out.add(sub.id) else encodeOrdinary(sub.text, out)
            }
        }
        return out.toArray()
    }

    /** Normalized text without added tokens: pre-tokenize (or take it whole), then BPE each word. */
    private fun encodeOrdinary(text: String, out: IntList) {
        if (text.length == 0) return
        if (preTokenizer == null) {
            encodeWord(text, out)
            return
        }
        val words = ArrayList<String>()
        preTokenizer.split(text, words)
        for (word in words) encodeWord(word, out)
    }

    private fun encodeWord(word: String, out: IntList) {
        val cacheable = word.length < Bpe.CACHE_MAX_WORD
        if (cacheable) {
            val cached = synchronized(cache) { cache[word] }
            if (cached != null) {
                out.addAll(cached)
                return
            }
        }
        val ids = bpe.tokenize(word, vocab)
        if (cacheable) {
            synchronized(cache) { if (cache.size < Bpe.CACHE_CAPACITY) cache[word] = ids }
        }
        out.addAll(ids)
    }

    /**
     * The token string as `tokenizers` gives it to the decoder (its `id_to_token`): the vocabulary
     * entry (byte-level characters, or `<0xNN>` for a byte token), or an added token's content (its
     * normalized content if it has normalized=true), or null for an unknown id.
     */
    fun tokenString(id: Int): String? {
        val a = added.byId(id)
        if (a != null) return a.form
        return if (id >= 0 && id < vocabById.size) vocabById[id] else null
    }

    /**
     * The bytes one token stands for on its own. ByteLevel decoder: a token made only of byte-level
     * characters maps to those bytes, any other token (e.g. `<|im_start|>`) to its UTF-8 content.
     * SentencePiece-style decoder: a byte token to its byte, any other token to the UTF-8 of its text
     * after the decoder's Replace steps. ([decode] of several tokens is not always the concatenation:
     * invalid UTF-8 is replaced per run of bytes.)
     */
    fun tokenBytes(id: Int): ByteArray {
        val s = tokenString(id) ?: throw IllegalArgumentException("no token with id $id (vocabulary size $vocabSize)")
        return decoder.tokenBytes(s)
    }

    fun isSpecial(id: Int): Boolean {
        val s = tokenString(id) ?: return false
        return added.isSpecialContent(s)
    }

    fun tokenId(token: String): Int? = added.idOf(token) ?: vocab[token]

    /** Like `tokenizers` decode: unknown ids are dropped, specials too when [skipSpecial]. */
    fun decode(ids: IntArray, skipSpecial: Boolean = false): String {
        val state = decoder.newState()
        for (id in ids) {
            if (!decodes(id, skipSpecial)) continue
            state.push(tokenString(id)!!)
        }
        return state.drain(true)
    }

    /** Whether [decode] passes this id to the decoder (it is a known token and not a skipped special). */
    internal fun decodes(id: Int, skipSpecial: Boolean): Boolean {
        val s = tokenString(id) ?: return false
        return !(skipSpecial && added.isSpecialContent(s))
    }

    /** Fresh decoder state for [StreamDetokenizer]. */
    internal fun newDecodeState(): DecodeState = decoder.newState()

    // --- configuration --------------------------------------------------------------------------

    private object Config {
        /** Post-processors only add special tokens (when asked to) and adjust offsets: no effect on
         * `encode(..., add_special_tokens=False)` ids. */
        private val IGNORED_POST_PROCESSORS = setOf("ByteLevel", "TemplateProcessing", "RobertaProcessing",
                                                    "BertProcessing", "Sequence")

        fun build(root: Map<*, *>): Tokenizer {
            val version = root["version"]
            if (version != null && version != "1.0") {
                throw TokenizerException("unknown tokenizer.json version '$version'")
            }
            if (root["truncation"] != null) throw TokenizerException("truncation is not supported (set it to null)")
            if (root["padding"] != null) throw TokenizerException("padding is not supported (set it to null)")
            val normalizer = Normalizer.fromConfig(root["normalizer"])
            val preTokenizer = PreTokenizer.fromConfig(root["pre_tokenizer"])
            val decoder = Decoder.fromConfig(root["decoder"])
            checkPostProcessor(root["post_processor"])
            val model = root["model"] as? Map<*, *> ?: throw TokenizerException("tokenizer.json has no model")
            val modelType = model["type"]
            if (modelType != "BPE") throw TokenizerException("model type '$modelType' is not supported (only BPE)")
            val vocab = readVocab(model)
            // The ByteLevel pre-tokenizer (always the last step of a supported one) spells each word
            // in byte-level characters; without it the BPE runs on the text's own characters.
            val bpe = Bpe.fromConfig(model, vocab, byteLevel = preTokenizer != null)
            val added = AddedVocabulary.fromConfig(root["added_tokens"], vocab, normalizer)
            return Tokenizer.create(vocab, normalizer, preTokenizer, bpe, decoder, added)
        }

        private fun checkPostProcessor(pp: Any?) {
            if (pp == null) return
            val type = typeOf(pp, "post_processor")
            if (type !in IGNORED_POST_PROCESSORS) throw TokenizerException("post_processor '$type' is not supported")
        }

        private fun readVocab(model: Map<*, *>): HashMap<String, Int> {
            val raw = model["vocab"] as? Map<*, *> ?: throw TokenizerException("BPE model has no vocab object")
            val vocab = HashMap<String, Int>(raw.size * 2)
            for ((k, v) in raw) {
                val id = (v as? Long)?.toInt() ?: throw TokenizerException("vocab entry '$k' has a non-integer id")
                if (id < 0) throw TokenizerException("vocab entry '$k' has a negative id")
                vocab[k as String] = id
            }
            return vocab
        }
    }

    // --- normalizer and decoders ----------------------------------------------------------------

    /** A Replace step (normalizer or decoder) with a string pattern: every non-overlapping occurrence,
     * leftmost first, becomes [content]. */
    private class Replacement(private val pattern: String, private val content: String) {
        companion object {
            fun fromConfig(m: Map<*, *>, what: String): Replacement {
                val pattern = m["pattern"] as? Map<*, *>
                    ?: throw TokenizerException("$what Replace has no pattern object")
                val string = pattern["String"]
                if (pattern.size != 1 || string !is String) {
                    throw TokenizerException("$what Replace with pattern ${Json.write(pattern)} is not supported " +
                                             "(only {\"String\": ...})")
                }
                if (string.length == 0) throw TokenizerException("$what Replace with an empty pattern is not supported")
                val content = m["content"] as? String ?: throw TokenizerException("$what Replace has no content string")
                return Replacement(string, content)
            }
        }

        fun apply(s: String): String {
            var i = s.indexOf(pattern)
            if (i < 0) return s
            val sb = StringBuilder(s.length + 16)
            var from = 0
            while (i >= 0) {
                sb.append(s, from, i).append(content)
                from = i + pattern.length
                i = s.indexOf(pattern, from)
            }
            sb.append(s, from, s.length)
            return sb.toString()
        }
    }

    /** The normalizer: Replace steps in order (a Sequence flattened). */
    private class Normalizer(private val steps: List<Replacement>) {
        companion object {
            fun fromConfig(config: Any?): Normalizer? {
                if (config == null) return null
                val steps = ArrayList<Replacement>()
                flatten(config, steps)
                return Normalizer(steps)
            }

            private fun flatten(config: Any, out: MutableList<Replacement>) {
                val type = typeOf(config, "normalizer")
                val map = config as Map<*, *>
                when (type) {
                    "Sequence" -> {
                        val items = map["normalizers"] as? List<*>
                            ?: throw TokenizerException("Sequence normalizer without a \"normalizers\" list")
                        for (item in items) flatten(item ?: throw TokenizerException("null normalizer in Sequence"), out)
                    }
                    "Replace" -> out.add(Replacement.fromConfig(map, "normalizer"))
                    else -> throw TokenizerException(
                        "normalizer '$type' is not supported (only Replace with a string pattern, alone or in a Sequence)")
                }
            }
        }

        fun normalize(s: String): String {
            var r = s
            for (step in steps) r = step.apply(r)
            return r
        }
    }

    /** Decoding state over a sequence of token strings: [push] each, [drain] the text completed so far. */
    internal abstract class DecodeState {
        abstract fun push(token: String)

        /** The text decoded since the last drain; with [final], everything still held back too. */
        abstract fun drain(final: Boolean): String
    }

    /** The decoder chain, as `tokenizers` applies it to the token strings of decode(). */
    private abstract class Decoder {
        abstract fun newState(): DecodeState

        abstract fun tokenBytes(token: String): ByteArray

        companion object {
            private val KNOWN_DECODERS = setOf("Replace", "ByteFallback", "Fuse", "ByteLevel")

            fun fromConfig(config: Any?): Decoder {
                if (config == null) {
                    throw TokenizerException("decoder null is not supported (need ByteLevel, or Replace/ByteFallback/Fuse)")
                }
                val steps = ArrayList<Map<*, *>>()
                flatten(config, steps)
                if (steps.size == 1 && typeOf(steps[0], "decoder") == "ByteLevel") return ByteLevelDecoder
                val replacements = ArrayList<Replacement>()
                var byteFallback = false
                var fused = false
                for (step in steps) {
                    val type = typeOf(step, "decoder")
                    if (type !in KNOWN_DECODERS) {
                        throw TokenizerException("decoder '$type' is not supported (only ByteLevel, " +
                                                 "or Replace, ByteFallback and Fuse in a Sequence)")
                    }
                    if (fused) throw TokenizerException("decoder '$type' after Fuse is not supported")
                    when (type) {
                        "Replace" -> {
                            if (byteFallback) throw TokenizerException("decoder Replace after ByteFallback is not supported")
                            replacements.add(Replacement.fromConfig(step, "decoder"))
                        }
                        "ByteFallback" -> {
                            if (byteFallback) throw TokenizerException("decoder ByteFallback twice is not supported")
                            byteFallback = true
                        }
                        "Fuse" -> fused = true // the decoded tokens are joined anyway
                        else -> throw TokenizerException("decoder ByteLevel is supported only on its own")
                    }
                }
                return PieceDecoder(replacements, byteFallback)
            }

            private fun flatten(config: Any, out: MutableList<Map<*, *>>) {
                if (typeOf(config, "decoder") != "Sequence") {
                    out.add(config as Map<*, *>)
                    return
                }
                val items = (config as Map<*, *>)["decoders"] as? List<*>
                    ?: throw TokenizerException("Sequence decoder without a \"decoders\" list")
                for (item in items) flatten(item ?: throw TokenizerException("null decoder in Sequence"), out)
            }
        }
    }

    /** ByteLevel: every token's bytes joined, then decoded as UTF-8 with U+FFFD for invalid bytes. */
    private object ByteLevelDecoder : Decoder() {
        override fun newState(): DecodeState = State()

        override fun tokenBytes(token: String): ByteArray = ByteLevel.decodeToken(token)

        private class State : DecodeState() {
            private val pending = ByteBuffer()

            override fun push(token: String) = pending.append(ByteLevel.decodeToken(token))

            /** Not [final]: an incomplete but so far valid UTF-8 sequence at the end is held back. */
            override fun drain(final: Boolean): String {
                if (pending.size == 0) return ""
                val sb = StringBuilder(pending.size)
                val used = Utf8.decodeLossy(pending.data, 0, pending.size, sb, final)
                pending.dropFirst(used)
                return sb.toString()
            }
        }
    }

    /**
     * Replace steps on each token, then (with ByteFallback) runs of consecutive `<0xNN>` tokens become
     * their bytes decoded as UTF-8 (a run that is not valid UTF-8 as a whole becomes one U+FFFD per
     * byte, as `tokenizers` does), then Fuse: everything joined.
     */
    private class PieceDecoder(private val replacements: List<Replacement>,
                               private val byteFallback: Boolean) : Decoder() {
        override fun newState(): DecodeState = State()

        private fun replaced(token: String): String {
            var s = token
            for (r in replacements) s = r.apply(s)
            return s
        }

        /** The byte of a `<0xNN>` token as ByteFallback reads it (Rust's u8::from_str_radix), or -1. */
        private fun byteOf(s: String): Int {
            if (!byteFallback || s.length != 6 || !s.startsWith("<0x") || s[5] != '>') return -1
            val hi = s[3]
            val lo = Character.digit(s[4], 16)
            if (lo < 0 || s[4].toInt() >= 0x80) return -1
            if (hi == '+') return lo
            val h = Character.digit(hi, 16)
            return if (h < 0 || hi.toInt() >= 0x80) -1 else h * 16 + lo
        }

        override fun tokenBytes(token: String): ByteArray {
            val s = replaced(token)
            val b = byteOf(s)
            return if (b >= 0) byteArrayOf(b.toByte()) else s.toByteArray(Charsets.UTF_8)
        }

        /**
         * A run of byte tokens is held back until it ends (a text token, or the final drain): whether
         * it decodes to text or to U+FFFDs depends on the whole run.
         */
        private inner class State : DecodeState() {
            private val run = ByteBuffer()
            private val text = StringBuilder()

            override fun push(token: String) {
                val s = replaced(token)
                val b = byteOf(s)
                if (b >= 0) {
                    run.append(b)
                } else {
                    endRun()
                    text.append(s)
                }
            }

            override fun drain(final: Boolean): String {
                if (final) endRun()
                val out = text.toString()
                text.setLength(0)
                return out
            }

            private fun endRun() {
                if (run.size == 0) return
                if (Utf8.isValid(run.data, 0, run.size)) {
                    Utf8.decodeLossy(run.data, 0, run.size, text, true)
                } else {
                    for (k in 0 until run.size) text.append('\uFFFD')
                }
                run.clear()
            }
        }
    }

    // --- added tokens ---------------------------------------------------------------------------

    /** [form]: what is matched in the text and given to the decoder: the content, normalized if the
     * token has normalized=true (as `tokenizers` 0.23 keeps it). */
    private class AddedToken(val id: Int, val content: String, val form: String, val singleWord: Boolean,
                             val lstrip: Boolean, val rstrip: Boolean, val normalized: Boolean, val special: Boolean)

    /** A piece of the input: either an added token ([id] >= 0) or ordinary text ([id] == -1). */
    private class Piece(val text: String, val id: Int)

    /**
     * Added tokens are cut out of the text before pre-tokenization, as `tokenizers` does: leftmost
     * longest match, first the tokens with normalized=false in the raw text, then those with
     * normalized=true (by their normalized content) in the normalized remaining text.
     */
    private class AddedVocabulary(tokens: Collection<AddedToken>, private val specialContents: Set<String>) {
        private val byContent = HashMap<String, AddedToken>()
        private val byId = HashMap<Int, AddedToken>()
        private val rawMatcher: Matcher
        private val normalizedMatcher: Matcher
        val maxId: Int

        init {
            for (t in tokens) {
                byContent[t.content] = t
                byId[t.id] = t
            }
            val live = byId.values
            rawMatcher = Matcher(live.filter { !it.normalized })
            normalizedMatcher = Matcher(live.filter { it.normalized })
            maxId = live.map { it.id }.max() ?: -1
        }

        companion object {
            /** Ids are assigned like `tokenizers` does on load: the id of the same content in the vocabulary
             * (or an earlier added token), else the next free id after the vocabulary. */
            fun fromConfig(config: Any?, vocab: Map<String, Int>, normalizer: Normalizer?): AddedVocabulary {
                val list = when (config) {
                    null -> emptyList<Any?>()
                    is List<*> -> config
                    else -> throw TokenizerException("added_tokens is not a list")
                }
                val byContent = LinkedHashMap<String, AddedToken>()
                val special = HashSet<String>()
                var nextId = vocab.size
                for (item in list) {
                    val m = item as? Map<*, *> ?: throw TokenizerException("added_tokens entry is not an object")
                    val content = m["content"] as? String
                        ?: throw TokenizerException("added token without content")
                    if (content.length == 0) continue
                    val id = byContent[content]?.id ?: vocab[content] ?: nextId++
                    val isSpecial = flag(m, "special", false)
                    val normalized = flag(m, "normalized", !isSpecial)
                    val form = if (normalized && normalizer != null) normalizer.normalize(content) else content
                    if (form.length == 0) {
                        throw TokenizerException("added token '$content' normalizes to an empty string")
                    }
                    byContent.remove(content) // keep the last definition, as the library does
                    byContent[content] = AddedToken(id, content, form, flag(m, "single_word", false),
                                                    flag(m, "lstrip", false), flag(m, "rstrip", false),
                                                    normalized, isSpecial)
                    if (isSpecial) special.add(content)
                }
                return AddedVocabulary(byContent.values, special)
            }
        }

        fun byId(id: Int): AddedToken? = byId[id]

        fun idOf(content: String): Int? = byContent[content]?.id

        fun isSpecialContent(s: String): Boolean = s in specialContents

        /** `tokenizers`' AddedVocabulary.find_matches over [s] with one of the two token sets. */
        fun split(s: String, normalized: Boolean): List<Piece> {
            val matcher = if (normalized) normalizedMatcher else rawMatcher
            if (s.length == 0 || matcher.isEmpty) return listOf(Piece(s, -1))
            val pieces = ArrayList<Piece>()
            var startOffset = 0
            var i = 0
            while (i < s.length) {
                val token = matcher.longestAt(s, i)
                if (token == null) {
                    i++
                    continue
                }
                var start = i
                var stop = i + token.form.length
                i = stop // the search goes on after the match even if the match is discarded below
                if (token.singleWord && !isSingleWord(s, start, stop)) continue
                if (token.lstrip) start = Math.max(whitespaceStartBefore(s, start), startOffset)
                if (token.rstrip) stop = whitespaceEndAfter(s, stop)
                if (startOffset < start) pieces.add(Piece(s.substring(startOffset, start), -1))
                pieces.add(Piece(s.substring(start, stop), token.id))
                startOffset = stop
            }
            if (startOffset != s.length) pieces.add(Piece(s.substring(startOffset), -1))
            return pieces
        }

        private fun isSingleWord(s: String, start: Int, stop: Int): Boolean {
            val startOk = start == 0 || !Unicode.isWordChar(Character.codePointBefore(s, start))
            val stopOk = stop == s.length || !Unicode.isWordChar(Character.codePointAt(s, stop))
            return startOk && stopOk
        }

        private fun whitespaceStartBefore(s: String, end: Int): Int {
            var i = end
            while (i > 0) {
                val cp = Character.codePointBefore(s, i)
                if (!Unicode.isWhitespace(cp)) break
                i -= Character.charCount(cp)
            }
            return i
        }

        private fun whitespaceEndAfter(s: String, start: Int): Int {
            var i = start
            while (i < s.length) {
                val cp = Character.codePointAt(s, i)
                if (!Unicode.isWhitespace(cp)) break
                i += Character.charCount(cp)
            }
            return i
        }

        /** Candidates by first UTF-16 unit, longest first, so the first that matches is the longest. */
        private class Matcher(tokens: List<AddedToken>) {
            private val byFirst = HashMap<Char, Array<AddedToken>>()
            val isEmpty = tokens.isEmpty()

            init {
                for ((c, group) in tokens.groupBy { it.form[0] }) {
                    byFirst[c] = group.sortedByDescending { it.form.length }.toTypedArray()
                }
            }

            fun longestAt(s: String, i: Int): AddedToken? {
                val candidates = byFirst[s[i]] ?: return null
                for (t in candidates) if (s.startsWith(t.form, i)) return t
                return null
            }
        }
    }

    // --- pre-tokenization -----------------------------------------------------------------------

    /** The pre-tokenizer chain: zero or more Digits splits, then the ByteLevel split. */
    private class PreTokenizer(private val digits: List<Boolean>, private val prefixSpace: Boolean,
                               private val useRegex: Boolean) {
        companion object {
            /** null for no pre-tokenizer (the text between added tokens is one word). */
            fun fromConfig(config: Any?): PreTokenizer? {
                if (config == null) return null
                val steps = ArrayList<Map<*, *>>()
                flatten(config, steps)
                val digits = ArrayList<Boolean>()
                for ((i, step) in steps.withIndex()) {
                    val type = typeOf(step, "pre_tokenizer")
                    when {
                        type == "Digits" -> digits.add(flag(step, "individual_digits", false))
                        type == "ByteLevel" && i == steps.size - 1 -> return PreTokenizer(
                            digits, flag(step, "add_prefix_space", true), flag(step, "use_regex", true))
                        type == "ByteLevel" -> throw TokenizerException("ByteLevel must be the last pre-tokenizer")
                        else -> throw TokenizerException(
                            "pre-tokenizer '$type' is not supported (only Digits and ByteLevel)")
                    }
                }
                throw TokenizerException("the pre-tokenizer has no ByteLevel step: not a byte-level BPE tokenizer")
            }

            private fun flatten(config: Any, out: MutableList<Map<*, *>>) {
                if (typeOf(config, "pre_tokenizer") != "Sequence") {
                    out.add(config as Map<*, *>)
                    return
                }
                val items = (config as Map<*, *>)["pretokenizers"] as? List<*>
                    ?: throw TokenizerException("Sequence pre-tokenizer without a \"pretokenizers\" list")
                for (item in items) flatten(item ?: throw TokenizerException("null pre-tokenizer in Sequence"), out)
            }
        }

        fun split(text: String, out: MutableList<String>) {
            var pieces = listOf(text)
            for (individual in digits) {
                val next = ArrayList<String>()
                for (p in pieces) splitNumbers(p, individual, next)
                pieces = next
            }
            for (p in pieces) {
                val s = if (prefixSpace && !p.startsWith(" ")) " $p" else p
                if (useRegex) Gpt2Split.split(s, out) else out.add(s)
            }
        }

        /** Digits: each numeric character its own piece (individual) or runs of them (contiguous). */
        private fun splitNumbers(s: String, individual: Boolean, out: MutableList<String>) {
            var runStart = 0
            var runIsNumber = false
            var i = 0
            while (i < s.length) {
                val cp = Character.codePointAt(s, i)
                val isNumber = Unicode.isNumber(cp)
                if (i > runStart && (isNumber != runIsNumber || (individual && isNumber))) {
                    out.add(s.substring(runStart, i))
                    runStart = i
                }
                runIsNumber = isNumber
                i += Character.charCount(cp)
            }
            if (runStart < s.length) out.add(s.substring(runStart))
        }
    }

    /**
     * The GPT-2 split `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, as a
     * hand-written scanner over code points (with `\s` = Unicode White_Space, as in Oniguruma).
     */
    private object Gpt2Split {
        private const val LETTER = 0
        private const val NUMBER = 1
        private const val OTHER = 2
        private const val SPACE = 3
        private val CONTRACTIONS = arrayOf("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

        fun split(s: String, out: MutableList<String>) {
            var i = 0
            while (i < s.length) {
                val end = matchAt(s, i)
                out.add(s.substring(i, end))
                i = end
            }
        }

        private fun classOf(cp: Int): Int = when {
            Unicode.isWhitespace(cp) -> SPACE
            Character.isLetter(cp) -> LETTER
            Unicode.isNumber(cp) -> NUMBER
            else -> OTHER
        }

        /** End of the regex match starting at [i] (there always is one of at least one character). */
        private fun matchAt(s: String, i: Int): Int {
            if (s[i] == '\'') {
                for (c in CONTRACTIONS) if (s.startsWith(c, i)) return i + c.length
            }
            val cp = Character.codePointAt(s, i)
            // ` ?X+` for X = letters, numbers, other: a single ' ' joins the run that follows it.
            if (cp == ' '.toInt() && i + 1 < s.length) {
                val nextClass = classOf(Character.codePointAt(s, i + 1))
                if (nextClass != SPACE) return runEnd(s, i + 1, nextClass)
            }
            val cls = classOf(cp)
            if (cls != SPACE) return runEnd(s, i, cls)
            // `\s+(?!\S)`: a whitespace run followed by a non-space gives its last character to the next
            // match (so " word" keeps its space); `\s+` takes a lone whitespace character.
            val end = runEnd(s, i, SPACE)
            if (end == s.length) return end
            val lastStart = end - Character.charCount(Character.codePointBefore(s, end))
            return if (lastStart > i) lastStart else end
        }

        private fun runEnd(s: String, from: Int, cls: Int): Int {
            var i = from
            while (i < s.length) {
                val cp = Character.codePointAt(s, i)
                if (classOf(cp) != cls) break
                i += Character.charCount(cp)
            }
            return i
        }
    }

    /** Character classes with the Unicode meanings the Rust library uses (not Java's narrower ones). */
    private object Unicode {
        /** White_Space: what `\s` matches in Oniguruma and the Rust regex crate. Java's isWhitespace
         * differs (it excludes no-break spaces and includes U+001C..U+001F). */
        fun isWhitespace(cp: Int): Boolean {
            if (cp < 0x80) return cp == 0x20 || cp in 0x09..0x0D
            if (cp == 0x85) return true
            val t = Character.getType(cp)
            return t == Character.SPACE_SEPARATOR.toInt() || t == Character.LINE_SEPARATOR.toInt() ||
                t == Character.PARAGRAPH_SEPARATOR.toInt()
        }

        /** Rust's char::is_numeric and `\p{N}`: general categories Nd, Nl, No. */
        fun isNumber(cp: Int): Boolean {
            if (cp < 0x80) return cp in 0x30..0x39
            val t = Character.getType(cp)
            return t == Character.DECIMAL_DIGIT_NUMBER.toInt() || t == Character.LETTER_NUMBER.toInt() ||
                t == Character.OTHER_NUMBER.toInt()
        }

        /** `\w` of the Rust regex crate: Alphabetic, M, Nd, Pc, Join_Control. */
        fun isWordChar(cp: Int): Boolean {
            if (Character.isAlphabetic(cp) || cp == 0x200C || cp == 0x200D) return true
            val t = Character.getType(cp)
            return t == Character.NON_SPACING_MARK.toInt() || t == Character.ENCLOSING_MARK.toInt() ||
                t == Character.COMBINING_SPACING_MARK.toInt() || t == Character.DECIMAL_DIGIT_NUMBER.toInt() ||
                t == Character.CONNECTOR_PUNCTUATION.toInt()
        }
    }

    // --- byte level -----------------------------------------------------------------------------

    /** GPT-2's reversible byte <-> printable character mapping. */
    private object ByteLevel {
        val byteToChar = CharArray(256)
        private val charToByte: IntArray

        init {
            var n = 0
            for (b in 0 until 256) {
                val printable = b in 0x21..0x7E || b in 0xA1..0xAC || b in 0xAE..0xFF
                byteToChar[b] = if (printable) b.toChar() else (256 + n++).toChar()
            }
            charToByte = IntArray(256 + n) { -1 }
            for (b in 0 until 256) charToByte[byteToChar[b].toInt()] = b
        }

        fun byteOf(c: Char): Int = if (c.toInt() < charToByte.size) charToByte[c.toInt()] else -1

        fun encode(bytes: ByteArray): String {
            val sb = StringBuilder(bytes.size)
            for (b in bytes) sb.append(byteToChar[b.toInt() and 0xFF])
            return sb.toString()
        }

        /** The ByteLevel decoder on one token: its bytes if every character is a byte character, else
         * the token's own UTF-8. */
        fun decodeToken(token: String): ByteArray {
            val out = ByteArray(token.length)
            for (i in token.indices) {
                val b = byteOf(token[i])
                if (b < 0) return token.toByteArray(Charsets.UTF_8)
                out[i] = b.toByte()
            }
            return out
        }
    }

    // --- BPE ------------------------------------------------------------------------------------

    /**
     * The BPE model. [byteLevel]: words come spelled in byte-level characters (after the ByteLevel
     * pre-tokenizer), one initial symbol per UTF-8 byte; otherwise one per character (code point).
     * [byteFallback]: a character missing from the vocabulary becomes the `<0xNN>` tokens of its
     * UTF-8 bytes (if they all exist) instead of unk.
     */
    private class Bpe(private val merges: PairMap, private val byteIds: IntArray, private val unkId: Int,
                      private val fuseUnk: Boolean, private val ignoreMerges: Boolean,
                      private val byteLevel: Boolean, private val byteFallback: Boolean,
                      private val byteTokenIds: IntArray, private val charIds: IntArray?) {
        companion object {
            // As the Rust BPE cache: words up to this length, at most this many of them.
            const val CACHE_MAX_WORD = 256
            const val CACHE_CAPACITY = 10000

            fun fromConfig(model: Map<*, *>, vocab: Map<String, Int>, byteLevel: Boolean): Bpe {
                val dropout = model["dropout"]
                if (dropout != null && (dropout as? Number)?.toDouble() != 0.0) {
                    throw TokenizerException("BPE dropout is not supported")
                }
                for (key in listOf("continuing_subword_prefix", "end_of_word_suffix")) {
                    val v = model[key]
                    if (v != null && v != "") throw TokenizerException("BPE $key is not supported")
                }
                val byteFallback = flag(model, "byte_fallback", false)
                val unk = model["unk_token"]
                val unkId = if (unk == null) -1 else vocab[unk as? String ?: ""]
                    ?: throw TokenizerException("unk_token $unk is not in the vocabulary")
                val byteIds = IntArray(256) { vocab[ByteLevel.byteToChar[it].toString()] ?: -1 }
                // The names the Rust model looks up: format!("<{b:#04X}>"), e.g. <0x0A>.
                val hex = "0123456789ABCDEF"
                val byteTokenIds = IntArray(256) { vocab["<0x" + hex[it shr 4] + hex[it and 15] + ">"] ?: -1 }
                var charIds: IntArray? = null
                if (!byteLevel || byteFallback) {
                    // Single-character tokens of the Basic Multilingual Plane, by character (others by lookup).
                    val ids = IntArray(65536) { -1 }
                    for ((token, id) in vocab) if (token.length == 1) ids[token[0].toInt()] = id
                    charIds = ids
                }
                return Bpe(readMerges(model, vocab), byteIds, unkId, flag(model, "fuse_unk", false),
                           flag(model, "ignore_merges", false), byteLevel, byteFallback, byteTokenIds, charIds)
            }

            private fun readMerges(model: Map<*, *>, vocab: Map<String, Int>): PairMap {
                val list = model["merges"] as? List<*> ?: throw TokenizerException("BPE model has no merges list")
                val map = PairMap(list.size)
                for ((rank, m) in list.withIndex()) {
                    val (a, b) = mergePair(m)
                    val aId = vocab[a] ?: throw TokenizerException("merge '$a $b': '$a' is not in the vocabulary")
                    val bId = vocab[b] ?: throw TokenizerException("merge '$a $b': '$b' is not in the vocabulary")
                    val newId = vocab[a + b]
                        ?: throw TokenizerException("merge '$a $b': '$a$b' is not in the vocabulary")
                    map.put(aId, bId, rank, newId)
                }
                return map
            }

            private fun mergePair(m: Any?): Pair<String, String> {
                if (m is String) {
                    val parts = m.split(' ')
                    if (parts.size != 2) throw TokenizerException("invalid merge '$m' (need exactly two tokens)")
                    return Pair(parts[0], parts[1])
                }
                if (m is List<*> && m.size == 2) {
                    val a = m[0]
                    val b = m[1]
                    if (a is String && b is String) return Pair(a, b)
                }
                throw TokenizerException("invalid merge $m")
            }
        }

        /** Ids of one pre-tokenized word. */
        fun tokenize(word: String, vocab: Map<String, Int>): IntArray {
            if (word.length == 0) return IntArray(0)
            if (byteLevel && !byteFallback) {
                val bytes = word.toByteArray(Charsets.UTF_8)
                if (ignoreMerges) {
                    val whole = vocab[ByteLevel.encode(bytes)]
                    if (whole != null) return intArrayOf(whole)
                }
                val symbols = initialSymbols(bytes)
                return mergeAll(symbols.data, symbols.size)
            }
            val spelled = if (byteLevel) ByteLevel.encode(word.toByteArray(Charsets.UTF_8)) else word
            if (ignoreMerges) {
                val whole = vocab[spelled]
                if (whole != null) return intArrayOf(whole)
            }
            val symbols = initialSymbolsOfChars(spelled, vocab)
            return mergeAll(symbols.data, symbols.size)
        }

        /**
         * One symbol per character, as the Rust merge_word: a character in the vocabulary is its token;
         * else its byte tokens (byte_fallback, all of them present); else unk (fused or not; a pending
         * unk is emitted only before the next known character, as there) or nothing.
         */
        private fun initialSymbolsOfChars(s: String, vocab: Map<String, Int>): IntList {
            val ids = charIds!!
            val symbols = IntList(s.length)
            var pendingUnk = false
            var i = 0
            while (i < s.length) {
                val cp = Character.codePointAt(s, i)
                val n = Character.charCount(cp)
                val id = if (n == 1) ids[s[i].toInt()] else vocab[s.substring(i, i + n)] ?: -1
                if (id >= 0) {
                    if (pendingUnk) symbols.add(unkId)
                    pendingUnk = false
                    symbols.add(id)
                } else if (!(byteFallback && addByteTokens(cp, symbols)) && unkId >= 0) {
                    if (pendingUnk && !fuseUnk) symbols.add(unkId)
                    pendingUnk = true
                }
                i += n
            }
            if (pendingUnk) symbols.add(unkId)
            return symbols
        }

        /** Adds the byte tokens of [cp]'s UTF-8 encoding, if the vocabulary has all of them. */
        private fun addByteTokens(cp: Int, out: IntList): Boolean {
            val bytes = IntArray(4)
            val n = when {
                cp < 0x80 -> { bytes[0] = cp; 1 }
                cp < 0x800 -> { bytes[0] = 0xC0 or (cp shr 6); bytes[1] = 0x80 or (cp and 0x3F); 2 }
                cp < 0x10000 -> {
                    if (cp in 0xD800..0xDFFF) {
                        bytes[0] = '?'.toInt() // a lone surrogate: what String.toByteArray makes of it
                        1
                    } else {
                        bytes[0] = 0xE0 or (cp shr 12); bytes[1] = 0x80 or ((cp shr 6) and 0x3F)
                        bytes[2] = 0x80 or (cp and 0x3F); 3
                    }
                }
                else -> {
                    bytes[0] = 0xF0 or (cp shr 18); bytes[1] = 0x80 or ((cp shr 12) and 0x3F)
                    bytes[2] = 0x80 or ((cp shr 6) and 0x3F); bytes[3] = 0x80 or (cp and 0x3F); 4
                }
            }
            for (k in 0 until n) if (byteTokenIds[bytes[k]] < 0) return false
            for (k in 0 until n) out.add(byteTokenIds[bytes[k]])
            return true
        }

        /** One symbol per byte; bytes missing from the vocabulary become unk (fused or not) or are dropped. */
        private fun initialSymbols(bytes: ByteArray): IntList {
            val symbols = IntList(bytes.size)
            var pendingUnk = false
            for (b in bytes) {
                val id = byteIds[b.toInt() and 0xFF]
                if (id >= 0) {
                    if (pendingUnk) symbols.add(unkId)
                    pendingUnk = false
                    symbols.add(id)
                } else if (unkId >= 0) {
                    if (pendingUnk && !fuseUnk) symbols.add(unkId)
                    pendingUnk = true
                }
            }
            if (pendingUnk) symbols.add(unkId)
            return symbols
        }

        /**
         * Applies merges lowest rank first (leftmost first among equal ranks) with a heap of
         * (rank << 32 | position) entries, skipping entries whose pair has changed since they were queued.
         */
        private fun mergeAll(sym: IntArray, n: Int): IntArray {
            if (n < 2) return sym.copyOf(n)
            val prev = IntArray(n) { it - 1 }
            val next = IntArray(n) { if (it + 1 < n) it + 1 else -1 }
            val alive = BooleanArray(n) { true }
            val heap = LongHeap(n)
            for (i in 0 until n - 1) queue(heap, sym, i, i + 1)
            var count = n
            while (heap.size > 0) {
                val top = heap.pop()
                val rank = (top ushr 32).toInt()
                val pos = top.toInt()
                if (!alive[pos]) continue
                val right = next[pos]
                if (right < 0) continue
                val slot = merges.find(sym[pos], sym[right])
                if (slot < 0 || merges.rankAt(slot) != rank) continue
                sym[pos] = merges.newIdAt(slot)
                alive[right] = false
                count--
                next[pos] = next[right]
                if (next[right] >= 0) prev[next[right]] = pos
                if (prev[pos] >= 0) queue(heap, sym, prev[pos], pos)
                if (next[pos] >= 0) queue(heap, sym, pos, next[pos])
            }
            val out = IntArray(count)
            var k = 0
            var i = 0
            while (i >= 0) {
                out[k++] = sym[i]
                i = next[i]
            }
            return out
        }

        private fun queue(heap: LongHeap, sym: IntArray, left: Int, right: Int) {
            val slot = merges.find(sym[left], sym[right])
            if (slot >= 0) heap.push((merges.rankAt(slot).toLong() shl 32) or left.toLong())
        }
    }

    /** Open-addressing map (token id, token id) -> (merge rank, merged token id). */
    private class PairMap(expected: Int) {
        private val mask: Int
        private val shift: Int
        private val keys: LongArray
        private val ranks: IntArray
        private val newIds: IntArray

        init {
            var cap = 16
            while (cap < expected * 2) cap = cap shl 1
            mask = cap - 1
            shift = 64 - Integer.numberOfTrailingZeros(cap)
            keys = LongArray(cap) { EMPTY }
            ranks = IntArray(cap)
            newIds = IntArray(cap)
        }

        private companion object {
            const val EMPTY = -1L
        }

        private fun key(a: Int, b: Int): Long = (a.toLong() shl 32) or (b.toLong() and 0xFFFFFFFFL)

        private fun home(k: Long): Int = ((k * -0x61c8864680b583ebL) ushr shift).toInt()

        /** A later merge of the same pair overwrites an earlier one (as collecting into a HashMap does). */
        fun put(a: Int, b: Int, rank: Int, newId: Int) {
            val k = key(a, b)
            var i = home(k)
            while (keys[i] != EMPTY && keys[i] != k) i = (i + 1) and mask
            keys[i] = k
            ranks[i] = rank
            newIds[i] = newId
        }

        /** Slot of the pair, or -1. */
        fun find(a: Int, b: Int): Int {
            val k = key(a, b)
            var i = home(k)
            while (true) {
                val cur = keys[i]
                if (cur == k) return i
                if (cur == EMPTY) return -1
                i = (i + 1) and mask
            }
        }

        fun rankAt(slot: Int): Int = ranks[slot]

        fun newIdAt(slot: Int): Int = newIds[slot]
    }

    private class LongHeap(capacity: Int) {
        private var a = LongArray(Math.max(capacity, 4))
        var size = 0
            private set

        fun push(v: Long) {
            if (size == a.size) a = a.copyOf(size * 2)
            var i = size++
            while (i > 0) {
                val parent = (i - 1) / 2
                if (a[parent] <= v) break
                a[i] = a[parent]
                i = parent
            }
            a[i] = v
        }

        fun pop(): Long {
            val top = a[0]
            val last = a[--size]
            var i = 0
            while (true) {
                var child = 2 * i + 1
                if (child >= size) break
                if (child + 1 < size && a[child + 1] < a[child]) child++
                if (a[child] >= last) break
                a[i] = a[child]
                i = child
            }
            if (size > 0) a[i] = last
            return top
        }
    }

    // --- small buffers and UTF-8 ----------------------------------------------------------------

    private class IntList(capacity: Int = 16) {
        var data = IntArray(Math.max(capacity, 4))
            private set
        var size = 0
            private set

        fun add(v: Int) {
            if (size == data.size) data = data.copyOf(size * 2)
            data[size++] = v
        }

        fun addAll(vs: IntArray) {
            if (size + vs.size > data.size) data = data.copyOf(Math.max(size * 2, size + vs.size))
            System.arraycopy(vs, 0, data, size, vs.size)
            size += vs.size
        }

        fun toArray(): IntArray = data.copyOf(size)
    }

    internal class ByteBuffer {
        var data = ByteArray(64)
            private set
        var size = 0
            private set

        fun append(bytes: ByteArray) {
            if (size + bytes.size > data.size) data = data.copyOf(Math.max(data.size * 2, size + bytes.size))
            System.arraycopy(bytes, 0, data, size, bytes.size)
            size += bytes.size
        }

        fun append(b: Int) {
            if (size == data.size) data = data.copyOf(data.size * 2)
            data[size++] = b.toByte()
        }

        fun dropFirst(n: Int) {
            System.arraycopy(data, n, data, 0, size - n)
            size -= n
        }

        fun clear() {
            size = 0
        }
    }

    internal object Utf8 {
        /**
         * Decodes bytes[from, to) into [out] like Rust's String::from_utf8_lossy: one U+FFFD per maximal
         * invalid subpart. If not [final], an incomplete but so far valid sequence at the end is left
         * undecoded. Returns the index up to which bytes were consumed.
         */
        fun decodeLossy(bytes: ByteArray, from: Int, to: Int, out: StringBuilder, final: Boolean): Int {
            var i = from
            while (i < to) {
                val b0 = bytes[i].toInt() and 0xFF
                if (b0 < 0x80) {
                    out.append(b0.toChar())
                    i++
                    continue
                }
                val need = continuationCount(b0)
                if (need == 0) {
                    out.append('\uFFFD')
                    i++
                    continue
                }
                // The second byte has a narrower range after some lead bytes (no overlongs, surrogates, > U+10FFFF).
                val lo = when (b0) { 0xE0 -> 0xA0; 0xF0 -> 0x90; else -> 0x80 }
                val hi = when (b0) { 0xED -> 0x9F; 0xF4 -> 0x8F; else -> 0xBF }
                var cp = b0 and (0x3F shr need)
                var j = i + 1
                var ok = true
                while (j <= i + need) {
                    if (j >= to) {
                        if (!final) return i
                        ok = false
                        break
                    }
                    val b = bytes[j].toInt() and 0xFF
                    val min = if (j == i + 1) lo else 0x80
                    val max = if (j == i + 1) hi else 0xBF
                    if (b < min || b > max) {
                        ok = false
                        break
                    }
                    cp = (cp shl 6) or (b and 0x3F)
                    j++
                }
                if (ok) out.appendCodePoint(cp) else out.append('\uFFFD')
                i = j
            }
            return i
        }

        /** Whether bytes[from, to) are valid UTF-8 (Rust's String::from_utf8 succeeds). */
        fun isValid(bytes: ByteArray, from: Int, to: Int): Boolean {
            var i = from
            while (i < to) {
                val b0 = bytes[i].toInt() and 0xFF
                if (b0 < 0x80) {
                    i++
                    continue
                }
                val need = continuationCount(b0)
                if (need == 0 || i + need >= to) return false
                val lo = when (b0) { 0xE0 -> 0xA0; 0xF0 -> 0x90; else -> 0x80 }
                val hi = when (b0) { 0xED -> 0x9F; 0xF4 -> 0x8F; else -> 0xBF }
                for (j in i + 1..i + need) {
                    val b = bytes[j].toInt() and 0xFF
                    val min = if (j == i + 1) lo else 0x80
                    val max = if (j == i + 1) hi else 0xBF
                    if (b < min || b > max) return false
                }
                i += need + 1
            }
            return true
        }

        /** Continuation bytes after a valid lead byte, or 0 for a byte that cannot start a sequence. */
        private fun continuationCount(b0: Int): Int = when (b0) {
            in 0xC2..0xDF -> 1
            in 0xE0..0xEF -> 2
            in 0xF0..0xF4 -> 3
            else -> 0
        }
    }
}

/**
 * Incremental decoding for generation: [push] each new id and get the text it completes. Text that
 * later ids can still change is held back: with the ByteLevel decoder, the bytes of a character
 * split over several tokens until the character is complete; with ByteFallback, a run of `<0xNN>`
 * tokens until it ends (a text token or [flush]), since a run that is not valid UTF-8 as a whole
 * decodes to one U+FFFD per byte. The concatenation of all [push] results and [flush] equals
 * [Tokenizer.decode] of the same ids.
 */
class StreamDetokenizer(private val tok: Tokenizer, private val skipSpecial: Boolean = false) {
    private val state = tok.newDecodeState()

    fun push(id: Int): String {
        if (!tok.decodes(id, skipSpecial)) return ""
        state.push(tok.tokenString(id)!!)
        return state.drain(false)
    }

    fun flush(): String = state.drain(true)
}

private fun typeOf(config: Any, what: String): String {
    val map = config as? Map<*, *> ?: throw TokenizerException("$what is not a JSON object")
    return map["type"] as? String ?: throw TokenizerException("$what has no \"type\"")
}

private fun flag(config: Map<*, *>, key: String, default: Boolean): Boolean {
    val v = config[key] ?: return default
    return v as? Boolean ?: throw TokenizerException("\"$key\" must be true or false, got $v")
}
