// csm_backend.cpp - backend and thread-pool set-up shared by the LM context and Mimi.
#include "csm_backend.h"

#include "csm_log.h"
#include "csm_platform.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

#ifdef __linux__
// CPUs' worth of time the cgroup quota file allows ("max" or absent: no limit, 0).
static double quota_cpus(const std::string & dir) {
    std::ifstream v2(dir + "/cpu.max");
    std::string quota;
    double period = 0;
    if (v2 >> quota >> period) return quota == "max" || period <= 0 ? 0 : std::atof(quota.c_str()) / period;
    std::ifstream q1(dir + "/cpu.cfs_quota_us"), p1(dir + "/cpu.cfs_period_us");
    double q = -1;
    if (q1 >> q && p1 >> period && q > 0 && period > 0) return q / period;
    return 0;
}

// The smallest quota on the way from this process's cgroup up to the root.
static double cgroup_cpus() {
    std::ifstream f("/proc/self/cgroup");
    std::string line;
    double best = 0;
    while (std::getline(f, line)) { // "0::/path" (v2) or "N:cpu,cpuacct:/path" (v1)
        const size_t a = line.find(':'), b = line.find(':', a + 1);
        if (a == std::string::npos || b == std::string::npos) continue;
        const std::string ctrl = line.substr(a + 1, b - a - 1);
        const bool v2 = ctrl.empty(), v1 = ctrl.find("cpu") != std::string::npos && ctrl.find("cpuset") == std::string::npos;
        if (!v2 && !v1) continue;
        const std::string root = v2 ? "/sys/fs/cgroup" : "/sys/fs/cgroup/" + ctrl;
        for (std::string path = line.substr(b + 1);; path = path.substr(0, path.rfind('/'))) {
            const double c = quota_cpus(root + path);
            if (c > 0 && (best == 0 || c < best)) best = c;
            if (path.empty() || path == "/") break;
        }
    }
    return best;
}
#endif

int32_t csm_usable_cpus() {
    unsigned n = std::thread::hardware_concurrency();
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) n = (unsigned) CPU_COUNT(&set);
    const double quota = cgroup_cpus();
    if (quota > 0) n = std::min(n, (unsigned) std::max(1.0, std::ceil(quota)));
#endif
    return (int32_t) std::max(1u, n);
}

int32_t csm_default_threads(int32_t n) {
    if (n > CSM_MAX_THREADS) csm_fail("n_threads %d is out of range: at most %d (<= 0: all usable CPUs)", n, CSM_MAX_THREADS);
    const int32_t cpus = std::min(csm_usable_cpus(), 512);
    return n > 0 ? std::min(n, cpus) : std::min(cpus, 64);
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

static ggml_threadpool_t new_pool(int32_t n_threads) {
    check_threads_available(n_threads);
    ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
    ggml_threadpool_t tp = ggml_threadpool_new(&tpp);
    if (!tp) csm_fail("cannot create a thread pool of %d threads", n_threads);
    return tp;
}

static ggml_backend_t new_backend(const csm_model * m) {
    ggml_backend_t backend = ggml_backend_dev_init(m->dev, nullptr);
    if (!backend) csm_fail("cannot initialise the %s backend", ggml_backend_dev_name(m->dev));
    return backend;
}

static bool on_cpu(const csm_model * m) { return ggml_backend_dev_type(m->dev) == GGML_BACKEND_DEVICE_TYPE_CPU; }

void csm_backend_init(const csm_model * m, int32_t n_threads, bool adaptive, ggml_backend_t * backend,
                      csm_thread_pools & pools) {
    *backend = new_backend(m);
    if (on_cpu(m)) pools.init(*backend, n_threads, adaptive);
}

static int64_t wall_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

csm_thread_pools::~csm_thread_pools() {
    if (reduced) ggml_threadpool_free(reduced);
    if (full) ggml_threadpool_free(full);
}

void csm_thread_pools::init(ggml_backend_t be, int32_t n_threads, bool adapt) {
    full = new_pool(n_threads);
    backend = be;
    n_max = n = n_threads;
    wait_known = csm_os_process_run_delay_ns() >= 0;
    adaptive = adapt && n_threads > 1 && (wait_known || csm_os_process_cpu_ns() >= 0);
    ggml_backend_cpu_set_n_threads(backend, n);
    ggml_backend_cpu_set_threadpool(backend, full);
}

void csm_thread_pools::rest() const {
    if (backend) ggml_threadpool_pause(in_use());
}

// The backend computes on n_new threads from the next graph on (the pool left pauses).
void csm_thread_pools::use(int32_t n_new) {
    const ggml_threadpool_t before = in_use();
    ggml_threadpool_t tp = full, old = nullptr;
    if (n_new < n_max && n_new != reduced_n) {
        old = reduced;
        reduced = nullptr;
        reduced_n = 0;
        try {
            reduced = new_pool(n_new);
        } catch (const std::exception & e) { // keep what runs, and stop adapting
            csm_log(CSM_LOG_WARN, "threads: staying at %d (%s)", n, e.what());
            adaptive = false;
            if (old && n != n_max) { reduced = old; reduced_n = n; }
            else if (old) ggml_threadpool_free(old);
            return;
        }
        reduced_n = n_new;
    }
    if (n_new < n_max) tp = reduced;
    ggml_threadpool_pause(before); // its workers sleep from now on
    ggml_backend_cpu_set_threadpool(backend, tp);
    ggml_backend_cpu_set_n_threads(backend, n_new);
    if (old) ggml_threadpool_free(old);
    csm_log(CSM_LOG_DEBUG, "threads: %d -> %d", n, n_new);
    n = n_new;
}

void csm_thread_pools::before_compute() {
    if (!adaptive) return;
    start_wall = wall_ns();
    if (win_start < 0) {
        win_start = start_wall;
        if (wait_known) win_start_wait = csm_os_process_run_delay_ns();
    }
    if (!wait_known) start_cpu = csm_os_process_cpu_ns();
}

void csm_thread_pools::after_compute() {
    if (!adaptive || win_start < 0) return;
    const int64_t now = wall_ns();
    win_wall += now - start_wall;
    if (!wait_known) win_cpu += csm_os_process_cpu_ns() - start_cpu;
    if (win_wall < (int64_t) ((trying || !judged ? PROBE_MS : WINDOW_MS) * 1e6)) return;
    judged = true;
    bool starved;
    double share; // what the threads waited for (wait known), else the CPU time they got, of n threads' time
    if (wait_known) {
        share = (double) (csm_os_process_run_delay_ns() - win_start_wait) / ((double) (now - win_start) * n);
        starved = share > WAITED;
    } else {
        share = (double) win_cpu / ((double) win_wall * n);
        starved = share < STARVED;
    }
    win_start = -1;
    win_wall = win_cpu = 0;
    if (starved) {
        if (trying) probe_gap = std::min(probe_gap * 2, TRY_AFTER_MAX);
        trying = false;
        quiet = 0;
        if (n > 1) {
            csm_log(CSM_LOG_DEBUG, "threads: %d %s %.2f of their time", n, wait_known ? "waited for a CPU" : "got the CPU", share);
            use(n - 1);
        }
        return;
    }
    if (trying) probe_gap = TRY_AFTER; // the thread more got its CPU: keep it
    trying = false;
    if (n < n_max && ++quiet >= probe_gap) {
        quiet = 0;
        trying = true;
        use(n + 1);
    }
}
