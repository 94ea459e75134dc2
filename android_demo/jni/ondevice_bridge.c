/* JNI bridge from the app (dev.ondevice.demo.NativeBridge) to the ONNX Runtime C API.
 *
 * One session of the bundle's android.onnx (converters/export_android.py) and its KV cache, kept
 * here between steps: the graph reads the cache [1, kv_heads, capacity, head_dim] per layer in
 * place and returns only the new tokens' keys and values, which step() writes into their rows.
 * A decode step allocates nothing: its input and output OrtValues wrap buffers made once.
 *
 * Builds for Android arm64 against ORT 1.17.1 and for the host against the PyPI wheel's
 * libonnxruntime.so (and ORT 1.17.0) from the same source. Only C API 17 members are used. */
#ifndef __ANDROID__
#define _GNU_SOURCE /* dladdr */
#endif
#include <jni.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "onnxruntime_c_api.h"

#ifdef __ANDROID__
#include <android/log.h>
#define LOGI(...) __android_log_print(ANDROID_LOG_INFO, "ondevice", __VA_ARGS__)
/* sysroot-lite has no dlfcn.h; Bionic's values (the same as glibc's) */
#define RTLD_NOW 2
#define RTLD_NOLOAD 4
typedef struct { const char *dli_fname; void *dli_fbase; const char *dli_sname; void *dli_saddr; } Dl_info;
void *dlopen(const char *filename, int flags);
void *dlsym(void *handle, const char *symbol);
int dladdr(const void *addr, Dl_info *info);
#else
#include <dlfcn.h>
#define LOGI(...) ((void)0)
#endif

#define BRIDGE_ORT_API_VERSION 17 /* the Android runtime's newest table; never the header's */
_Static_assert(BRIDGE_ORT_API_VERSION <= ORT_API_VERSION, "ORT header older than the requested API");

typedef struct {
    const OrtApi *api;
    OrtEnv *env;
    OrtSession *session;
    OrtMemoryInfo *mem;
    int layers, kv, hd, vocab, capacity, max_context;
    int n_in, n_out;
    char **in_names, **out_names;
    float *cache;          /* 2 * layers blocks of [kv, capacity, hd]: layer i's keys at 2i, values at 2i + 1 */
    OrtValue **past;       /* 2 * layers values over the cache blocks */
    int64_t ids1[1], past_len[1];
    OrtValue *ids1_value, *past_len_value;
    float *logits;         /* [vocab]: the last row */
    OrtValue *logits_value;
    float *new1;           /* decode step outputs: 2 * layers blocks of [kv, 1, hd] */
    OrtValue **new1_values;
    char providers[512];   /* what the session was made with, comma-separated */
} Bridge;

static const OrtApi *ort(void) {
    static const OrtApi *api;
    if (!api) api = OrtGetApiBase()->GetApi(BRIDGE_ORT_API_VERSION);
    return api;
}

static void throw_rt(JNIEnv *env, const char *msg) {
    jclass cls = (*env)->FindClass(env, "java/lang/RuntimeException");
    if (cls) (*env)->ThrowNew(env, cls, msg);
}

/* Turns a failed OrtStatus into a Java exception; returns 1 when it failed. */
static int failed(JNIEnv *env, const OrtApi *api, OrtStatus *st, const char *what) {
    if (!st) return 0;
    char buf[1024];
    snprintf(buf, sizeof buf, "%s: %s", what, api->GetErrorMessage(st));
    api->ReleaseStatus(st);
    throw_rt(env, buf);
    return 1;
}

static OrtStatus *tensor(Bridge *b, void *data, size_t bytes, const int64_t *shape, size_t rank,
                         ONNXTensorElementDataType type, OrtValue **out) {
    return b->api->CreateTensorWithDataAsOrtValue(b->mem, data, bytes, shape, rank, type, out);
}

static size_t block_floats(Bridge *b) { return (size_t)b->kv * (size_t)b->capacity * (size_t)b->hd; }

