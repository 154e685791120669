// csm_context.cpp - creating a generation context: backend, thread pool, KV caches.
#include "csm_context.h"
#include "csm_log.h"
#include "csm_platform.h"

#include <memory>

csm_context::~csm_context() {
    g_prefill.reset();
    g_step.reset();
    g_d0.reset();
    g_dk.reset();
    if (buf_state) ggml_backend_buffer_free(buf_state);
    if (ctx_state) ggml_free(ctx_state);
    if (backend) ggml_backend_free(backend);
}

// The KV caches are sized by the file (positions x layers x key/value width): computed and refused
// beyond CSM_MAX_KV_BYTES or the machine's memory before anything is allocated.
static void check_kv_bytes(const csm_model & m, int64_t n_ctx, int64_t n_seq) {
    const csm_llama & B = m.backbone, & D = m.depth;
    const double bytes = 2.0 * sizeof(float) * n_seq *
                         ((double) B.n_layers * B.n_kv_heads * B.head_dim * n_ctx +
                          (double) D.n_layers * D.n_kv_heads * D.head_dim * m.hp.n_codebooks);
    const double mib = 1048576.0;
    if (bytes > (double) CSM_MAX_KV_BYTES) {
        csm_fail("the KV caches would take %.0f MiB (%lld positions x %lld sequences), more than the limit of %.0f MiB: "
                 "lower max_pos or n_batch", bytes / mib, (long long) n_ctx, (long long) n_seq, CSM_MAX_KV_BYTES / mib);
    }
    const uint64_t memory = csm_os_physical_memory();
    if (memory > 0 && bytes > (double) memory) {
        csm_fail("the KV caches would take %.0f MiB, more than this machine's memory (%.0f MiB): lower max_pos or n_batch",
                 bytes / mib, (double) memory / mib);
    }
}

static csm_context * create(const csm_model * m, const csm_context_params & p) {
    if (!m) csm_fail("model is NULL");
    if (p.max_pos < 0 || p.max_pos > m->hp.bb_max_pos) {
        csm_fail("max_pos %d is out of range [0, %d]", p.max_pos, m->hp.bb_max_pos);
    }
    if (p.n_batch < 1 || p.n_batch > 64) csm_fail("n_batch %d is out of range [1, 64]", p.n_batch);
    check_kv_bytes(*m, p.max_pos > 0 ? p.max_pos : m->hp.bb_max_pos, p.n_batch);
    auto c = std::make_unique<csm_context>();
    c->model = m;
    c->model_ref.reset(m);
    c->params = p;
    c->params.n_threads = csm_default_threads(p.n_threads);
    c->n_ctx = p.max_pos > 0 ? p.max_pos : m->hp.bb_max_pos;
    c->n_seq = p.n_batch;
    c->n_active = p.n_batch;
    c->n_dctx = m->hp.n_codebooks;
    c->n_past.assign(c->n_seq, 0);
    c->prompt_rows.assign(c->n_seq, {});
    // the default count (n_threads <= 0) adapts to other processes' load (csm_thread_pools)
    csm_backend_init(m, c->params.n_threads, p.n_threads <= 0, &c->backend, c->pools);

    const csm_llama & B = m->backbone, & D = m->depth;
    const int n_tensors = 2 * (B.n_layers + D.n_layers) + 1;
    ggml_init_params ip = {(size_t) n_tensors * ggml_tensor_overhead(), nullptr, true};
    c->ctx_state = ggml_init(ip);
    if (!c->ctx_state) csm_fail("out of memory");
    auto make_kv = [&](const csm_llama & L, int64_t rows, std::vector<csm_kv_layer> & kv) {
        kv.resize(L.n_layers);
        for (auto & l : kv) {
            l.k = ggml_new_tensor_2d(c->ctx_state, GGML_TYPE_F32, (int64_t) L.head_dim * L.n_kv_heads, rows);
            // V is stored transposed ([position][channel][sequence], written one value at a time) so
            // that attention reads it as [n_kv, head_dim] rows without a copy
            l.v = ggml_new_tensor_2d(c->ctx_state, GGML_TYPE_F32, 1, (int64_t) L.head_dim * L.n_kv_heads * rows);
        }
    };
    make_kv(B, (int64_t) c->n_ctx * c->n_seq, c->kv_bb);
    make_kv(D, (int64_t) c->n_dctx * c->n_seq, c->kv_dp);
    c->h_buf = ggml_new_tensor_2d(c->ctx_state, GGML_TYPE_F32, m->hp.bb_d_model, c->n_seq);
    c->buf_state = ggml_backend_alloc_ctx_tensors(c->ctx_state, c->backend);
    if (!c->buf_state) csm_fail("cannot allocate the KV caches");
    ggml_backend_buffer_clear(c->buf_state, 0);
    csm_log(CSM_LOG_DEBUG, "context: %d threads, %d positions x %d sequences, state %.1f MiB", c->params.n_threads,
            c->n_ctx, c->n_seq, ggml_backend_buffer_get_size(c->buf_state) / 1048576.0);
    return c.release();
}

extern "C" {

struct csm_context_params csm_context_default_params(void) {
    csm_context_params p;
    p.n_threads = 0;
    p.max_pos = 0;
    p.n_batch = 1;
    return p;
}

csm_context * csm_context_new(const csm_model * model, struct csm_context_params params) {
    return csm_guard<csm_context *>(nullptr, [&] {
        const csm_hold<const csm_model> hold(model);
        return create(model, params);
    });
}

void csm_context_free(csm_context * ctx) { csm_release(ctx); }

} // extern "C"
