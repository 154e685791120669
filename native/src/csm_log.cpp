// csm_log.cpp - last error, log callback, version strings.
#include "csm_log.h"
#include "kernels/kernel.h"

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <mutex>
#include <string>

static thread_local std::string g_last_error;
static thread_local std::string g_ggml_error; // last error line ggml logged
// The callback and its user data change together (csm_log_set): a reader copies both under the lock
// and calls outside it, so a message never reaches one callback with another's user data. The flag
// lets csm_log skip formatting while nothing listens.
struct log_target {
    csm_log_callback cb = nullptr;
    void * ud = nullptr;
};
static std::mutex g_log_mu;
static log_target g_log;
static std::atomic<bool> g_log_on{false};

static log_target log_get() {
    if (!g_log_on.load(std::memory_order_acquire)) return {};
    std::lock_guard<std::mutex> lk(g_log_mu);
    return g_log;
}

static std::string vformat(const char * fmt, va_list ap) {
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(nullptr, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0) return fmt;
    std::string s((size_t) n, '\0');
    vsnprintf(&s[0], (size_t) n + 1, fmt, ap);
    return s;
}

static void emit(int32_t level, const std::string & text) {
    const log_target t = log_get();
    if (!t.cb) return;
    std::string line = text;
    if (line.empty() || line.back() != '\n') line += '\n';
    t.cb(level, line.c_str(), t.ud);
}

void csm_set_error(const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    g_last_error = vformat(fmt, ap);
    va_end(ap);
    emit(CSM_LOG_ERROR, g_last_error);
}

void csm_clear_error() {
    g_last_error.clear();
    g_ggml_error.clear();
}

void csm_log(int32_t level, const char * fmt, ...) {
    if (!g_log_on.load(std::memory_order_acquire)) return;
    va_list ap;
    va_start(ap, fmt);
    std::string s = vformat(fmt, ap);
    va_end(ap);
    emit(level, s);
}

[[noreturn]] void csm_fail(const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string s = vformat(fmt, ap);
    va_end(ap);
    throw csm_error(s);
}

std::string csm_last_ggml_error() {
    std::string s = g_ggml_error;
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
    return s.empty() ? "no detail" : s;
}

static void ggml_log_to_csm(enum ggml_log_level level, const char * text, void *) {
    if (!text) return;
    if (level == GGML_LOG_LEVEL_ERROR) g_ggml_error = text;
    else if (level == GGML_LOG_LEVEL_CONT && !g_ggml_error.empty()) g_ggml_error += text;
    const log_target t = log_get();
    if (!t.cb) return;
    int32_t lv = CSM_LOG_DEBUG;
    switch (level) {
        case GGML_LOG_LEVEL_ERROR: lv = CSM_LOG_ERROR; break;
        case GGML_LOG_LEVEL_WARN:  lv = CSM_LOG_WARN;  break;
        case GGML_LOG_LEVEL_INFO:  lv = CSM_LOG_INFO;  break;
        default: break;
    }
    t.cb(lv, text, t.ud);
}

void csm_install_ggml_log() {
    static std::once_flag once;
    std::call_once(once, [] { ggml_log_set(ggml_log_to_csm, nullptr); });
}

extern "C" {

void csm_log_set(csm_log_callback callback, void * user_data) {
    {
        std::lock_guard<std::mutex> lk(g_log_mu);
        g_log.cb = callback;
        g_log.ud = user_data;
        g_log_on.store(callback != nullptr, std::memory_order_release);
    }
    csm_install_ggml_log();
}

const char * csm_last_error(void) { return g_last_error.c_str(); }

const char * csm_version(void) { return CSM_VERSION; }

int32_t csm_api_version(void) { return CSM_API_VERSION; }

int64_t csm_struct_size(int32_t which) {
    switch (which) {
        case CSM_STRUCT_MODEL_PARAMS:    return sizeof(csm_model_params);
        case CSM_STRUCT_HPARAMS:         return sizeof(csm_hparams);
        case CSM_STRUCT_QUANTIZE_PARAMS: return sizeof(csm_quantize_params);
        case CSM_STRUCT_CONTEXT_PARAMS:  return sizeof(csm_context_params);
        case CSM_STRUCT_SAMPLING_PARAMS: return sizeof(csm_sampling_params);
        case CSM_STRUCT_GENERATE_PARAMS: return sizeof(csm_generate_params);
        case CSM_STRUCT_GENERATE_RESULT: return sizeof(csm_generate_result);
        case CSM_STRUCT_BATCH_PARAMS:    return sizeof(csm_batch_params);
        case CSM_STRUCT_STREAM_PARAMS:   return sizeof(csm_stream_params);
        case CSM_STRUCT_BATCH_EVENT:     return sizeof(csm_batch_event);
        default: return -1;
    }
}

const char * csm_ggml_version(void) { return ggml_version(); }

const char * csm_ggml_build_version(void) { return CSM_GGML_BUILD_VERSION; }

const char * csm_system_info(void) {
    static std::string info;
    static std::once_flag once;
    std::call_once(once, [] {
        info = std::string("ggml ") + ggml_version() + " (" + ggml_commit() + "); devices:";
        for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
            info += std::string(" ") + ggml_backend_dev_name(ggml_backend_dev_get(i));
        }
        info += "; cpu:";
        if (ggml_cpu_has_avx2()) info += " AVX2";
        if (ggml_cpu_has_fma()) info += " FMA";
        if (ggml_cpu_has_f16c()) info += " F16C";
        if (ggml_cpu_has_avx512()) info += " AVX512";
        if (ggml_cpu_has_neon()) info += " NEON";
        if (ggml_cpu_has_dotprod()) info += " DOTPROD";
    });
    // the kernel part anew each call: PYCSM_KERNEL is read when a model is loaded, and may have changed
    thread_local std::string line;
    char kernel[160];
    line = info + "; q8_0/q4_k/f16 matmul: " + csm_kernel_describe(kernel, sizeof kernel);
    return line.c_str();
}

} // extern "C"
