// select.cpp - which kernel runs: PYCSM_KERNEL or the CPU's features. Compiled without ISA flags.
#include "kernel.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// A kernel file not in this build (CMakeLists.txt defines CSM_KERNEL_<NAME> for those that are).
#ifndef CSM_KERNEL_AVX512
const csm_kernel * csm_kernel_avx512() { return nullptr; }
#endif
#ifndef CSM_KERNEL_AVX2
const csm_kernel * csm_kernel_avx2() { return nullptr; }
#endif
#ifndef CSM_KERNEL_NEON
const csm_kernel * csm_kernel_neon() { return nullptr; }
#endif

namespace {

struct choice {
    const csm_kernel * kernel;
    const char * forced; // PYCSM_KERNEL's value when set, else null
    bool known;          // forced names a kernel (or ggml)
};

choice pick() {
    const char * env = getenv("PYCSM_KERNEL");
    const struct { const char * name; const csm_kernel * (*get)(); } all[] = {
        {"avx512", csm_kernel_avx512}, {"avx2", csm_kernel_avx2}, {"neon", csm_kernel_neon}};
    if (env && *env) {
        if (!strcmp(env, "ggml")) return {nullptr, env, true};
        for (const auto & k : all) {
            if (!strcmp(env, k.name)) return {k.get(), env, true};
        }
        return {nullptr, env, false};
    }
    for (const auto & k : all) { // best first
        if (const csm_kernel * p = k.get()) return {p, nullptr, true};
    }
    return {nullptr, nullptr, true};
}

} // namespace

const csm_kernel * csm_kernel_pick() { return pick().kernel; }

const char * csm_kernel_describe(char * buf, size_t size) {
    const choice c = pick();
    if (c.kernel) {
        snprintf(buf, size, "pycsm %s (%s)%s", c.kernel->name, c.kernel->isa, c.forced ? ", forced by PYCSM_KERNEL" : "");
    } else if (!c.forced) {
        snprintf(buf, size, "ggml (no pycsm kernel for this CPU)");
    } else if (!strcmp(c.forced, "ggml")) {
        snprintf(buf, size, "ggml (PYCSM_KERNEL=ggml)");
    } else {
        snprintf(buf, size, "ggml (PYCSM_KERNEL=%.32s: %s)", c.forced,
                 c.known ? "not available on this CPU or build" : "unknown, expected avx512|avx2|neon|ggml");
    }
    return buf;
}
