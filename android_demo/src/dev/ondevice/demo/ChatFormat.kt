package dev.ondevice.demo

class Message(val role: String, val content: String)

/** The model's chat template as text around each message, as the converter derived it from the
 *  jinja template and checked it (converters/export_android.py chat_format / format_chat). */
class ChatFormat(private val roles: Map<String, Pair<String, String>>, private val firstSystem: String,
                 private val generationPrompt: String, private val stripContent: Boolean = false) {

    fun render(messages: List<Message>, addGenerationPrompt: Boolean = true): String {
        val out = StringBuilder()
        if (messages.isNotEmpty() && messages[0].role != "system") out.append(firstSystem)
        for (m in messages) {
            val around = roles[m.role] ?: throw ModelException("this model's chat template has no '${m.role}' " +
                "message of its own" + if (m.role == "system") " (it folds the system prompt into the first turn)" else "")
            out.append(around.first).append(if (stripContent) pythonStrip(m.content) else m.content).append(around.second)
        }
        if (addGenerationPrompt) out.append(generationPrompt)
        return out.toString()
    }

    companion object {
        fun fromManifest(record: Map<String, Any?>): ChatFormat {
            val roles = LinkedHashMap<String, Pair<String, String>>()
            for ((role, around) in record["roles"] as? Map<*, *> ?: throw ModelException("chat_format has no roles")) {
                val pair = around as? List<*>
                if (role !is String || pair == null || pair.size != 2 || pair[0] !is String || pair[1] !is String)
                    throw ModelException("chat_format role $role is not [before, after]")
                roles[role] = Pair(pair[0] as String, pair[1] as String)
            }
            return ChatFormat(roles, record["first_system"] as? String ?: "", record["generation_prompt"] as? String ?: "",
                              record["strip_content"] == true)
        }

        /** Python's str.strip() (what jinja's trim filter does): its whitespace, not Java's. */
        fun pythonStrip(s: String): String {
            var start = 0
            var end = s.length
            while (start < end && isPythonSpace(s[start])) start++
            while (end > start && isPythonSpace(s[end - 1])) end--
            return s.substring(start, end)
        }

        private fun isPythonSpace(c: Char): Boolean = c in '\t'..'\r' || c in '\u001c'..'\u0020' || c == '\u0085' ||
            c == '\u00a0' || c == '\u1680' || c in '\u2000'..'\u200a' || c == '\u2028' || c == '\u2029' ||
            c == '\u202f' || c == '\u205f' || c == '\u3000'
    }
}
