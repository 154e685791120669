// csm_runner.cpp - prompt checks, graph inputs and the runner shared by csm_generate and csm_batch.
#include "csm_runner.h"

#include "csm_log.h"

#include <algorithm>
#include <cmath>

namespace {

const int32_t KV_PAD = 32; // backbone attention spans n_past rounded up to this

int32_t pad_kv(int32_t n, int32_t n_ctx) {
    int32_t p = (n + KV_PAD - 1) / KV_PAD * KV_PAD;
    return p < n_ctx ? p : n_ctx;
}

void set_input(ggml_tensor * t, const void * data, size_t bytes) {
    if (t) ggml_backend_tensor_set(t, data, 0, bytes);
}

template <typename T> void set_input(ggml_tensor * t, const std::vector<T> & v) {
    set_input(t, v.data(), v.size() * sizeof(T));
}

// Attention mask rows: position p of a sequence sees cache rows [0, p].
void causal_mask(std::vector<float> & mask, int32_t n_kv, int32_t T, int32_t B, const std::vector<int32_t> & first_pos) {
    mask.assign((size_t) n_kv * T * B, -INFINITY);
    for (int32_t b = 0; b < B; b++) {
        for (int32_t t = 0; t < T; t++) {
            const int32_t p = std::min(first_pos[b] + t, n_kv - 1);
            float * row = mask.data() + ((size_t) b * T + t) * n_kv;
            for (int32_t j = 0; j <= p; j++) row[j] = 0.0f;
        }
    }
}

// K cache rows (seq * n_ctx + pos) and the V cache values they imply ((seq * kvd + c) * n_ctx + pos).
void set_kv_idx(csm_graph & g, const std::vector<int64_t> & kv_idx, int64_t kvd, int64_t n_ctx, std::vector<int64_t> & v_idx) {
    set_input(g.kv_idx, kv_idx);
    v_idx.resize(kv_idx.size() * kvd);
    for (size_t i = 0; i < kv_idx.size(); i++) {
        const int64_t seq = kv_idx[i] / n_ctx, pos = kv_idx[i] % n_ctx;
        for (int64_t c = 0; c < kvd; c++) v_idx[i * kvd + c] = (seq * kvd + c) * n_ctx + pos;
    }
    set_input(g.v_idx, v_idx);
}

} // namespace

double csm_ms_since(csm_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(csm_clock::now() - t0).count();
}

void csm_check_prompt(const csm_model & m, const int32_t * prompt, int32_t n_pos, int32_t n_ctx) {
    if (!prompt || n_pos <= 0) csm_fail("the prompt is empty");
    if (n_pos > n_ctx) {
        csm_fail("the prompt has %d positions but the context holds %d: shorten the text or the voice context", n_pos, n_ctx);
    }
    const int32_t ncb = m.hp.n_codebooks;
    for (int32_t r = 0; r < n_pos; r++) {
        const int32_t * row = prompt + (size_t) r * CSM_N_COLUMNS;
        bool any = false;
        for (int32_t c = 0; c < CSM_N_COLUMNS; c++) {
            const int32_t v = row[c];
            if (v == -1) continue;
            const int32_t hi = c == CSM_TEXT_COLUMN ? m.hp.text_vocab_size : m.hp.audio_vocab_size;
            if (v < 0 || v >= hi || (c != CSM_TEXT_COLUMN && c >= ncb)) {
                csm_fail("prompt row %d column %d holds %d, outside [0, %d) (-1 marks an absent column)", r, c, v, hi);
            }
            any = true;
        }
        if (!any) csm_fail("prompt row %d has no column present", r);
    }
}

void csm_check_sampling(const csm_sampling_params & s) {
    if (!std::isfinite(s.temperature) || s.temperature < 0) csm_fail("temperature must be finite and >= 0 (got %g)", s.temperature);
    if (!std::isfinite(s.depth_temperature)) csm_fail("depth_temperature must be finite");
}

csm_runner::csm_runner(csm_context & ctx)
    : c(ctx), m(*ctx.model), V(ctx.model->hp.audio_vocab_size), ncb(ctx.model->hp.n_codebooks) {}

int64_t csm_runner::bb_kvd() const { return (int64_t) m.backbone.head_dim * m.backbone.n_kv_heads; }

int32_t csm_runner::prefill(int32_t seq, const int32_t * prompt, int32_t n_pos, bool reuse) {
    std::vector<int32_t> & held = c.prompt_rows[seq];
    int32_t keep = 0;
    if (reuse) {
        const int32_t n_held = (int32_t) (held.size() / CSM_N_COLUMNS);
        while (keep < n_pos - 1 && keep < n_held &&
               std::equal(prompt + (size_t) keep * CSM_N_COLUMNS, prompt + (size_t) (keep + 1) * CSM_N_COLUMNS,
                          held.begin() + (size_t) keep * CSM_N_COLUMNS)) {
            keep++;
        }
    }
    held.clear(); // until the rows are all written: a failure leaves nothing to reuse
    c.n_past[seq] = keep;
    for (int32_t r0 = keep; r0 < n_pos; r0 += CSM_PREFILL_CHUNK) {
        const int32_t T = std::min(CSM_PREFILL_CHUNK, n_pos - r0);
        prefill_rows(seq, prompt + (size_t) r0 * CSM_N_COLUMNS, T, r0 + T == n_pos);
    }
    held.assign(prompt, prompt + (size_t) n_pos * CSM_N_COLUMNS);
    return keep;
}

