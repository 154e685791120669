// csm_generate.cpp - the frame loop: prompt prefill, codebook 0 from the backbone, codebooks 1..31
// from the depth decoder, sampling, stopping.
#include "csm_context.h"
#include "csm_log.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

namespace {

using clock_type = std::chrono::steady_clock;
double ms_since(clock_type::time_point t0) {
    return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

const int32_t PREFILL_CHUNK = 256; // prompt rows per prefill graph (bounds the attention scratch)
const int32_t KV_PAD = 32;         // backbone attention spans n_past rounded up to this

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

void check_prompt(const csm_model & m, const int32_t * prompt, int32_t n_pos, int32_t n_ctx) {
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

struct runner {
    csm_context & c;
    const csm_model & m;
    const int32_t V, ncb;
    std::vector<int32_t> ids, pos, text_ids;
    std::vector<int64_t> kv_idx, v_idx;
    std::vector<float> amask, tmask, kq;
    std::vector<float> logits;   // [V * n_seq]

    explicit runner(csm_context & ctx)
        : c(ctx), m(*ctx.model), V(ctx.model->hp.audio_vocab_size), ncb(ctx.model->hp.n_codebooks) {}

    int64_t bb_kvd() const { return (int64_t) m.backbone.head_dim * m.backbone.n_kv_heads; }

    // Prefills rows of sequence `seq` from position 0; leaves codebook-0 logits in logits[seq].
    void prefill(int32_t seq, const int32_t * prompt, int32_t n_pos) {
        c.n_past[seq] = 0;
        for (int32_t r0 = 0; r0 < n_pos; r0 += PREFILL_CHUNK) {
            const int32_t T = std::min(PREFILL_CHUNK, n_pos - r0);
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
                const int32_t * row = prompt + (size_t) (r0 + t) * CSM_N_COLUMNS;
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
        }
        logits.resize((size_t) V * c.n_seq);
        ggml_backend_tensor_get(c.g_prefill.logits, logits.data() + (size_t) seq * V, 0, V * sizeof(float));
    }

    // Feeds one frame per sequence (codes[b * ncb + cb]) to the backbone; logits of codebook 0 after.
    void step(const std::vector<int32_t> & codes) {
        const int32_t B = c.n_seq;
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
        logits.resize((size_t) V * B);
        ggml_backend_tensor_get(g.logits, logits.data(), 0, logits.size() * sizeof(float));
    }

    void depth_inputs(csm_graph & g, int32_t k) {
        const int32_t B = c.n_seq;
        pos.assign(B, k);
        kv_idx.resize(B);
        for (int32_t b = 0; b < B; b++) kv_idx[b] = (int64_t) b * c.n_dctx + k;
        causal_mask(kq, c.n_dctx, 1, B, std::vector<int32_t>(B, k));
        set_input(g.pos, pos);
        set_kv_idx(g, kv_idx, (int64_t) m.depth.head_dim * m.depth.n_kv_heads, c.n_dctx, v_idx);
        set_input(g.kq_mask, kq);
    }

    // Depth decoder position 0 from h_buf (the backbone output).
    void depth0() {
        csm_build_depth0(c);
        depth_inputs(c.g_d0, 0);
        csm_compute(c, c.g_d0);
    }

    // Depth decoder position k >= 1 fed with code prev[b] of codebook k-1; logits of codebook k.
    void depthk(int32_t k, const std::vector<int32_t> & prev) {
        const int32_t B = c.n_seq;
        csm_build_depthk(c);
        csm_graph & g = c.g_dk;
        depth_inputs(g, k);
        ids.resize(B);
        for (int32_t b = 0; b < B; b++) ids[b] = (k - 1) * V + prev[b];
        set_input(g.audio_ids, ids);
        std::vector<int32_t> heads(B, k - 1);
        set_input(g.head_ids, heads);
        csm_compute(c, g);
        logits.resize((size_t) V * B);
        ggml_backend_tensor_get(g.logits, logits.data(), 0, logits.size() * sizeof(float));
    }
};

struct seq_state {
    csm_rng rng;
    int32_t n_frames = 0;
    bool done = false;
    csm_generate_result res{};
};

void check_params(const csm_generate_params & p) {
    const csm_sampling_params & s = p.sampling;
    if (!std::isfinite(s.temperature) || s.temperature < 0) csm_fail("temperature must be finite and >= 0 (got %g)", s.temperature);
    if (!std::isfinite(s.depth_temperature)) csm_fail("depth_temperature must be finite");
}

void generate(csm_context & c, int32_t n_batch, const int32_t * const * prompts, const int32_t * n_pos,
              const csm_generate_params & p, int32_t * const * out_codes, int32_t max_out, csm_generate_result * results) {
    const csm_model & m = *c.model;
    if (n_batch < 1 || n_batch > c.n_seq) csm_fail("n_batch %d is out of range [1, %d] for this context", n_batch, c.n_seq);
    if (!prompts || !n_pos || !out_codes) csm_fail("prompts, n_pos and out_codes are required");
    if (max_out < 0) csm_fail("max_out must be >= 0");
    check_params(p);
    for (int32_t b = 0; b < n_batch; b++) {
        if (!out_codes[b] && max_out > 0) csm_fail("out_codes[%d] is NULL", b);
        check_prompt(m, prompts[b], n_pos[b], c.n_ctx);
    }
    const int32_t ncb = m.hp.n_codebooks, V = m.hp.audio_vocab_size, n_valid = m.hp.mimi_codebook_size;
    const float t0 = p.sampling.temperature;
    const csm_pool_rest pool{c.threadpool}; // idle while on_frame runs and after returning
    const int32_t k0 = p.sampling.top_k;
    const float td = p.sampling.depth_temperature < 0 ? t0 : p.sampling.depth_temperature;
    const int32_t kd = p.sampling.depth_top_k < 0 ? k0 : p.sampling.depth_top_k;
    int32_t limit = max_out;
    if (p.max_frames > 0) limit = std::min(limit, p.max_frames);

    runner r(c);
    csm_sampler sampler;
    std::vector<seq_state> st(c.n_seq);
    std::vector<int32_t> frame((size_t) ncb * c.n_seq, 0), prev(c.n_seq, 0);
    for (int32_t b = 0; b < c.n_seq; b++) {
        st[b].rng = csm_rng(p.sampling.seed + (uint64_t) b);
        st[b].done = b >= n_batch;
        if (st[b].done) { c.n_past[b] = 0; continue; }
        auto tp = clock_type::now();
        r.prefill(b, prompts[b], n_pos[b]);
        st[b].res.n_prompt = n_pos[b];
        st[b].res.t_prefill_ms = ms_since(tp);
    }
    std::vector<float> logits0 = r.logits;

    auto finish_seq = [&](int32_t b, int32_t reason) {
        st[b].done = true;
        st[b].res.stop_reason = reason;
    };
    for (int32_t b = 0; b < n_batch; b++) {
        if (limit == 0) finish_seq(b, CSM_STOP_MAX_FRAMES);
    }

    auto active = [&] {
        for (int32_t b = 0; b < n_batch; b++) if (!st[b].done) return true;
        return false;
    };
    while (active()) {
        // codebook 0 from the backbone logits
        for (int32_t b = 0; b < c.n_seq; b++) {
            frame[(size_t) b * ncb] = st[b].done ? 0 : sampler.sample(logits0.data() + (size_t) b * V, n_valid, t0, k0, st[b].rng);
            prev[b] = frame[(size_t) b * ncb];
        }
        auto td0 = clock_type::now();
        r.depth0();
        for (int32_t k = 1; k < ncb; k++) {
            r.depthk(k, prev);
            for (int32_t b = 0; b < c.n_seq; b++) {
                frame[(size_t) b * ncb + k] = st[b].done ? 0 : sampler.sample(r.logits.data() + (size_t) b * V, n_valid, td, kd, st[b].rng);
                prev[b] = frame[(size_t) b * ncb + k];
            }
        }
        const double dt_depth = ms_since(td0);

        if (p.on_frame) pool.rest();
        for (int32_t b = 0; b < n_batch; b++) {
            if (st[b].done) continue;
            st[b].res.t_depth_ms += dt_depth;
            const int32_t * f = frame.data() + (size_t) b * ncb;
            bool eos = true;
            for (int32_t k = 0; k < ncb; k++) eos = eos && f[k] == m.hp.codebook_eos_token_id;
            if (eos && p.stop_at_eos) { finish_seq(b, CSM_STOP_EOS); continue; }
            memcpy(out_codes[b] + (size_t) st[b].n_frames * ncb, f, sizeof(int32_t) * ncb);
            const int32_t idx = st[b].n_frames++;
            if (p.on_frame && !p.on_frame(idx, f, p.user_data)) { finish_seq(b, CSM_STOP_ABORTED); continue; }
            if (st[b].n_frames >= limit) { finish_seq(b, CSM_STOP_MAX_FRAMES); continue; }
            if (c.n_past[b] >= c.n_ctx) { finish_seq(b, CSM_STOP_CONTEXT_FULL); continue; }
        }
        if (!active()) break;

        auto tb = clock_type::now();
        r.step(frame);
        const double dt_bb = ms_since(tb);
        for (int32_t b = 0; b < n_batch; b++) if (!st[b].done) st[b].res.t_backbone_ms += dt_bb;
        logits0 = r.logits;
    }
    for (int32_t b = 0; b < n_batch; b++) {
        st[b].res.n_frames = st[b].n_frames;
        if (results) results[b] = st[b].res;
    }
}

void eval_frame_logits(csm_context & c, const int32_t * prompt, int32_t n_pos, const int32_t * codes, float * logits0,
                       float * depth_logits) {
    const csm_model & m = *c.model;
    check_prompt(m, prompt, n_pos, c.n_ctx);
    if (!logits0) csm_fail("logits0 is required");
    const int32_t V = m.hp.audio_vocab_size, ncb = m.hp.n_codebooks;
    const csm_pool_rest pool{c.threadpool};
    runner r(c);
    r.prefill(0, prompt, n_pos);
    memcpy(logits0, r.logits.data(), sizeof(float) * V);
    if (!depth_logits) return;
    if (!codes) csm_fail("codes are required for the depth logits");
    for (int32_t k = 0; k < ncb; k++) {
        if (codes[k] < 0 || codes[k] >= V) csm_fail("code %d of codebook %d is out of range", codes[k], k);
    }
    r.depth0();
    std::vector<int32_t> prev(c.n_seq, 0);
    for (int32_t k = 1; k < ncb; k++) {
        prev[0] = codes[k - 1];
        r.depthk(k, prev);
        memcpy(depth_logits + (size_t) (k - 1) * V, r.logits.data(), sizeof(float) * V);
    }
}

} // namespace

extern "C" {

struct csm_generate_params csm_generate_default_params(void) {
    csm_generate_params p;
    p.sampling.temperature = 0.9f;
    p.sampling.top_k = 50;
    p.sampling.depth_temperature = -1.0f;
    p.sampling.depth_top_k = -1;
    p.sampling.seed = 0;
    p.max_frames = 0;
    p.stop_at_eos = true;
    p.on_frame = nullptr;
    p.user_data = nullptr;
    return p;
}

int32_t csm_generate(csm_context * ctx, const int32_t * prompt, int32_t n_pos, struct csm_generate_params params,
                     int32_t * out_codes, int32_t max_out, struct csm_generate_result * result) {
    return csm_guard<int32_t>(-1, [&] {
        if (!ctx) csm_fail("context is NULL");
        const csm_hold<csm_context> hold(ctx); // a csm_context_free meanwhile waits for the return
        csm_generate_result res{};
        generate(*ctx, 1, &prompt, &n_pos, params, &out_codes, max_out, &res);
        if (result) *result = res;
        return res.n_frames;
    });
}

int32_t csm_generate_batch(csm_context * ctx, int32_t n_batch, const int32_t * const * prompts, const int32_t * n_pos,
                           struct csm_generate_params params, int32_t * const * out_codes, int32_t max_out,
                           struct csm_generate_result * results) {
    return csm_guard<int32_t>(-1, [&] {
        if (!ctx) csm_fail("context is NULL");
        const csm_hold<csm_context> hold(ctx); // a csm_context_free meanwhile waits for the return
        generate(*ctx, n_batch, prompts, n_pos, params, out_codes, max_out, results);
        return 0;
    });
}

int32_t csm_eval_frame_logits(csm_context * ctx, const int32_t * prompt, int32_t n_pos, const int32_t * codes,
                              float * logits0, float * depth_logits) {
    return csm_guard<int32_t>(-1, [&] {
        if (!ctx) csm_fail("context is NULL");
        const csm_hold<csm_context> hold(ctx); // a csm_context_free meanwhile waits for the return
        eval_frame_logits(*ctx, prompt, n_pos, codes, logits0, depth_logits);
        return 0;
    });
}

} // extern "C"
