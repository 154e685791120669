// csm_backend.cpp - backend and thread-pool set-up shared by the LM context and Mimi.
#include "csm_backend.h"

#include "csm_log.h"

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

int32_t csm_default_threads(int32_t n) {
    if (n > CSM_MAX_THREADS) csm_fail("n_threads %d is out of range: at most %d (<= 0: all cores)", n, CSM_MAX_THREADS);
    unsigned hc = std::thread::hardware_concurrency();
    if (hc == 0) hc = 4;
    if (n > 0) return (int32_t) std::min<unsigned>({(unsigned) n, hc, 512u}); // more threads than cores only spin
    return (int32_t) std::min(hc, 64u);
}

// ggml's thread pool asserts (aborts the process) when the system refuses a thread (a pids limit,
// RLIMIT_NPROC). Starting the n - 1 workers it will start, and letting them go, turns that into an
// error beforehand; a limit reached in the instant between the two still aborts inside ggml.
static void check_threads_available(int32_t n_threads) {
    std::mutex mu;
    std::condition_variable cv;
    bool go = false;
    std::vector<std::thread> probe;
    std::string refused;
    for (int32_t i = 1; i < n_threads; i++) {
        try {
            probe.emplace_back([&] {
                std::unique_lock<std::mutex> lk(mu);
                cv.wait(lk, [&] { return go; });
            });
        } catch (const std::system_error & e) {
            refused = e.what();
            break;
        }
    }
    {
        std::lock_guard<std::mutex> lk(mu);
        go = true;
    }
    cv.notify_all();
    for (auto & t : probe) t.join();
    if (!refused.empty()) {
        csm_fail("the system refused a thread (%d of %d started: %s); lower n_threads or raise the process limit",
                 (int) probe.size() + 1, n_threads, refused.c_str());
    }
}

// Backend on the model's device, with a persistent CPU thread pool when it is the CPU.
void csm_backend_init(const csm_model * m, int32_t n_threads, ggml_backend_t * backend, ggml_threadpool_t * tp) {
    *backend = ggml_backend_dev_init(m->dev, nullptr);
    if (!*backend) csm_fail("cannot initialise the %s backend", ggml_backend_dev_name(m->dev));
    if (ggml_backend_dev_type(m->dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
        check_threads_available(n_threads);
        ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
        *tp = ggml_threadpool_new(&tpp);
        if (!*tp) csm_fail("cannot create a thread pool of %d threads", n_threads);
        ggml_backend_cpu_set_n_threads(*backend, n_threads);
        ggml_backend_cpu_set_threadpool(*backend, *tp);
    }
}
