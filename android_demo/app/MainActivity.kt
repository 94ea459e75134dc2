package dev.ondevice.demo

import android.app.Activity
import android.content.res.AssetManager
import android.graphics.Typeface
import android.os.Bundle
import android.os.Handler
import android.os.Looper
import android.os.SystemClock
import android.text.InputType
import android.text.SpannableString
import android.text.Spanned
import android.text.style.StyleSpan
import android.view.Gravity
import android.view.View
import android.view.ViewGroup
import android.widget.ArrayAdapter
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.Spinner
import android.widget.TextView
import org.json.JSONObject
import java.io.File
import java.io.FileOutputStream
import java.io.IOException
import java.io.InterruptedIOException
import java.util.Locale
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors

/**
 * The demo's one Activity: pick a bundle and a device profile, load the model, chat with it.
 *
 * Threads: the UI thread owns every view and all UI state (history, flags). Every [Model] call
 * (open, chat, close) runs on one worker thread, in submission order, so a model is never used by
 * two threads at once and close() always runs after the chat that was using it returned. The
 * APK-bundle copy runs on its own thread. Results come back through [post], which drops them once
 * the Activity is destroyed.
 */
class MainActivity : Activity() {

    private class BundleEntry(val dir: File, val label: String) {
        override fun toString() = label
    }

    private class LoadResult(val name: String?, val providers: List<String>?, val error: String?, val ms: Long,
                             val skipped: String = "")

    private val ui = Handler(Looper.getMainLooper())
    private val worker: ExecutorService = Executors.newSingleThreadExecutor { r -> Thread(null, r, "ondevice-model", WORKER_STACK) }

    /** Touched on the worker thread only. */
    private var workerModel: Model? = null

    /** Set by Stop (and New chat / onDestroy); read by the chat's listener on the worker thread. */
    @Volatile private var stopRequested = false
    @Volatile private var destroyed = false

    // UI-thread state
    private val history = ArrayList<Message>()
    private var modelName: String? = null
    private var loading = false
    private var generating = false
    private var copying = false
    /** Bumped by New chat: a generation that finishes under an older epoch leaves history alone. */
    private var chatEpoch = 0
    private var followTranscript = true

