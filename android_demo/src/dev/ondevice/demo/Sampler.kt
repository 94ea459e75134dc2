package dev.ondevice.demo

import java.util.Random

class Settings {
    var maxTokens: Int = 256
    var temperature: Float = 0f  // 0: greedy
    var topP: Float = 0.95f
    var seed: Long = 0L
}

/** Greedy (temperature 0: the first largest logit, as numpy's argmax) or temperature + top-p. */
class Sampler(private val settings: Settings) {
    private val random = Random(settings.seed)
    private var order = IntArray(0)

    fun next(logits: FloatArray, size: Int): Int {
        if (settings.temperature <= 0f) return argmax(logits, size)
        val max = logits[argmax(logits, size)]
        val probs = DoubleArray(size)
        var sum = 0.0
        for (i in 0 until size) {
            probs[i] = Math.exp(((logits[i] - max) / settings.temperature).toDouble())
            sum += probs[i]
        }
        // top-p: the most likely tokens whose probabilities add up to top_p (at least one)
        if (order.size != size) order = IntArray(size) { it }
        val sorted = order.sortedByDescending { probs[it] }
        var kept = 0
        var mass = 0.0
        while (kept < sorted.size && (kept == 0 || mass < settings.topP * sum)) {
            mass += probs[sorted[kept]]
            kept++
        }
        var r = random.nextDouble() * mass
        for (i in 0 until kept) {
            r -= probs[sorted[i]]
            if (r <= 0) return sorted[i]
        }
        return sorted[kept - 1]
    }

    companion object {
        fun argmax(logits: FloatArray, size: Int): Int {
            var best = 0
            for (i in 1 until size) if (logits[i] > logits[best]) best = i
            return best
        }
    }
}