/* (Re)make the cache at `capacity` slots, keeping the first `keep` rows of every head. */
static OrtStatus *make_cache(Bridge *b, int capacity, int keep) {
    int old_cap = b->capacity;
    float *old = b->cache;
    b->capacity = capacity;
    b->cache = calloc((size_t)2 * b->layers * block_floats(b), sizeof(float));
    if (!b->cache) { b->cache = old; b->capacity = old_cap; return b->api->CreateStatus(ORT_FAIL, "out of memory for the KV cache"); }
    for (int blk = 0; old && blk < 2 * b->layers; blk++)
        for (int h = 0; h < b->kv; h++)
            memcpy(b->cache + ((size_t)blk * b->kv + h) * capacity * b->hd,
                   old + ((size_t)blk * b->kv + h) * old_cap * b->hd, (size_t)keep * b->hd * sizeof(float));
    free(old);
    int64_t shape[4] = {1, b->kv, capacity, b->hd};
    for (int i = 0; i < 2 * b->layers; i++) {
        if (b->past[i]) b->api->ReleaseValue(b->past[i]);
        b->past[i] = NULL;
        OrtStatus *st = tensor(b, b->cache + (size_t)i * block_floats(b), block_floats(b) * sizeof(float), shape, 4,
                               ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &b->past[i]);
        if (st) return st;
    }
    return NULL;
}

static char *copy_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *c = malloc(n);
    if (c) memcpy(c, s, n);
    return c;
}

/* buf += "," + s, cut to size */
static void append(char *buf, size_t size, const char *s) {
    size_t n = strlen(buf), m = strlen(s);
    if (n && n + 1 < size) buf[n++] = ',';
    if (m > size - 1 - n) m = size - 1 - n;
    memcpy(buf + n, s, m);
    buf[n + m] = 0;
}

/* ORT's NNAPI entry point is outside the API table (and absent from non-Android builds). */
static void *ort_symbol(const char *name) {
    Dl_info info;
    if (!dladdr((const void *)OrtGetApiBase, &info) || !info.dli_fname) return NULL;
    void *lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
    return lib ? dlsym(lib, name) : NULL;
}

/* Add the wanted execution providers in order; what could not be added is noted, not fatal. */
static void add_providers(Bridge *b, OrtSessionOptions *opts, JNIEnv *env, jobjectArray wanted, int threads,
                          char *skipped, size_t skipped_size) {
    int n = wanted ? (*env)->GetArrayLength(env, wanted) : 0;
    for (int i = 0; i < n; i++) {
        jstring js = (jstring)(*env)->GetObjectArrayElement(env, wanted, i);
        const char *name = (*env)->GetStringUTFChars(env, js, NULL);
        OrtStatus *st = NULL;
        int added = 0;
        char note[256];
        if (strcmp(name, "CPUExecutionProvider") == 0) {
            added = -1; /* always there, listed last */
        } else if (strcmp(name, "NnapiExecutionProvider") == 0) {
            typedef OrtStatus *(*AddNnapi)(OrtSessionOptions *, uint32_t);
            AddNnapi add = (AddNnapi)ort_symbol("OrtSessionOptionsAppendExecutionProvider_Nnapi");
            if (!add) snprintf(note, sizeof note, "%s (not in this ONNX Runtime build)", name);
            else if ((st = add(opts, 0)) != NULL) snprintf(note, sizeof note, "%s (%s)", name, b->api->GetErrorMessage(st));
            else added = 1;
        } else if (strcmp(name, "XnnpackExecutionProvider") == 0) {
            char t[16];
            snprintf(t, sizeof t, "%d", threads > 0 ? threads : 1);
            const char *keys[] = {"intra_op_num_threads"}, *values[] = {t};
            if ((st = b->api->SessionOptionsAppendExecutionProvider(opts, "XNNPACK", keys, values, 1)) != NULL)
                snprintf(note, sizeof note, "%s (%s)", name, b->api->GetErrorMessage(st));
            else added = 1;
        } else {
            snprintf(note, sizeof note, "%s (not in this ONNX Runtime build)", name);
        }
        if (st) b->api->ReleaseStatus(st);
        if (added == 1) append(b->providers, sizeof b->providers, name);
        else if (added == 0) append(skipped, skipped_size, note);
        (*env)->ReleaseStringUTFChars(env, js, name);
        (*env)->DeleteLocalRef(env, js);
    }
    append(b->providers, sizeof b->providers, "CPUExecutionProvider");
}