    private lateinit var bundleSpinner: Spinner
    private lateinit var profileSpinner: Spinner
    private lateinit var refreshButton: Button
    private lateinit var loadButton: Button
    private lateinit var newChatButton: Button
    private lateinit var sendButton: Button
    private lateinit var stopButton: Button
    private lateinit var bundleInfo: TextView
    private lateinit var modelStatus: TextView
    private lateinit var statsView: TextView
    private lateinit var transcript: TextView
    private lateinit var transcriptScroll: ScrollView
    private lateinit var promptInput: EditText
    private lateinit var maxTokensInput: EditText
    private lateinit var temperatureInput: EditText
    private lateinit var topPInput: EditText

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(buildUi())
        title = getString(R.string.app_name)
        loadProfiles()
        scanBundles(null)
        copyApkBundleIfNeeded()
        updateButtons()
    }

    override fun onDestroy() {
        destroyed = true
        stopRequested = true
        chatEpoch++
        ui.removeCallbacksAndMessages(null)
        // queued behind any running chat (which sees stopRequested and returns soon) or load
        worker.execute {
            val m = workerModel
            workerModel = null
            try {
                m?.close()
            } catch (t: Throwable) {
                // nothing left to report to
            }
        }
        worker.shutdown()
        super.onDestroy()
    }

    // ---------------------------------------------------------------- UI

    private fun dp(v: Int): Int = (v * resources.displayMetrics.density + 0.5f).toInt()

    private fun wrap() = LinearLayout.LayoutParams(ViewGroup.LayoutParams.WRAP_CONTENT, ViewGroup.LayoutParams.WRAP_CONTENT)

    private fun weighted() = LinearLayout.LayoutParams(0, ViewGroup.LayoutParams.WRAP_CONTENT, 1f)

    private fun row(vararg views: Pair<View, LinearLayout.LayoutParams>): LinearLayout {
        val l = LinearLayout(this)
        l.orientation = LinearLayout.HORIZONTAL
        l.setGravity(Gravity.CENTER_VERTICAL)
        for ((v, lp) in views) l.addView(v, lp)
        return l
    }

    private fun label(res: Int): TextView {
        val t = TextView(this)
        t.setText(res)
        t.setPadding(0, 0, dp(8), 0)
        return t
    }

    private fun button(res: Int, onClick: () -> Unit): Button {
        val b = Button(this)
        b.setText(res)
        b.setAllCaps(false)
        b.setOnClickListener { onClick() }
        return b
    }

    private fun smallText(): TextView {
        val t = TextView(this)
        t.textSize = 13f
        t.setPadding(0, dp(2), 0, dp(2))
        return t
    }

    private fun numberField(value: String, decimal: Boolean): EditText {
        val e = EditText(this)
        e.inputType = InputType.TYPE_CLASS_NUMBER or (if (decimal) InputType.TYPE_NUMBER_FLAG_DECIMAL else 0)
        e.setText(value)
        e.setSingleLine(true)
        e.textSize = 14f
        return e
    }

    private fun buildUi(): View {
        val root = LinearLayout(this)
        root.orientation = LinearLayout.VERTICAL
        root.setPadding(dp(8), dp(4), dp(8), dp(4))

        bundleSpinner = Spinner(this)
        refreshButton = button(R.string.refresh) { scanBundles(null) }
        root.addView(row(Pair(label(R.string.bundle), wrap()), Pair(bundleSpinner, weighted()), Pair(refreshButton, wrap())))
        bundleInfo = smallText()
        root.addView(bundleInfo)

        profileSpinner = Spinner(this)
        root.addView(row(Pair(label(R.string.profile), wrap()), Pair(profileSpinner, weighted())))

        loadButton = button(R.string.load) { onLoad() }
        newChatButton = button(R.string.new_chat) { onNewChat() }
        modelStatus = smallText()
        modelStatus.setText(R.string.no_model)
        modelStatus.setPadding(dp(8), 0, 0, 0)
        root.addView(row(Pair(loadButton, wrap()), Pair(modelStatus, weighted()), Pair(newChatButton, wrap())))

        val defaults = Settings()
        maxTokensInput = numberField(defaults.maxTokens.toString(), false)
        temperatureInput = numberField(defaults.temperature.toString(), true)
        topPInput = numberField(defaults.topP.toString(), true)
        root.addView(row(
            Pair(label(R.string.max_tokens), wrap()), Pair(maxTokensInput, weighted()),
            Pair(label(R.string.temperature), wrap()), Pair(temperatureInput, weighted()),
            Pair(label(R.string.top_p), wrap()), Pair(topPInput, weighted())))

        transcript = TextView(this)
        transcript.textSize = 15f
        transcript.setText("", TextView.BufferType.EDITABLE)
        transcriptScroll = ScrollView(this)
        transcriptScroll.isFillViewport = true
        transcriptScroll.addView(transcript, ViewGroup.LayoutParams(ViewGroup.LayoutParams.MATCH_PARENT, ViewGroup.LayoutParams.WRAP_CONTENT))
        // keep the newest text in view while the user has not scrolled away from the bottom
        transcript.addOnLayoutChangeListener { _, _, _, _, _, _, _, _, _ ->
            if (followTranscript) transcriptScroll.scrollTo(0, Math.max(0, transcript.height - transcriptScroll.height))
        }
        root.addView(transcriptScroll, LinearLayout.LayoutParams(ViewGroup.LayoutParams.MATCH_PARENT, 0, 1f))

        statsView = smallText()
        root.addView(statsView)

        promptInput = EditText(this)
        promptInput.setHint(R.string.prompt_hint)
        promptInput.inputType = InputType.TYPE_CLASS_TEXT or InputType.TYPE_TEXT_FLAG_MULTI_LINE or
            InputType.TYPE_TEXT_FLAG_CAP_SENTENCES
        promptInput.maxLines = 4
        sendButton = button(R.string.send) { onSend() }
        stopButton = button(R.string.stop) { onStopClicked() }
        root.addView(row(Pair(promptInput, weighted()), Pair(sendButton, wrap()), Pair(stopButton, wrap())))
        return root
    }

    private fun updateButtons() {
        val busy = loading || generating
        refreshButton.isEnabled = !copying
        loadButton.isEnabled = !busy && !copying && bundleSpinner.selectedItem is BundleEntry
        sendButton.isEnabled = modelName != null && !busy
        stopButton.isEnabled = generating && !stopRequested
    }

    private fun post(r: () -> Unit) {
        ui.post { if (!destroyed) r() }
    }

    private fun bold(s: String): CharSequence {
        val sp = SpannableString(s)
        sp.setSpan(StyleSpan(Typeface.BOLD), 0, s.length, Spanned.SPAN_EXCLUSIVE_EXCLUSIVE)
        return sp
    }

    private fun appendTranscript(text: CharSequence) {
        // follow only if the view is (nearly) at the bottom before this append
        followTranscript = transcriptScroll.scrollY + transcriptScroll.height >= transcript.height - dp(48)
        transcript.append(text)
    }

    // ---------------------------------------------------------------- bundles

    /** null: a usable bundle; "": not a bundle at all (no manifest.json); else why it is skipped. */
    private fun checkBundle(dir: File): String? {
        val mf = File(dir, "manifest.json")
        if (!mf.isFile) return ""
        return try {
            val backends = JSONObject(mf.readText()).optJSONObject("backends")
            when {
                backends == null -> "manifest.json has no backends"
                !backends.has("android") -> "no backends.android (run the Android export on it)"
                else -> null
            }
        } catch (e: Exception) {
            "unreadable manifest.json: ${e.message}"
        }
    }

    private fun scanBundles(select: File?) {
        val previous = select ?: (bundleSpinner.selectedItem as? BundleEntry)?.dir
        val found = ArrayList<BundleEntry>()
        val notes = ArrayList<String>()
        val roots = ArrayList<Pair<File, String>>()
        val external = getExternalFilesDir(null)
        if (external != null) roots.add(Pair(external, "external"))
        roots.add(Pair(filesDir, "internal"))
        val fromApk = File(filesDir, APK_BUNDLE_DIR)
        for ((root, where) in roots) {
            val dirs = root.listFiles() ?: continue
            for (dir in dirs.filter { it.isDirectory && !it.name.endsWith(PARTIAL) }.sortedBy { it.name }) {
                val problem = checkBundle(dir)
                if (problem == null) {
                    found.add(BundleEntry(dir, if (dir == fromApk) "${dir.name}  (from APK)" else "${dir.name}  ($where)"))
                } else if (problem.isNotEmpty()) {
                    notes.add("skipped ${dir.name} ($where): $problem")
                }
            }
        }
        val adapter = ArrayAdapter<Any>(this, android.R.layout.simple_spinner_item, ArrayList<Any>(found))
        adapter.setDropDownViewResource(android.R.layout.simple_spinner_dropdown_item)
        bundleSpinner.adapter = adapter
        val keep = found.indexOfFirst { it.dir == previous }
        if (keep >= 0) bundleSpinner.setSelection(keep)

        val info = StringBuilder()
        if (found.isEmpty()) {
            info.append(getString(R.string.no_bundle_hint))
            info.append("\nLooked in: ")
            info.append(roots.joinToString(", ") { it.first.path })
        } else {
            info.append("${found.size} bundle(s) found")
        }
        for (n in notes) info.append('\n').append(n)
        if (!copying) bundleInfo.text = info
        updateButtons()
    }

    /** If the APK carries assets/bundle/, copy it once (per APK install/update) into filesDir/bundle. */
    private fun copyApkBundleIfNeeded() {
        val top = try {
            assets.list(APK_BUNDLE_DIR)
        } catch (e: IOException) {
            null
        }
        if (top == null || top.isEmpty()) return
        val stamp = try {
            val pi = packageManager.getPackageInfo(packageName, 0)
            "${pi.versionCode}:${pi.lastUpdateTime}"
        } catch (e: Exception) {
            "unknown"
        }
        val target = File(filesDir, APK_BUNDLE_DIR)
        val stampFile = File(target, STAMP)
        if (stampFile.isFile && checkBundle(target) == null && readOrNull(stampFile) == stamp) return

        copying = true
        bundleInfo.text = "Copying the bundle from the APK..."
        updateButtons()
        Thread(Runnable {
            val t0 = SystemClock.elapsedRealtime()
            var error: String? = null
            try {
                copyAssetTree(target, stamp)
            } catch (t: Throwable) {
                error = describe(t)
            }
            val secs = (SystemClock.elapsedRealtime() - t0) / 1000.0
            val err = error
            post {
                copying = false
                scanBundles(if (err == null) target else null)
                if (err != null) {
                    bundleInfo.text = "Copying the bundle from the APK failed: $err\n" + bundleInfo.text
                } else {
                    bundleInfo.text = String.format(Locale.US, "Bundle copied from the APK in %.1f s\n", secs) + bundleInfo.text
                }
                updateButtons()
            }
        }, "ondevice-copy").start()
    }

    private fun readOrNull(f: File): String? = try {
        f.readText()
    } catch (e: IOException) {
        null
    }

    private fun listAssetFiles(path: String, out: MutableList<String>) {
        val children = assets.list(path)
        if (children == null || children.isEmpty()) {
            out.add(path) // aapt stores no empty folders: an entry without children is a file
        } else {
            for (c in children) listAssetFiles("$path/$c", out)
        }
    }

    /** Background thread: stream-copies assets/bundle/ into filesDir/bundle.partial, then renames it. */
    private fun copyAssetTree(target: File, stamp: String) {
        val partial = File(filesDir, APK_BUNDLE_DIR + PARTIAL)
        partial.deleteRecursively()
        val files = ArrayList<String>()
        listAssetFiles(APK_BUNDLE_DIR, files)
        var total = 0L
        var totalKnown = true
        for (p in files) {
            try {
                // works for the stored (uncompressed) entries build_apk.sh writes
                assets.openFd(p).use { total += it.length }
            } catch (e: IOException) {
                totalKnown = false
            }
        }
        if (totalKnown && filesDir.usableSpace < total + (16L shl 20))
            throw IOException("not enough free space: need ${mb(total)} MB, have ${mb(filesDir.usableSpace)} MB")
        val buf = ByteArray(1 shl 20)
        var done = 0L
        var lastPost = 0L
        for ((i, p) in files.withIndex()) {
            val out = File(partial, p.substring(APK_BUNDLE_DIR.length + 1))
            val parent = out.parentFile
            if (parent != null && !parent.isDirectory && !parent.mkdirs()) throw IOException("cannot create $parent")
            assets.open(p, AssetManager.ACCESS_STREAMING).use { input ->
                FileOutputStream(out).use { output ->
                    var n = input.read(buf)
                    while (n >= 0) {
                        output.write(buf, 0, n)
                        done += n
                        if (destroyed) throw InterruptedIOException("the app was closed during the copy")
                        val now = SystemClock.elapsedRealtime()
                        if (now - lastPost >= 200) {
                            lastPost = now
                            val text = "Copying the bundle from the APK: file ${i + 1}/${files.size}, " +
                                (if (totalKnown && total > 0) "${mb(done)} / ${mb(total)} MB (${done * 100 / total}%)" else "${mb(done)} MB")
                            post { bundleInfo.text = text }
                        }
                        n = input.read(buf)
                    }
                }
            }
        }
        File(partial, STAMP).writeText(stamp)
        if (target.exists() && !target.deleteRecursively()) throw IOException("cannot remove the old $target")
        if (!partial.renameTo(target)) throw IOException("cannot rename $partial to $target")
    }

    private fun mb(bytes: Long): Long = bytes shr 20

    // ---------------------------------------------------------------- profiles

    private fun loadProfiles() {
        val names = try {
            (assets.list(PROFILES_DIR) ?: arrayOf()).filter { it.endsWith(".json") && it != "schema.json" }.sorted()
        } catch (e: IOException) {
            emptyList<String>()
        }
        val items = ArrayList<String>(names)
        items.add(getString(R.string.no_profile))
        val adapter = ArrayAdapter<String>(this, android.R.layout.simple_spinner_item, items)
        adapter.setDropDownViewResource(android.R.layout.simple_spinner_dropdown_item)
        profileSpinner.adapter = adapter
        val def = names.indexOf(DEFAULT_PROFILE)
        profileSpinner.setSelection(if (def >= 0) def else 0)
    }

    // ---------------------------------------------------------------- model

    private fun describe(t: Throwable): String {
        if (t is ModelException) return t.message ?: "ModelException"
        val sb = StringBuilder(t.toString())
        var c = t.cause
        var depth = 0
        while (c != null && c !== t && depth < 4) {
            sb.append("\ncaused by: ").append(c.toString())
            c = c.cause
            depth++
        }
        return sb.toString()
    }

    private fun onLoad() {
        val entry = bundleSpinner.selectedItem as? BundleEntry ?: return
        if (loading || generating || copying) return
        val profileName = profileSpinner.selectedItem as? String
        val profileJson: String? = if (profileName == null || profileName == getString(R.string.no_profile)) null else {
            try {
                assets.open("$PROFILES_DIR/$profileName").bufferedReader().use { it.readText() }
            } catch (e: IOException) {
                modelStatus.text = "Cannot read profile $profileName: ${e.message}"
                return
            }
        }
        loading = true
        modelName = null
        statsView.text = ""
        modelStatus.text = "Loading ${entry.dir.name} (${profileName ?: "no profile"})..."
        updateButtons()
        worker.execute {
            val old = workerModel
            workerModel = null
            try {
                old?.close()
            } catch (t: Throwable) {
                // the old session is gone either way
            }
            val t0 = SystemClock.elapsedRealtime()
            var opened: Model? = null
            val result = try {
                val m = Model.open(entry.dir, profileJson)
                opened = m
                val r = LoadResult(m.name, ArrayList(m.providers), null, SystemClock.elapsedRealtime() - t0, m.skippedProviders)
                workerModel = m
                r
            } catch (t: Throwable) {
                val half = opened
                if (half != null && workerModel !== half) { // opened, but reading it failed
                    try {
                        half.close()
                    } catch (t2: Throwable) {
                    }
                }
                LoadResult(null, null, describe(t), SystemClock.elapsedRealtime() - t0)
            }
            post { onLoaded(result) }
        }
    }

    private fun onLoaded(r: LoadResult) {
        loading = false
        if (r.error == null) {
            modelName = r.name
            modelStatus.text = "${r.name}: loaded in ${r.ms} ms\nproviders: ${r.providers?.joinToString(", ")}" +
                if (r.skipped.isNotEmpty()) "\nnot used: ${r.skipped}" else ""
        } else {
            modelName = null
            modelStatus.text = "Load failed after ${r.ms} ms:\n${r.error}"
        }
        updateButtons()
    }

    private fun readSettings(): Settings {
        val s = Settings()
        maxTokensInput.text.toString().trim().toIntOrNull()?.let { if (it > 0) s.maxTokens = it }
        temperatureInput.text.toString().trim().toFloatOrNull()?.let { if (it >= 0f) s.temperature = it }
        topPInput.text.toString().trim().toFloatOrNull()?.let { if (it > 0f && it <= 1f) s.topP = it }
        return s
    }

    private fun onSend() {
        val text = promptInput.text.toString().trim()
        if (text.isEmpty() || modelName == null || generating || loading) return
        promptInput.setText("")
        history.add(Message("user", text))
        val snapshot = ArrayList(history)
        val settings = readSettings()
        if (transcript.length() > 0) appendTranscript("\n\n")
        appendTranscript(bold(getString(R.string.you) + ": "))
        appendTranscript(text)
        appendTranscript("\n\n")
        appendTranscript(bold(getString(R.string.assistant) + ": "))
        followTranscript = true
        stopRequested = false
        generating = true
        statsView.text = "generating..."
        val epoch = ++chatEpoch
        updateButtons()
        worker.execute {
            val full = StringBuilder()
            val listener = object : TokenListener {
                override fun onText(piece: String) {
                    full.append(piece)
                    post { if (epoch == chatEpoch) appendTranscript(piece) }
                }

                override fun isCancelled(): Boolean = stopRequested
            }
            var stats: Stats? = null
            var error: String? = null
            val m = workerModel
            if (m == null) {
                error = "no model loaded"
            } else {
                try {
                    stats = m.chat(snapshot, settings, listener)
                } catch (t: Throwable) {
                    error = describe(t)
                }
            }
            val reply = full.toString()
            val st = stats
            val err = error
            post { onChatDone(epoch, reply, st, err) } // runs after every onText post above
        }
    }

    private fun onChatDone(epoch: Int, reply: String, stats: Stats?, error: String?) {
        generating = false
        if (epoch == chatEpoch) {
            if (error != null || stats == null) {
                // keep history alternating: drop the user turn that got no answer
                if (history.isNotEmpty() && history[history.size - 1].role == "user") history.removeAt(history.size - 1)
                appendTranscript(bold("\n[error] "))
                appendTranscript(error ?: "no stats returned")
                statsView.text = "failed"
            } else {
                history.add(Message("assistant", reply))
                if (stats.finishReason == "cancelled") appendTranscript(bold(" [stopped]"))
                statsView.text = formatStats(stats)
            }
        }
        updateButtons()
    }

    private fun formatStats(s: Stats): String = String.format(Locale.US,
        "TTFT %.0f ms | decode %.1f tok/s | prompt %d tok (%d prefilled, %.1f tok/s) | %d generated | finish: %s",
        s.ttftMs, s.decodeTokPerS, s.promptTokens, s.prefilledTokens, s.prefillTokPerS, s.generatedTokens, s.finishReason)

    private fun onStopClicked() {
        stopRequested = true
        updateButtons()
    }

    private fun onNewChat() {
        if (generating) stopRequested = true // its result is dropped (older epoch)
        chatEpoch++
        history.clear()
        transcript.setText("", TextView.BufferType.EDITABLE)
        statsView.text = ""
        followTranscript = true
        updateButtons()
    }

    companion object {
        private const val APK_BUNDLE_DIR = "bundle"
        private const val PARTIAL = ".partial"
        private const val STAMP = ".copied-from-apk"
        private const val PROFILES_DIR = "profiles"
        private const val DEFAULT_PROFILE = "generic-arm64-cpu.json"
        /** The worker parses tokenizer.json (recursive JSON reader): more than the default ~1 MB. */
        private const val WORKER_STACK = 8L shl 20
    }
}
