// csm_graph.cpp - ggml graphs of the backbone and the depth decoder (Llama blocks with KV caches).
#include "csm_context.h"
#include "csm_log.h"
#include "csm_ops.h"

#include <cmath>

void csm_graph::reset() {
    if (alloc) ggml_gallocr_free(alloc);
    if (ctx) ggml_free(ctx);
    ctx = nullptr;
    gf = nullptr;
    alloc = nullptr;
    key = -1;
    text_ids = text_mask = audio_ids = audio_mask = pos = kv_idx = v_idx = kq_mask = head_ids = logits = nullptr;
}

// Nodes (and tensors) of a graph: about 31 per Llama block and a few dozen around them, so the
// loader's 1024 blocks fit too (a fixed 4096 aborted in ggml_new_tensor from about 130 blocks).
static size_t graph_nodes(const csm_model & m) {
    return 1024 + 64 * (size_t) std::max(m.backbone.n_layers, m.depth.n_layers);
}

static ggml_context * new_graph_ctx(const csm_model & m) {
    const size_t n = graph_nodes(m);
    ggml_init_params ip = {n * ggml_tensor_overhead() + ggml_graph_overhead_custom(n, false), nullptr, true};
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) csm_fail("out of memory creating a graph");
    return ctx;
}

static ggml_tensor * input(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1 = 1, int64_t ne2 = 1, int64_t ne3 = 1) {
    ggml_tensor * t = ggml_new_tensor_4d(ctx, type, ne0, ne1, ne2, ne3);
    ggml_set_input(t);
    return t;
}

// Sum of the present columns' embeddings: text rows and 32 audio codebook rows, each masked.
// Returns [d, n_tok].
static ggml_tensor * embed_rows(ggml_context * ctx, const csm_model & m, csm_graph & g, int64_t n_tok, bool with_text) {
    const int64_t d = m.hp.bb_d_model, ncb = m.hp.n_codebooks;
    g.audio_ids = input(ctx, GGML_TYPE_I32, ncb * n_tok);
    g.audio_mask = input(ctx, GGML_TYPE_F32, 1, ncb * n_tok);
    if (with_text) {
        g.text_ids = input(ctx, GGML_TYPE_I32, n_tok);
        g.text_mask = input(ctx, GGML_TYPE_F32, 1, n_tok);
    }
    if (ggml_tensor * e = csm_embed(ctx, m, g.audio_ids, g.audio_mask, g.text_ids, g.text_mask)) return e;
    ggml_tensor * a = ggml_get_rows(ctx, m.audio_embd, g.audio_ids);          // [d, ncb * n_tok]
    a = ggml_mul(ctx, a, g.audio_mask);
    a = ggml_reshape_3d(ctx, a, d, ncb, n_tok);
    a = ggml_cont(ctx, ggml_permute(ctx, a, 1, 0, 2, 3));                     // [ncb, d, n_tok]
    a = ggml_reshape_2d(ctx, ggml_sum_rows(ctx, a), d, n_tok);               // [d, n_tok]
    if (!with_text) return a;
    ggml_tensor * t = ggml_mul(ctx, ggml_get_rows(ctx, m.text_embd, g.text_ids), g.text_mask);
    return ggml_add(ctx, a, t);
}

