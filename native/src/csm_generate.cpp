// csm_generate.cpp - the frame loop: prompt prefill, codebook 0 from the backbone, codebooks 1..31
// from the depth decoder, sampling, stopping.
#include "csm_log.h"
#include "csm_runner.h"

#include <cstring>

namespace {

struct seq_state {
    csm_rng rng;
    int32_t n_frames = 0;
    bool done = false;
    csm_generate_result res{};
};

void generate(csm_context & c, int32_t n_batch, const int32_t * const * prompts, const int32_t * n_pos,
              const csm_generate_params & p, int32_t * const * out_codes, int32_t max_out, csm_generate_result * results) {
    const csm_model & m = *c.model;
    if (n_batch < 1 || n_batch > c.n_seq) csm_fail("n_batch %d is out of range [1, %d] for this context", n_batch, c.n_seq);
    if (!prompts || !n_pos || !out_codes) csm_fail("prompts, n_pos and out_codes are required");
    if (max_out < 0) csm_fail("max_out must be >= 0");
    csm_check_sampling(p.sampling);
    for (int32_t b = 0; b < n_batch; b++) {
        if (!out_codes[b] && max_out > 0) csm_fail("out_codes[%d] is NULL", b);
        csm_check_prompt(m, prompts[b], n_pos[b], c.n_ctx);
    }
    const int32_t ncb = m.hp.n_codebooks, V = m.hp.audio_vocab_size, n_valid = m.hp.mimi_codebook_size;
    const float t0 = p.sampling.temperature;
    const csm_pool_rest pool{c.pools}; // idle while on_frame runs and after returning
    const int32_t k0 = p.sampling.top_k;
    const float td = p.sampling.depth_temperature < 0 ? t0 : p.sampling.depth_temperature;
    const int32_t kd = p.sampling.depth_top_k < 0 ? k0 : p.sampling.depth_top_k;
    int32_t limit = max_out;
    if (p.max_frames > 0) limit = std::min(limit, p.max_frames);

    c.n_active = n_batch; // the steps run these sequences only (the others keep their cache rows)
    csm_runner r(c);
    csm_sampler sampler;
    std::vector<seq_state> st(c.n_seq);
    std::vector<int32_t> frame((size_t) ncb * c.n_seq, 0), prev(c.n_seq, 0);
    for (int32_t b = 0; b < c.n_seq; b++) {
        st[b].rng = csm_rng(p.sampling.seed + (uint64_t) b);
        st[b].done = b >= n_batch;
        if (st[b].done) continue; // unused this time: left as it is
        auto tp = csm_clock::now();
        st[b].res.n_prompt_reused = r.prefill(b, prompts[b], n_pos[b], p.reuse_prompt);
        st[b].res.n_prompt = n_pos[b];
        st[b].res.t_prefill_ms = csm_ms_since(tp);
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
        auto td0 = csm_clock::now();
        r.depth0();
        for (int32_t k = 1; k < ncb; k++) {
            r.depthk(k, prev);
            for (int32_t b = 0; b < c.n_seq; b++) {
                frame[(size_t) b * ncb + k] = st[b].done ? 0 : sampler.sample(r.logits.data() + (size_t) b * V, n_valid, td, kd, st[b].rng);
                prev[b] = frame[(size_t) b * ncb + k];
            }
        }
        const double dt_depth = csm_ms_since(td0);

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

        auto tb = csm_clock::now();
        r.step(frame);
        const double dt_bb = csm_ms_since(tb);
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
    csm_check_prompt(m, prompt, n_pos, c.n_ctx);
    if (!logits0) csm_fail("logits0 is required");
    const int32_t V = m.hp.audio_vocab_size, ncb = m.hp.n_codebooks;
    const csm_pool_rest pool{c.pools};
    c.n_active = 1;
    csm_runner r(c);
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
    p.reuse_prompt = true;
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
