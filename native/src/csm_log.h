// csm_log.h - thread-local last error and the log callback (the library never prints itself).
#pragma once

#include "csm.h"

#include <exception>
#include <string>

#if defined(__MINGW32__) // MinGW builds use its C99 stdio (__USE_MINGW_ANSI_STDIO in CMakeLists.txt)
#    define CSM_PRINTF(a, b) __attribute__((format(gnu_printf, a, b)))
#elif defined(__GNUC__)
#    define CSM_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#    define CSM_PRINTF(a, b)
#endif

// Records the message as this thread's last error and logs it at CSM_LOG_ERROR.
void csm_set_error(const char * fmt, ...) CSM_PRINTF(1, 2);
void csm_clear_error();
void csm_log(int32_t level, const char * fmt, ...) CSM_PRINTF(2, 3);

// Routes ggml's own log lines into the csm callback (installed once, on first use).
void csm_install_ggml_log();

// The last error line ggml logged on this thread ("no detail" if none) since csm_clear_error().
std::string csm_last_ggml_error();

// Internal errors travel as this exception and become csm_set_error at the API boundary.
struct csm_error : std::exception {
    std::string msg;
    explicit csm_error(std::string m) : msg(std::move(m)) {}
    const char * what() const noexcept override { return msg.c_str(); }
};

[[noreturn]] void csm_fail(const char * fmt, ...) CSM_PRINTF(1, 2);

// Runs fn() and turns any exception into csm_set_error + the failure value.
template <typename R, typename F> R csm_guard(R fail_value, F && fn) {
    csm_clear_error();
    try {
        return fn();
    } catch (const csm_error & e) {
        csm_set_error("%s", e.msg.c_str());
    } catch (const std::bad_alloc &) {
        csm_set_error("out of memory");
    } catch (const std::exception & e) {
        csm_set_error("internal error: %s", e.what());
    }
    return fail_value;
}