// Attention of q [hd, nh, T*B] (after RoPE) over cache rows [0, n_kv) of sequences [seq0, seq0 + B),
// the caches as written by this step (k_all, v_all); result [hd * nh, T*B]. pycsm's kernel when the
// model runs one (one op per layer), else ggml's products and softmax.
static ggml_tensor * attention(ggml_context * ctx, const csm_model & m, const csm_llama & L, ggml_tensor * k_all,
                               ggml_tensor * v_all, ggml_tensor * q, ggml_tensor * kq_mask, int64_t n_ctx, int64_t seq0,
                               int64_t T, int64_t B, int64_t n_kv) {
    const int64_t hd = L.head_dim, nh = L.n_heads, nkv = L.n_kv_heads, kvd = hd * nkv;
    const size_t es = ggml_element_size(k_all);
    ggml_tensor * K = ggml_view_4d(ctx, k_all, hd, nkv, n_kv, B, hd * es, kvd * es, kvd * es * n_ctx, kvd * es * n_ctx * seq0);
    ggml_tensor * V = ggml_view_4d(ctx, v_all, n_kv, hd, nkv, B, n_ctx * es, hd * n_ctx * es, kvd * n_ctx * es,
                                   kvd * n_ctx * es * seq0);                    // [n_kv, hd, nkv, B]
    if (ggml_tensor * o = csm_attention(ctx, m, ggml_reshape_4d(ctx, q, hd, nh, T, B), K, V, kq_mask)) {
        return ggml_reshape_2d(ctx, o, hd * nh, T * B);
    }
    K = ggml_permute(ctx, K, 0, 2, 1, 3);                                      // [hd, n_kv, nkv, B]
    q = ggml_permute(ctx, ggml_reshape_4d(ctx, q, hd, nh, T, B), 0, 2, 1, 3);  // [hd, T, nh, B]
    // Several positions: the queries of a head made contiguous, so that ggml's products over them
    // read memory in order (the same dot products, so the same results; a 10 s voice's prefill
    // ~10 % faster). One position's are contiguous already.
    if (T > 1) q = ggml_cont(ctx, q);
    ggml_tensor * kq = ggml_mul_mat(ctx, K, q);                                // [n_kv, T, nh, B]
    kq = ggml_soft_max_ext(ctx, kq, kq_mask, 1.0f / std::sqrt((float) hd), 0.0f);
    ggml_tensor * o = ggml_mul_mat(ctx, V, kq);                                // [hd, T, nh, B]
    if (T > 1) o = ggml_cont(ctx, ggml_permute(ctx, o, 0, 2, 1, 3));          // [hd, nh, T, B] (T = 1: already)
    return ggml_reshape_2d(ctx, o, hd * nh, T * B);
}

