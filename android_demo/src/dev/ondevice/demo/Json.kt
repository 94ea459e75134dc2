package dev.ondevice.demo

/** Malformed JSON; the message names the character offset where parsing failed. */
class JsonException(message: String) : RuntimeException(message)

/**
 * A small strict JSON (RFC 8259) reader and writer.
 *
 * [parse] returns `Map<String, Any?>` (a LinkedHashMap in document order; a repeated key keeps its
 * last value), `List<Any?>`, `String`, `Long` (integers without fraction or exponent that fit in
 * 64 bits), `Double` (everything else), `Boolean` or `null`.
 */
object Json {
    /** Nesting deeper than this is rejected rather than overflowing the (small, on Android) stack. */
    const val MAX_DEPTH = 512

    fun parse(text: String): Any? = Parser(text).parseDocument()

    /** [s] as a JSON string literal, quotes included. Non-ASCII characters are written as they are. */
    fun quote(s: String): String {
        val sb = StringBuilder(s.length + 2)
        appendQuoted(sb, s)
        return sb.toString()
    }

    /** Compact JSON for maps (keys as strings), lists/arrays, strings, numbers, booleans and null. */
    fun write(value: Any?): String {
        val sb = StringBuilder()
        appendValue(sb, value)
        return sb.toString()
    }

    fun appendQuoted(sb: StringBuilder, s: String) {
        sb.append('"')
        for (c in s) {
            when (c) {
                '"' -> sb.append("\\\"")
                '\\' -> sb.append("\\\\")
                '\n' -> sb.append("\\n")
                '\r' -> sb.append("\\r")
                '\t' -> sb.append("\\t")
                '\b' -> sb.append("\\b")
                '\u000C' -> sb.append("\\f")
                else -> if (c < ' ') appendUnicodeEscape(sb, c) else sb.append(c)
            }
        }
        sb.append('"')
    }

    private fun appendUnicodeEscape(sb: StringBuilder, c: Char) {
        val hex = Integer.toHexString(c.toInt())
        sb.append("\\u")
        for (i in hex.length until 4) sb.append('0')
        sb.append(hex)
    }

    private fun appendValue(sb: StringBuilder, value: Any?) {
        when (value) {
            null -> sb.append("null")
            is String -> appendQuoted(sb, value)
            is Boolean -> sb.append(if (value) "true" else "false")
            is Double -> appendDouble(sb, value)
            is Float -> appendDouble(sb, value.toDouble())
            is Number -> sb.append(value.toLong())
            is Map<*, *> -> {
                sb.append('{')
                var first = true
                for ((k, v) in value) {
                    if (!first) sb.append(',')
                    first = false
                    appendQuoted(sb, k.toString())
                    sb.append(':')
                    appendValue(sb, v)
                }
                sb.append('}')
            }
            is Iterable<*> -> appendArray(sb, value.iterator())
            is IntArray -> appendArray(sb, value.iterator())
            is LongArray -> appendArray(sb, value.iterator())
            is Array<*> -> appendArray(sb, value.iterator())
            else -> throw IllegalArgumentException("cannot write ${value.javaClass.name} as JSON")
        }
    }

    private fun appendDouble(sb: StringBuilder, d: Double) {
        if (d.isNaN() || d.isInfinite()) throw IllegalArgumentException("JSON has no $d")
        sb.append(d) // Java's Double.toString is valid JSON for finite values ("1.0E-5", "-0.0")
    }

    private fun appendArray(sb: StringBuilder, items: Iterator<*>) {
        sb.append('[')
        var first = true
        for (v in items) {
            if (!first) sb.append(',')
            first = false
            appendValue(sb, v)
        }
        sb.append(']')
    }

    /** Recursive descent over the String by index; strings without escapes are taken as substrings. */
    private class Parser(private val s: String) {
        private var pos = 0
        private val sb = StringBuilder()

        fun parseDocument(): Any? {
            skipWhitespace()
            val value = parseValue(0)
            skipWhitespace()
            if (pos != s.length) fail("unexpected ${describe(pos)} after the JSON value")
            return value
        }

        private fun fail(message: String, at: Int = pos): Nothing = throw JsonException("$message at offset $at")

        private fun describe(i: Int): String =
            if (i >= s.length) "end of input" else "character '${printable(s[i])}'"

        private fun printable(c: Char): String =
            if (c < ' ' || c.toInt() == 0x7F) "\\u%04x".format(c.toInt()) else c.toString()

        private fun skipWhitespace() {
            while (pos < s.length) {
                val c = s[pos]
                if (c == ' ' || c == '\n' || c == '\r' || c == '\t') pos++ else return
            }
        }

        private fun parseValue(depth: Int): Any? {
            if (pos >= s.length) fail("expected a JSON value but found end of input")
            return when (s[pos]) {
                '{' -> parseObject(depth + 1)
                '[' -> parseArray(depth + 1)
                '"' -> parseString()
                't' -> literal("true", true)
                'f' -> literal("false", false)
                'n' -> literal("null", null)
                else -> if (s[pos] == '-' || s[pos] in '0'..'9') parseNumber()
                        else fail("expected a JSON value but found ${describe(pos)}")
            }
        }

        private fun literal(word: String, value: Any?): Any? {
            if (!s.startsWith(word, pos)) fail("invalid literal (expected '$word')")
            pos += word.length
            return value
        }

