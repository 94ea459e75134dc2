package dev.ondevice.demo

class Message(val role: String, val content: String)

/** The model's chat template as text around each message, as the converter derived it from the
 *  jinja template and checked it (converters/export_android.py chat_format / format_chat). */
class ChatFormat(private val roles: Map<String, Pair<String, String>>, private val firstSystem: String,
                 private val generationPrompt: String) {

    fun render(messages: List<Message>, addGenerationPrompt: Boolean = true): String {
        val out = StringBuilder()
        if (messages.isNotEmpty() && messages[0].role != "system") out.append(firstSystem)
        for (m in messages) {
            val around = roles[m.role] ?: throw ModelException("the chat template has no role '${m.role}'")
            out.append(around.first).append(m.content).append(around.second)
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
            return ChatFormat(roles, record["first_system"] as? String ?: "", record["generation_prompt"] as? String ?: "")
        }
    }
}
