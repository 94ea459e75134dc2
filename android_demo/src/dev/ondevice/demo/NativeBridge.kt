package dev.ondevice.demo

/** The C bridge over the ONNX Runtime C API (jni/ondevice_bridge.c): one session and its KV cache
 *  per handle. A handle is used by one thread at a time (Model serializes its calls). */
object NativeBridge {
    init {
        System.loadLibrary("ondevice")
    }

    external fun ortVersion(): String

    /** A session of the graph with `providers` tried in order (CPU is always last); throws
     *  RuntimeException with ONNX Runtime's message when the graph cannot be loaded. */
    external fun open(graphPath: String, providers: Array<String>, threads: Int, layers: Int, kvHeads: Int,
                      headDim: Int, vocab: Int, capacity: Int, maxContext: Int): Long

    /** "A,B,CPUExecutionProvider" or that + ";skipped:X (why),Y (why)". */
    external fun providers(handle: Long): String

    external fun capacity(handle: Long): Int

    /** Runs ids[0 until count] at positions pastLen.. ; the last position's logits land in `logits`. */
    external fun step(handle: Long, ids: IntArray, count: Int, pastLen: Int, logits: FloatArray)

    external fun close(handle: Long)
}