static void bridge_free(Bridge *b) {
    const OrtApi *api = b->api;
    for (int i = 0; b->past && i < 2 * b->layers; i++) if (b->past[i]) api->ReleaseValue(b->past[i]);
    for (int i = 0; b->new1_values && i < 2 * b->layers; i++) if (b->new1_values[i]) api->ReleaseValue(b->new1_values[i]);
    if (b->ids1_value) api->ReleaseValue(b->ids1_value);
    if (b->past_len_value) api->ReleaseValue(b->past_len_value);
    if (b->logits_value) api->ReleaseValue(b->logits_value);
    for (int i = 0; b->in_names && i < b->n_in; i++) free(b->in_names[i]);
    for (int i = 0; b->out_names && i < b->n_out; i++) free(b->out_names[i]);
    free(b->in_names); free(b->out_names); free(b->past); free(b->new1_values);
    free(b->cache); free(b->logits); free(b->new1);
    if (b->session) api->ReleaseSession(b->session);
    if (b->mem) api->ReleaseMemoryInfo(b->mem);
    if (b->env) api->ReleaseEnv(b->env);
    free(b);
}

static OrtStatus *names(Bridge *b) {
    char buf[64];
    b->n_in = 2 + 2 * b->layers;
    b->n_out = 1 + 2 * b->layers;
    b->in_names = calloc((size_t)b->n_in, sizeof(char *));
    b->out_names = calloc((size_t)b->n_out, sizeof(char *));
    if (!b->in_names || !b->out_names) return b->api->CreateStatus(ORT_FAIL, "out of memory");
    b->in_names[0] = copy_str("input_ids");
    b->in_names[1] = copy_str("past_length");
    b->out_names[0] = copy_str("logits");
    for (int i = 0; i < b->layers; i++) {
        snprintf(buf, sizeof buf, "past_key.%d", i);   b->in_names[2 + 2 * i] = copy_str(buf);
        snprintf(buf, sizeof buf, "past_value.%d", i); b->in_names[3 + 2 * i] = copy_str(buf);
        snprintf(buf, sizeof buf, "new_key.%d", i);    b->out_names[1 + 2 * i] = copy_str(buf);
        snprintf(buf, sizeof buf, "new_value.%d", i);  b->out_names[2 + 2 * i] = copy_str(buf);
    }
    return NULL;
}

JNIEXPORT jstring JNICALL Java_dev_ondevice_demo_NativeBridge_ortVersion(JNIEnv *env, jobject thiz) {
    (void)thiz;
    return (*env)->NewStringUTF(env, OrtGetApiBase()->GetVersionString());
}

/* A session over graphPath with the wanted providers (fallback: CPU alone) and a cache of
 * `capacity` slots that step() grows up to maxContext. Returns the handle. */