        private fun checkDepth(depth: Int) {
            if (depth > MAX_DEPTH) fail("nesting deeper than $MAX_DEPTH")
        }

        private fun parseObject(depth: Int): Map<String, Any?> {
            checkDepth(depth)
            pos++ // '{'
            val map = LinkedHashMap<String, Any?>()
            skipWhitespace()
            if (pos < s.length && s[pos] == '}') {
                pos++
                return map
            }
            while (true) {
                skipWhitespace()
                if (pos >= s.length || s[pos] != '"') fail("expected a string key but found ${describe(pos)}")
                val key = parseString()
                skipWhitespace()
                expect(':')
                skipWhitespace()
                map[key] = parseValue(depth)
                skipWhitespace()
                if (pos >= s.length) fail("unterminated object: expected ',' or '}' but found end of input")
                when (s[pos++]) {
                    ',' -> {}
                    '}' -> return map
                    else -> fail("expected ',' or '}' in object but found ${describe(pos - 1)}", pos - 1)
                }
            }
        }

        private fun parseArray(depth: Int): List<Any?> {
            checkDepth(depth)
            pos++ // '['
            val list = ArrayList<Any?>()
            skipWhitespace()
            if (pos < s.length && s[pos] == ']') {
                pos++
                return list
            }
            while (true) {
                skipWhitespace()
                list.add(parseValue(depth))
                skipWhitespace()
                if (pos >= s.length) fail("unterminated array: expected ',' or ']' but found end of input")
                when (s[pos++]) {
                    ',' -> {}
                    ']' -> return list
                    else -> fail("expected ',' or ']' in array but found ${describe(pos - 1)}", pos - 1)
                }
            }
        }

        private fun expect(c: Char) {
            if (pos >= s.length || s[pos] != c) fail("expected '$c' but found ${describe(pos)}")
            pos++
        }

        private fun parseString(): String {
            val start = ++pos // after the opening quote
            // Fast path: no escapes, so the literal is a plain substring.
            while (pos < s.length) {
                val c = s[pos]
                if (c == '"') return s.substring(start, pos++)
                if (c == '\\') break
                if (c < ' ') fail("unescaped control character ${printable(c)} in string")
                pos++
            }
            sb.setLength(0)
            sb.append(s, start, pos)
            while (true) {
                if (pos >= s.length) fail("unterminated string starting", start - 1)
                val c = s[pos]
                when {
                    c == '"' -> {
                        pos++
                        return sb.toString()
                    }
                    c == '\\' -> parseEscape()
                    c < ' ' -> fail("unescaped control character ${printable(c)} in string")
                    else -> {
                        sb.append(c)
                        pos++
                    }
                }
            }
        }

        /** One escape sequence at [pos] (a backslash) into [sb]. Surrogate pairs written as two \u escapes
         * come out as the two UTF-16 units, i.e. the right code point. */
        private fun parseEscape() {
            val at = pos
            if (pos + 1 >= s.length) fail("unterminated escape sequence", at)
            val e = s[pos + 1]
            pos += 2
            when (e) {
                '"' -> sb.append('"')
                '\\' -> sb.append('\\')
                '/' -> sb.append('/')
                'b' -> sb.append('\b')
                'f' -> sb.append('\u000C')
                'n' -> sb.append('\n')
                'r' -> sb.append('\r')
                't' -> sb.append('\t')
                'u' -> sb.append(parseHex4(at))
                else -> fail("invalid escape '\\${printable(e)}'", at)
            }
        }

        private fun parseHex4(at: Int): Char {
            if (pos + 4 > s.length) fail("truncated \\u escape", at)
            var v = 0
            for (i in 0 until 4) {
                val d = hexValue(s[pos + i])
                if (d < 0) fail("invalid hex digit in \\u escape", pos + i)
                v = v * 16 + d
            }
            pos += 4
            return v.toChar()
        }

        private fun hexValue(c: Char): Int = when (c) {
            in '0'..'9' -> c - '0'
            in 'a'..'f' -> c - 'a' + 10
            in 'A'..'F' -> c - 'A' + 10
            else -> -1
        }

        private fun parseNumber(): Any {
            val start = pos
            if (s[pos] == '-') pos++
            if (pos >= s.length || s[pos] !in '0'..'9') fail("invalid number: expected a digit", pos)
            if (s[pos] == '0') {
                pos++
                if (pos < s.length && s[pos] in '0'..'9') fail("invalid number: leading zero", start)
            } else {
                skipDigits()
            }
            var integral = true
            if (pos < s.length && s[pos] == '.') {
                integral = false
                pos++
                requireDigit("after the decimal point")
                skipDigits()
            }
            if (pos < s.length && (s[pos] == 'e' || s[pos] == 'E')) {
                integral = false
                pos++
                if (pos < s.length && (s[pos] == '+' || s[pos] == '-')) pos++
                requireDigit("in the exponent")
                skipDigits()
            }
            val text = s.substring(start, pos)
            if (integral && pos - start <= 18) return text.toLong()
            if (integral) {
                try {
                    return text.toLong()
                } catch (e: NumberFormatException) {
                    // beyond 64 bits: fall through to a Double
                }
            }
            return text.toDouble()
        }

        private fun requireDigit(where: String) {
            if (pos >= s.length || s[pos] !in '0'..'9') fail("invalid number: expected a digit $where")
        }

        private fun skipDigits() {
            while (pos < s.length && s[pos] in '0'..'9') pos++
        }
    }
}