// Llama blocks over x [d, T*B]: T new positions for each of B sequences. The caches hold n_seq
// sequences of n_ctx rows; this graph reads rows [0, n_kv) of sequences [seq0, seq0 + B). Result
// [d, T*B]; with last_only (a prompt: B = 1) [d, 1], the last position's only: the last layer writes
// every position's keys and values but runs its attention, output and feed-forward on the last
// position alone (the others' results there feed nothing; a 16-layer backbone's prefill does 6 %
// fewer multiply-adds). Each column's products do not depend on the others (kernel.h), so the last
// position's bits are the same either way.
static ggml_tensor * llama_blocks(ggml_context * ctx, ggml_cgraph * gf, const csm_model & m, const csm_llama & L, float eps,
                                  std::vector<csm_kv_layer> & kv, int64_t n_ctx, int64_t seq0, ggml_tensor * x,
                                  int64_t T, int64_t B, int64_t n_kv, csm_graph & g, bool last_only = false) {
    const int64_t hd = L.head_dim, nh = L.n_heads, nkv = L.n_kv_heads, kvd = hd * nkv;
    g.pos = input(ctx, GGML_TYPE_I32, T * B);
    g.kv_idx = input(ctx, GGML_TYPE_I64, T * B);
    g.v_idx = input(ctx, GGML_TYPE_I64, kvd * T * B);
    g.kq_mask = input(ctx, GGML_TYPE_F32, n_kv, T, 1, B);
    const int n_ctx_orig = L.rope.llama3 ? L.rope.orig_max_pos : 0;

    for (int il = 0; il < L.n_layers; il++) {
        const csm_layer & l = L.layers[il];
        ggml_tensor * cur = ggml_mul(ctx, ggml_rms_norm(ctx, x, eps), l.attn_norm);
        ggml_tensor * q, * k, * v;
        csm_mul_mat_qkv(ctx, m, l.wq, l.wk, l.wv, cur, &q, &k, &v);             // v: [kvd, T*B]
        q = ggml_reshape_3d(ctx, q, hd, nh, T * B);
        k = ggml_reshape_3d(ctx, k, hd, nkv, T * B);
        q = ggml_rope_ext(ctx, q, g.pos, L.rope.freq_factors, (int) hd, GGML_ROPE_TYPE_NEOX, n_ctx_orig,
                          L.rope.theta, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f);
        k = ggml_rope_ext(ctx, k, g.pos, L.rope.freq_factors, (int) hd, GGML_ROPE_TYPE_NEOX, n_ctx_orig,
                          L.rope.theta, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f);
        ggml_tensor * k_all = ggml_set_rows(ctx, kv[il].k, ggml_reshape_2d(ctx, k, kvd, T * B), g.kv_idx);
        ggml_tensor * v_all = ggml_set_rows(ctx, kv[il].v, ggml_reshape_2d(ctx, v, 1, kvd * T * B), g.v_idx);
        ggml_build_forward_expand(gf, k_all);
        ggml_build_forward_expand(gf, v_all);
        ggml_tensor * mask = g.kq_mask;
        int64_t Tq = T;
        if (last_only && B == 1 && T > 1 && il == L.n_layers - 1) {
            q = ggml_view_3d(ctx, q, hd, nh, 1, q->nb[1], q->nb[2], q->nb[2] * (T - 1));
            mask = ggml_view_4d(ctx, mask, n_kv, 1, 1, 1, mask->nb[1], mask->nb[2], mask->nb[3], mask->nb[1] * (T - 1));
            x = ggml_view_2d(ctx, x, x->ne[0], 1, x->nb[1], x->nb[1] * (T - 1));
            Tq = 1;
        }
        ggml_tensor * o = attention(ctx, m, L, k_all, v_all, q, mask, n_ctx, seq0, Tq, B, n_kv);
        x = csm_mul_mat_add(ctx, m, l.wo, o, x);

        cur = ggml_mul(ctx, ggml_rms_norm(ctx, x, eps), l.ffn_norm);
        x = csm_mul_mat_add(ctx, m, l.w_down, csm_ffn_gate_up(ctx, m, l.w_gate, l.w_up, cur), x);
    }
    return ggml_mul(ctx, ggml_rms_norm(ctx, x, eps), L.output_norm);
}

static void finish(csm_context & c, csm_graph & g) {
    if (!g.alloc) {
        g.alloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(c.backend));
        if (!g.alloc) csm_fail("out of memory creating a graph allocator");
    }
    if (!ggml_gallocr_alloc_graph(g.alloc, g.gf)) csm_fail("failed to allocate the compute buffer of a graph");
}

// Backbone over the last position of each sequence: final hidden -> h_buf, logits of codebook 0.
static void backbone_head(csm_context & c, ggml_context * ctx, csm_graph & g, ggml_tensor * h, int64_t seq0, int64_t B) {
    const csm_model & m = *c.model;
    const int64_t d = m.hp.bb_d_model;
    ggml_tensor * dst = ggml_view_2d(ctx, c.h_buf, d, B, c.h_buf->nb[1], c.h_buf->nb[1] * seq0);
    ggml_build_forward_expand(g.gf, ggml_cpy(ctx, h, dst));
    g.logits = csm_mul_mat(ctx, m, m.codebook0_head, h);
    ggml_set_output(g.logits);
    ggml_build_forward_expand(g.gf, g.logits);
}

