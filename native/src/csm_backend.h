// csm_backend.h - the ggml backend and CPU thread pools that the LM context and Mimi each run on.
#pragma once

#include "csm_model.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"

// The CPU thread pools of a backend (the LM context's, a Mimi runner's), sized to the CPUs that are free.
//
// ggml's workers spin at every barrier of a graph, so when other busy processes leave fewer free CPUs
// than threads, a descheduled worker holds the others at the next barrier: beside one process spinning
// on one of 2 cores, a 2-thread frame took 2.5x the time of a 1-thread one. With the default thread
// count (adaptive) the pools watch, over windows of at least WINDOW_MS of computing, how long the
// process's threads were ready to run but waited for a CPU (Linux: their schedstat); when that is
// more than WAITED of the n threads' time, the next graphs run on one thread fewer. The first window
// and a window that tries a thread more are shorter (PROBE_MS): on a busy CPU each costs its length
// at a fraction of the speed. (Where the wait
// is unknown: when n running threads, busy or spinning, got less than STARVED of n CPUs' worth of
// CPU time while computing. Less exact: an idle 2-core machine gave 0.84-0.95, since workers wake
// from sleep at a step's start.) After 8 quiet windows one more
// thread is tried again; a try that is starved goes back and waits twice as long before the next
// (up to 256 windows, about 13 s of computing). A fixed thread count (n_threads > 0) never changes.
// The pool of n_max threads and, while fewer run, a pool of that many (ggml's excluded workers would
// keep polling for work): the backend uses one, the other sleeps.
class csm_thread_pools {
public:
    csm_thread_pools() = default;
    csm_thread_pools(const csm_thread_pools &) = delete;
    csm_thread_pools & operator=(const csm_thread_pools &) = delete;
    ~csm_thread_pools();
    // Creates the n_threads pool and sets it on backend (a CPU backend). Throws.
    void init(ggml_backend_t backend, int32_t n_threads, bool adaptive);
    // Around every graph computation on the backend.
    void before_compute();
    void after_compute();
    // Puts the pool in use to sleep (see csm_pool_rest).
    void rest() const;
    int32_t threads() const { return n; }

    static constexpr double WINDOW_MS = 50.0, PROBE_MS = 15.0;
    static constexpr double WAITED = 0.20;
    static constexpr double STARVED = 0.75;
    static constexpr int32_t TRY_AFTER = 8, TRY_AFTER_MAX = 256; // quiet windows before a thread more

private:
    void use(int32_t n_new);
    ggml_threadpool_t in_use() const { return n == n_max ? full : reduced; }

    ggml_backend_t backend = nullptr;
    ggml_threadpool_t full = nullptr, reduced = nullptr; // n_max threads; n < n_max threads
    int32_t n_max = 1, n = 1, reduced_n = 0;
    bool adaptive = false;
    bool wait_known = false;                   // the OS tells how long threads waited for a CPU
    int64_t start_wall = 0, start_cpu = 0;     // the computation under way: its start, ns
    int64_t win_start = -1, win_start_wait = 0; // the window: its start (-1: none open), threads' wait then
    int64_t win_wall = 0, win_cpu = 0;         // the window so far: wall and process CPU time computing, ns
    int32_t quiet = 0, probe_gap = TRY_AFTER; // quiet windows since the last change; windows before a try
    bool trying = false;              // the open window runs on a thread more, being tried
    bool judged = false;              // a window has been judged (the first one is a probe too)
};

// Puts the CPU thread pool in use to sleep when it goes out of scope (and on rest()), so that its
// workers do not poll for work while the caller runs: a pool left polling keeps a core busy for tens
// of milliseconds after each call. The next graph computation wakes the pool again.
struct csm_pool_rest {
    const csm_thread_pools & pools;
    void rest() const { pools.rest(); }
    ~csm_pool_rest() { rest(); }
};

// The CPUs this process may use: those of its affinity mask, fewer when a cgroup CPU quota
// (cpu.max, or cpu.cfs_quota_us in cgroup v1) allows less; at least 1.
int32_t csm_usable_cpus();
// Threads to use: n when positive (at most csm_usable_cpus(): more threads than CPUs only spin at
// ggml's barriers), else csm_usable_cpus().
int32_t csm_default_threads(int32_t n);
// Backend on the model's device, with persistent CPU thread pools (csm_thread_pools; adaptive: the
// thread count follows other processes' load) when it is the CPU. Throws.
void csm_backend_init(const csm_model * m, int32_t n_threads, bool adaptive, ggml_backend_t * backend,
                      csm_thread_pools & pools);
