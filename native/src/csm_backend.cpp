// csm_backend.cpp - backend and thread-pool set-up shared by the LM context and Mimi.
#include "csm_backend.h"

#include "csm_log.h"

#include <algorithm>
#include <thread>

int32_t csm_default_threads(int32_t n) {
    unsigned hc = std::thread::hardware_concurrency();
    if (hc == 0) hc = 4;
    if (n > 0) return (int32_t) std::min<unsigned>({(unsigned) n, hc, 512u}); // more threads than cores only spin
    return (int32_t) std::min(hc, 64u);
}

void csm_backend_init(const csm_model * m, int32_t n_threads, ggml_backend_t * backend, ggml_threadpool_t * tp) {
    *backend = ggml_backend_dev_init(m->dev, nullptr);
    if (!*backend) csm_fail("cannot initialise the %s backend", ggml_backend_dev_name(m->dev));
    if (ggml_backend_dev_type(m->dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
        ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
        *tp = ggml_threadpool_new(&tpp);
        if (!*tp) csm_fail("cannot create a thread pool of %d threads", n_threads);
        ggml_backend_cpu_set_n_threads(*backend, n_threads);
        ggml_backend_cpu_set_threadpool(*backend, *tp);
    }
}