void csm_build_prefill(csm_context & c, int32_t seq, int32_t T, int32_t n_kv) {
    const csm_model & m = *c.model;
    csm_graph & g = c.g_prefill;
    ggml_gallocr_t keep = g.alloc;  // the allocator (and its buffer) survive shape changes
    g.alloc = nullptr;
    g.reset();
    g.alloc = keep;
    g.ctx = new_graph_ctx(m);
    g.gf = ggml_new_graph_custom(g.ctx, graph_nodes(m), false);
    g.key = ((int64_t) T << 32) | n_kv;
    ggml_tensor * x = embed_rows(g.ctx, m, g, T, true);
    x = llama_blocks(g.ctx, g.gf, m, m.backbone, m.hp.rms_norm_eps, c.kv_bb, c.n_ctx, seq, x, T, 1, n_kv, g, true);
    ggml_tensor * last = x->ne[1] == 1 ? x : ggml_view_2d(g.ctx, x, m.hp.bb_d_model, 1, x->nb[1], x->nb[1] * (T - 1));
    backbone_head(c, g.ctx, g, last, seq, 1);
    finish(c, g);
}

void csm_build_step(csm_context & c, int32_t n_kv) {
    const csm_model & m = *c.model;
    csm_graph & g = c.g_step;
    const int64_t B = c.n_active;
    const int64_t key = (B << 32) | n_kv;
    if (g.key == key) return;
    ggml_gallocr_t keep = g.alloc;
    g.alloc = nullptr;
    g.reset();
    g.alloc = keep;
    g.ctx = new_graph_ctx(m);
    g.gf = ggml_new_graph_custom(g.ctx, graph_nodes(m), false);
    g.key = key;
    ggml_tensor * x = embed_rows(g.ctx, m, g, B, false);
    x = llama_blocks(g.ctx, g.gf, m, m.backbone, m.hp.rms_norm_eps, c.kv_bb, c.n_ctx, 0, x, 1, B, n_kv, g);
    backbone_head(c, g.ctx, g, x, 0, B);
    finish(c, g);
}

void csm_build_depth0(csm_context & c) {
    const csm_model & m = *c.model;
    csm_graph & g = c.g_d0;
    const int64_t B = c.n_active;
    if (g.key == B) return;
    g.reset();
    g.ctx = new_graph_ctx(m);
    g.gf = ggml_new_graph_custom(g.ctx, graph_nodes(m), false);
    g.key = B;
    ggml_tensor * h = ggml_view_2d(g.ctx, c.h_buf, c.h_buf->ne[0], B, c.h_buf->nb[1], 0);
    ggml_tensor * x = csm_mul_mat(g.ctx, m, m.depth_proj, h);                    // [dp_d, B]
    x = llama_blocks(g.ctx, g.gf, m, m.depth, m.hp.rms_norm_eps, c.kv_dp, c.n_dctx, 0, x, 1, B, c.n_dctx, g);
    ggml_build_forward_expand(g.gf, x);
    finish(c, g);
}

void csm_build_depthk(csm_context & c) {
    const csm_model & m = *c.model;
    csm_graph & g = c.g_dk;
    const int64_t B = c.n_active;
    if (g.key == B) return;
    g.reset();
    g.ctx = new_graph_ctx(m);
    g.gf = ggml_new_graph_custom(g.ctx, graph_nodes(m), false);
    g.key = B;
    g.audio_ids = input(g.ctx, GGML_TYPE_I32, B);
    ggml_tensor * x = csm_mul_mat(g.ctx, m, m.depth_proj, ggml_get_rows(g.ctx, m.depth_embd, g.audio_ids));
    x = llama_blocks(g.ctx, g.gf, m, m.depth, m.hp.rms_norm_eps, c.kv_dp, c.n_dctx, 0, x, 1, B, c.n_dctx, g);
    g.head_ids = input(g.ctx, GGML_TYPE_I32, 1, B);
    g.logits = csm_depth_heads(g.ctx, m, x, g.head_ids);
    ggml_set_output(g.logits);
    ggml_build_forward_expand(g.gf, g.logits);
    finish(c, g);
}

void csm_compute(csm_context & c, csm_graph & g) {
    c.pools.before_compute();
    ggml_status st = ggml_backend_graph_compute(c.backend, g.gf);
    c.pools.after_compute();
    if (st != GGML_STATUS_SUCCESS) csm_fail("graph computation failed (status %d)", (int) st);
}