void csm_runner::prefill_rows(int32_t seq, const int32_t * rows, int32_t T, bool last) {
    const int32_t n_past = c.n_past[seq];
    const int32_t n_kv = pad_kv(n_past + T, c.n_ctx);
    csm_build_prefill(c, seq, T, n_kv);
    csm_graph & g = c.g_prefill;
    ids.assign((size_t) ncb * T, 0);
    amask.assign((size_t) ncb * T, 0.0f);
    text_ids.assign(T, 0);
    tmask.assign(T, 0.0f);
    pos.resize(T);
    kv_idx.resize(T);
    for (int32_t t = 0; t < T; t++) {
        const int32_t * row = rows + (size_t) t * CSM_N_COLUMNS;
        for (int32_t cb = 0; cb < ncb; cb++) {
            if (row[cb] < 0) continue;
            ids[(size_t) t * ncb + cb] = cb * V + row[cb];
            amask[(size_t) t * ncb + cb] = 1.0f;
        }
        if (row[CSM_TEXT_COLUMN] >= 0) {
            text_ids[t] = row[CSM_TEXT_COLUMN];
            tmask[t] = 1.0f;
        }
        pos[t] = n_past + t;
        kv_idx[t] = (int64_t) seq * c.n_ctx + n_past + t;
    }
    causal_mask(kq, n_kv, T, 1, {n_past});
    set_input(g.audio_ids, ids);
    set_input(g.audio_mask, amask);
    set_input(g.text_ids, text_ids);
    set_input(g.text_mask, tmask);
    set_input(g.pos, pos);
    set_kv_idx(g, kv_idx, bb_kvd(), c.n_ctx, v_idx);
    set_input(g.kq_mask, kq);
    csm_compute(c, g);
    c.n_past[seq] = n_past + T;
    if (!last) return;
    logits.resize((size_t) V * c.n_seq);
    ggml_backend_tensor_get(g.logits, logits.data() + (size_t) seq * V, 0, V * sizeof(float));
}

void csm_runner::step(const std::vector<int32_t> & codes) {
    const int32_t B = c.n_active;
    int32_t max_past = 0;
    for (int32_t b = 0; b < B; b++) max_past = std::max(max_past, c.n_past[b]);
    const int32_t n_kv = pad_kv(max_past + 1, c.n_ctx);
    csm_build_step(c, n_kv);
    csm_graph & g = c.g_step;
    ids.resize((size_t) ncb * B);
    pos.resize(B);
    kv_idx.resize(B);
    std::vector<int32_t> first(B);
    for (int32_t b = 0; b < B; b++) {
        for (int32_t cb = 0; cb < ncb; cb++) ids[(size_t) b * ncb + cb] = cb * V + codes[(size_t) b * ncb + cb];
        const int32_t p = std::min(c.n_past[b], c.n_ctx - 1); // finished sequences rewrite their last row
        pos[b] = p;
        kv_idx[b] = (int64_t) b * c.n_ctx + p;
        first[b] = p;
    }
    amask.assign((size_t) ncb * B, 1.0f);
    causal_mask(kq, n_kv, 1, B, first);
    set_input(g.audio_ids, ids);
    set_input(g.audio_mask, amask);
    set_input(g.pos, pos);
    set_kv_idx(g, kv_idx, bb_kvd(), c.n_ctx, v_idx);
    set_input(g.kq_mask, kq);
    csm_compute(c, g);
    for (int32_t b = 0; b < B; b++) c.n_past[b] = std::min(c.n_past[b] + 1, c.n_ctx);
    logits.resize((size_t) V * c.n_seq);
    ggml_backend_tensor_get(g.logits, logits.data(), 0, (size_t) V * B * sizeof(float));
}

void csm_runner::depth_inputs(csm_graph & g, int32_t k) {
    const int32_t B = c.n_active;
    pos.assign(B, k);
    kv_idx.resize(B);
    for (int32_t b = 0; b < B; b++) kv_idx[b] = (int64_t) b * c.n_dctx + k;
    causal_mask(kq, c.n_dctx, 1, B, std::vector<int32_t>(B, k));
    set_input(g.pos, pos);
    set_kv_idx(g, kv_idx, (int64_t) m.depth.head_dim * m.depth.n_kv_heads, c.n_dctx, v_idx);
    set_input(g.kq_mask, kq);
}

void csm_runner::depth0() {
    csm_build_depth0(c);
    depth_inputs(c.g_d0, 0);
    csm_compute(c, c.g_d0);
}

void csm_runner::depthk(int32_t k, const std::vector<int32_t> & prev) {
    const int32_t B = c.n_active;
    csm_build_depthk(c);
    csm_graph & g = c.g_dk;
    depth_inputs(g, k);
    ids.resize(B);
    for (int32_t b = 0; b < B; b++) ids[b] = (k - 1) * V + prev[b];
    set_input(g.audio_ids, ids);
    std::vector<int32_t> heads(B, k - 1);
    set_input(g.head_ids, heads);
    csm_compute(c, g);
    logits.resize((size_t) V * c.n_seq);
    ggml_backend_tensor_get(g.logits, logits.data(), 0, (size_t) V * B * sizeof(float));
}
