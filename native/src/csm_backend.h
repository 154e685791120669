// csm_backend.h - the ggml backend and CPU thread pool that the LM context and Mimi each run on.
#pragma once

#include "csm_model.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"

// Puts a CPU thread pool's workers to sleep when it goes out of scope (and on rest()), so that
// they do not poll for work while the caller runs: a pool left polling keeps a core busy for tens
// of milliseconds after each call. The next graph computation wakes the pool again.
struct csm_pool_rest {
    ggml_threadpool_t tp;
    void rest() const { if (tp) ggml_threadpool_pause(tp); }
    ~csm_pool_rest() { rest(); }
};

// The CPUs this process may use: those of its affinity mask, fewer when a cgroup CPU quota
// (cpu.max, or cpu.cfs_quota_us in cgroup v1) allows less; at least 1.
int32_t csm_usable_cpus();
// Threads to use: n when positive (at most csm_usable_cpus(): more threads than CPUs only spin at
// ggml's barriers), else csm_usable_cpus().
int32_t csm_default_threads(int32_t n);
// Backend on the model's device, with a persistent CPU thread pool when it is the CPU. Throws.
void csm_backend_init(const csm_model * m, int32_t n_threads, ggml_backend_t * backend, ggml_threadpool_t * tp);