JNIEXPORT jlong JNICALL Java_dev_ondevice_demo_NativeBridge_open(
        JNIEnv *env, jobject thiz, jstring graphPath, jobjectArray providers, jint threads, jint layers, jint kvHeads,
        jint headDim, jint vocab, jint capacity, jint maxContext) {
    (void)thiz;
    const OrtApi *api = ort();
    if (!api) { throw_rt(env, "this ONNX Runtime has no C API 17 (OrtGetApiBase()->GetApi(17) returned NULL)"); return 0; }
    if (layers <= 0 || kvHeads <= 0 || headDim <= 0 || vocab <= 0 || capacity <= 0 || maxContext < capacity) {
        throw_rt(env, "open: layers, kv heads, head dim, vocab and capacity must be positive (capacity <= max context)");
        return 0;
    }
    Bridge *b = calloc(1, sizeof(Bridge));
    if (!b) { throw_rt(env, "out of memory"); return 0; }
    b->api = api;
    b->layers = layers; b->kv = kvHeads; b->hd = headDim; b->vocab = vocab; b->max_context = maxContext;
    OrtSessionOptions *opts = NULL;
    char skipped[512] = "";
    const char *path = (*env)->GetStringUTFChars(env, graphPath, NULL);
    OrtStatus *st;
    if (failed(env, api, api->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "ondevice", &b->env), "CreateEnv")) goto fail;
    if (failed(env, api, api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &b->mem), "CreateCpuMemoryInfo")) goto fail;
    if (failed(env, api, api->CreateSessionOptions(&opts), "CreateSessionOptions")) goto fail;
    if (threads > 0 && failed(env, api, api->SetIntraOpNumThreads(opts, threads), "SetIntraOpNumThreads")) goto fail;
    if (failed(env, api, api->SetSessionGraphOptimizationLevel(opts, ORT_ENABLE_ALL), "SetSessionGraphOptimizationLevel")) goto fail;
    add_providers(b, opts, env, providers, threads, skipped, sizeof skipped);
    st = api->CreateSession(b->env, path, opts, &b->session);
    if (st && strcmp(b->providers, "CPUExecutionProvider") != 0) {
        /* an accelerator that takes the options but not the graph: CPU alone */
        char note[1024];
        snprintf(note, sizeof note, "%.300s (session failed: %.200s)", b->providers, api->GetErrorMessage(st));
        api->ReleaseStatus(st);
        append(skipped, sizeof skipped, note);
        api->ReleaseSessionOptions(opts);
        opts = NULL;
        if (failed(env, api, api->CreateSessionOptions(&opts), "CreateSessionOptions")) goto fail;
        if (threads > 0 && failed(env, api, api->SetIntraOpNumThreads(opts, threads), "SetIntraOpNumThreads")) goto fail;
        snprintf(b->providers, sizeof b->providers, "CPUExecutionProvider");
        st = api->CreateSession(b->env, path, opts, &b->session);
    }
    if (failed(env, api, st, "cannot load the graph")) goto fail;
    if (skipped[0]) {
        size_t n = strlen(b->providers);
        snprintf(b->providers + n, sizeof b->providers - n, ";skipped:%s", skipped);
    }
    if (failed(env, api, names(b), "names")) goto fail;
    b->past = calloc((size_t)2 * layers, sizeof(OrtValue *));
    b->new1_values = calloc((size_t)2 * layers, sizeof(OrtValue *));
    b->logits = calloc((size_t)vocab, sizeof(float));
    b->new1 = calloc((size_t)2 * layers * kvHeads * headDim, sizeof(float));
    if (!b->past || !b->new1_values || !b->logits || !b->new1) { throw_rt(env, "out of memory"); goto fail; }
    if (failed(env, api, make_cache(b, capacity, 0), "KV cache")) goto fail;
    int64_t ids_shape[2] = {1, 1}, len_shape[1] = {1}, logits_shape[3] = {1, 1, vocab}, new_shape[4] = {1, kvHeads, 1, headDim};
    if (failed(env, api, tensor(b, b->ids1, sizeof b->ids1, ids_shape, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &b->ids1_value), "input_ids")) goto fail;
    if (failed(env, api, tensor(b, b->past_len, sizeof b->past_len, len_shape, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &b->past_len_value), "past_length")) goto fail;
    if (failed(env, api, tensor(b, b->logits, (size_t)vocab * sizeof(float), logits_shape, 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &b->logits_value), "logits")) goto fail;
    for (int i = 0; i < 2 * layers; i++) {
        size_t n = (size_t)kvHeads * headDim;
        if (failed(env, api, tensor(b, b->new1 + i * n, n * sizeof(float), new_shape, 4, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &b->new1_values[i]), "new kv")) goto fail;
    }
    (*env)->ReleaseStringUTFChars(env, graphPath, path);
    api->ReleaseSessionOptions(opts);
    LOGI("session ready: %s", b->providers);
    return (jlong)(intptr_t)b;
fail:
    (*env)->ReleaseStringUTFChars(env, graphPath, path);
    if (opts) api->ReleaseSessionOptions(opts);
    bridge_free(b);
    return 0;
}

JNIEXPORT jstring JNICALL Java_dev_ondevice_demo_NativeBridge_providers(JNIEnv *env, jobject thiz, jlong handle) {
    (void)thiz;
    return (*env)->NewStringUTF(env, ((Bridge *)(intptr_t)handle)->providers);
}

JNIEXPORT jint JNICALL Java_dev_ondevice_demo_NativeBridge_capacity(JNIEnv *env, jobject thiz, jlong handle) {
    (void)env; (void)thiz;
    return ((Bridge *)(intptr_t)handle)->capacity;
}

/* Run ids[0..count) at positions pastLen.. ; the last row's logits go to `logits`, the tokens'
 * keys and values into cache rows pastLen.. (rows past pastLen + count keep whatever they held). */
JNIEXPORT void JNICALL Java_dev_ondevice_demo_NativeBridge_step(
        JNIEnv *env, jobject thiz, jlong handle, jintArray ids, jint count, jint pastLen, jfloatArray logits) {
    (void)thiz;
    Bridge *b = (Bridge *)(intptr_t)handle;
    const OrtApi *api = b->api;
    if (count <= 0 || pastLen < 0 || count > (*env)->GetArrayLength(env, ids)) { throw_rt(env, "step: bad token count"); return; }
    if ((*env)->GetArrayLength(env, logits) < b->vocab) { throw_rt(env, "step: logits array shorter than the vocabulary"); return; }
    if (pastLen + count > b->max_context) { throw_rt(env, "step: past the model's context"); return; }
    if (pastLen + count > b->capacity) {  /* rare: double, keep the filled rows */
        int cap = b->capacity;
        while (cap < pastLen + count) cap *= 2;
        if (cap > b->max_context) cap = b->max_context;
        if (failed(env, api, make_cache(b, cap, pastLen), "growing the KV cache")) return;
    }
    b->past_len[0] = pastLen;
    OrtValue *in[2 + 2 * 512], *out[1 + 2 * 512];
    if (b->layers > 512) { throw_rt(env, "step: more than 512 layers"); return; }
    int64_t *many = NULL;
    float *new_many = NULL;
    OrtValue *ids_value = b->ids1_value;
    jint *src = (*env)->GetIntArrayElements(env, ids, NULL);
    if (count == 1) {
        b->ids1[0] = src[0];
        for (int i = 0; i < 2 * b->layers; i++) out[1 + i] = b->new1_values[i];
    } else {  /* a prompt chunk: its own buffers for this call */
        size_t n = (size_t)b->kv * count * b->hd;
        many = malloc((size_t)count * sizeof(int64_t));
        new_many = malloc((size_t)2 * b->layers * n * sizeof(float));
        for (int i = 0; i < 2 * b->layers; i++) out[1 + i] = NULL;
        if (!many || !new_many) { (*env)->ReleaseIntArrayElements(env, ids, src, JNI_ABORT); throw_rt(env, "out of memory"); goto done; }
        for (int t = 0; t < count; t++) many[t] = src[t];
        int64_t ids_shape[2] = {1, count}, new_shape[4] = {1, b->kv, count, b->hd};
        ids_value = NULL;
        if (failed(env, api, tensor(b, many, (size_t)count * sizeof(int64_t), ids_shape, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &ids_value), "input_ids")) goto done_release;
        for (int i = 0; i < 2 * b->layers; i++)
            if (failed(env, api, tensor(b, new_many + i * n, n * sizeof(float), new_shape, 4, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &out[1 + i]), "new kv")) goto done_release;
    }
    (*env)->ReleaseIntArrayElements(env, ids, src, JNI_ABORT);
    src = NULL;
    in[0] = ids_value;
    in[1] = b->past_len_value;
    for (int i = 0; i < 2 * b->layers; i++) in[2 + i] = b->past[i];
    out[0] = b->logits_value;
    if (failed(env, api, api->Run(b->session, NULL, (const char *const *)b->in_names, (const OrtValue *const *)in, (size_t)b->n_in,
                                  (const char *const *)b->out_names, (size_t)b->n_out, out), "Run")) goto done_release;
    {
        const float *fresh = count == 1 ? b->new1 : new_many;
        size_t row = (size_t)b->hd, per_head = (size_t)count * row;
        for (int blk = 0; blk < 2 * b->layers; blk++)  /* new rows of each head: contiguous in both */
            for (int h = 0; h < b->kv; h++)
                memcpy(b->cache + (size_t)blk * block_floats(b) + ((size_t)h * b->capacity + pastLen) * row,
                       fresh + ((size_t)blk * b->kv + h) * per_head, per_head * sizeof(float));
    }
    (*env)->SetFloatArrayRegion(env, logits, 0, b->vocab, b->logits);
done_release:
    if (src) (*env)->ReleaseIntArrayElements(env, ids, src, JNI_ABORT);
    if (count > 1) {
        if (ids_value) api->ReleaseValue(ids_value);
        for (int i = 0; i < 2 * b->layers; i++) if (out[1 + i]) api->ReleaseValue(out[1 + i]);
    }
done:
    free(many);
    free(new_many);
}

JNIEXPORT void JNICALL Java_dev_ondevice_demo_NativeBridge_close(JNIEnv *env, jobject thiz, jlong handle) {
    (void)env; (void)thiz;
    if (handle) bridge_free((Bridge *)(intptr_t)handle);
}
