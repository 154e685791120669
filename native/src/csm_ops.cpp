// csm_ops.cpp - pycsm's kernels run as ggml custom ops (csm_ops.h). The threads of ggml's pool split
// each op's 4-row tiles; every thread prepares the op's input itself (cheap next to its share of the
// weights).
#include "csm_ops.h"

#include "csm_log.h"
#include "csm_packed.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct q8_scratch {
    std::vector<int8_t> y;
    std::vector<float> dy;
    std::vector<int32_t> sb;
};

// The op's input as the kernel reads it: quantised for the int8 formats (into this thread's
// scratch), the f32 columns for F16.
csm_kernel_input prepare_input(const ggml_tensor * x, const csm_packed_matrix & W) {
    csm_kernel_input in;
    const int64_t n = x->ne[1], x_stride = (int64_t) (x->nb[1] / sizeof(float));
    if (!csm_wformat_get(W.fmt).int8_input) {
        in.x = (const float *) x->data;
        in.x_stride = x_stride;
        return in;
    }
    thread_local q8_scratch s;
    const size_t nblk = (size_t) (n * W.nbp);
    if (s.y.size() < nblk * 32) s.y.resize(nblk * 32);
    if (s.dy.size() < nblk) { s.dy.resize(nblk); s.sb.resize(nblk); }
    W.kernel->quantize((const float *) x->data, x_stride, n, x->ne[0], W.nbp, s.y.data(), s.dy.data(), s.sb.data());
    in.y = s.y.data();
    in.dy = s.dy.data();
    in.sb = s.sb.data();
    in.col_stride = n;
    return in;
}

// Rows [r0, r1) of W times columns [c0, c0 + n) of the input, to out[c * out_stride + r - r0].
void gemm_rows(const csm_packed_matrix & W, const csm_kernel_input & in, int64_t c0, int64_t n, int64_t r0, int64_t r1,
               float * out, int64_t out_stride) {
    if (r0 < r1) W.kernel->gemm[W.fmt](W.w, W.rows, W.cols, r0, r1, in, c0, n, out, out_stride);
}

// Thread ith's share [t0, t1) of n_tiles 4-row tiles: contiguous, so each thread streams its part once.
void tile_share(int64_t n_tiles, int ith, int nth, int64_t & t0, int64_t & t1) {
    t0 = n_tiles * ith / nth;
    t1 = n_tiles * (ith + 1) / nth;
}

// This thread's share of W times columns [c0, c0 + n) of the input.
void gemm_share(const csm_packed_matrix & W, const csm_kernel_input & in, int64_t c0, int64_t n, float * out,
                int64_t out_stride, int ith, int nth) {
    int64_t t0, t1;
    tile_share((W.rows + 3) / 4, ith, nth, t0, t1);
    gemm_rows(W, in, c0, n, t0 * 4, std::min(t1 * 4, W.rows), out + t0 * 4, out_stride);
}

// dst [rows, n, lanes] = W x for an F16 W (userdata) and x [cols, n, lanes] with any column step:
// each lane's columns are the kernel's input as they lie.
void mul_mat_lanes_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_packed_matrix & W = *(const csm_packed_matrix *) userdata;
    const ggml_tensor * x = dst->src[0];
    for (int64_t lane = 0; lane < x->ne[2]; lane++) {
        csm_kernel_input in;
        in.x = (const float *) ((const char *) x->data + lane * x->nb[2]);
        in.x_stride = (int64_t) (x->nb[1] / sizeof(float));
        gemm_share(W, in, 0, x->ne[1], (float *) ((char *) dst->data + lane * dst->nb[2]),
                   (int64_t) (dst->nb[1] / sizeof(float)), ith, nth);
    }
}

// dst = W x, or res + W x when src[1] (res, f32 [W.rows, n]) is given; W = userdata. Each thread
// adds the residual to its own rows.
void mul_mat_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_packed_matrix & W = *(const csm_packed_matrix *) userdata;
    const ggml_tensor * x = dst->src[0], * res = dst->src[1];
    const csm_kernel_input in = prepare_input(x, W);
    const int64_t n = x->ne[1], stride = (int64_t) (dst->nb[1] / sizeof(float));
    float * out = (float *) dst->data;
    gemm_share(W, in, 0, n, out, stride, ith, nth);
    if (!res) return;
    int64_t t0, t1;
    tile_share((W.rows + 3) / 4, ith, nth, t0, t1);
    const int64_t r0 = t0 * 4, r1 = std::min(t1 * 4, W.rows);
    for (int64_t c = 0; c < n; c++) {
        const float * rc = (const float *) ((const char *) res->data + c * res->nb[1]);
        float * oc = out + c * stride;
        for (int64_t r = r0; r < r1; r++) oc[r] = rc[r] + oc[r];
    }
}

// dst[:, b] = heads[ids[b]] x[:, b]; userdata = the model. Runs of columns with the same head are
// one product (the frame loop gives all sequences the same head).
void heads_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_model & m = *(const csm_model *) userdata;
    const ggml_tensor * x = dst->src[0];
    const int32_t * ids = (const int32_t *) dst->src[1]->data;
    const int64_t n = x->ne[1], n_heads = (int64_t) m.packed_heads.size();
    const csm_kernel_input in = prepare_input(x, *m.packed_heads[0]);
    const int64_t stride = (int64_t) (dst->nb[1] / sizeof(float));
    for (int64_t c0 = 0; c0 < n;) {
        int64_t c1 = c0 + 1;
        while (c1 < n && ids[c1] == ids[c0]) c1++;
        const int64_t h = ids[c0] < 0 ? 0 : ids[c0] >= n_heads ? n_heads - 1 : ids[c0]; // ids come from csm_generate
        gemm_share(*m.packed_heads[h], in, c0, c1 - c0, (float *) dst->data + c0 * stride, stride, ith, nth);
        c0 = c1;
    }
}

// The group's products one after another in dst: matrix i's [rows_i, n] at the sum of the earlier
// rows_i * n. The threads split the tiles of all matrices together.
void group_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_packed_group & G = *(const csm_packed_group *) userdata;
    const ggml_tensor * x = dst->src[0];
    const int64_t n = x->ne[1];
    const csm_kernel_input in = prepare_input(x, *G.mats[0]);
    int64_t n_tiles = 0;
    for (const csm_packed_matrix * W : G.mats) n_tiles += (W->rows + 3) / 4;
    int64_t t0, t1;
    tile_share(n_tiles, ith, nth, t0, t1);
    float * out = (float *) dst->data;
    int64_t first = 0; // the current matrix's first tile in the common numbering
    for (const csm_packed_matrix * W : G.mats) {
        const int64_t nt = (W->rows + 3) / 4, a = std::max(t0 - first, (int64_t) 0), b = std::min(t1 - first, nt);
        if (a < b) gemm_rows(*W, in, 0, n, a * 4, std::min(b * 4, W->rows), out + a * 4, W->rows);
        out += W->rows * n;
        first += nt;
    }
}

// dst [ff, n] = silu(gate x) * (up x) for the group {gate, up}: this thread's tiles in chunks of
// rows, both products of a chunk into scratch, then combined.
void gate_up_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_packed_group & G = *(const csm_packed_group *) userdata;
    const csm_packed_matrix & gate = *G.mats[0], & up = *G.mats[1];
    const ggml_tensor * x = dst->src[0];
    const int64_t n = x->ne[1], ff = gate.rows, stride = (int64_t) (dst->nb[1] / sizeof(float));
    const csm_kernel_input in = prepare_input(x, gate);
    const int64_t CHUNK = 128; // rows per chunk (a multiple of 4)
    thread_local std::vector<float> g, u;
    if (g.size() < (size_t) (CHUNK * n)) {
        g.resize((size_t) (CHUNK * n));
        u.resize((size_t) (CHUNK * n));
    }
    int64_t t0, t1;
    tile_share((ff + 3) / 4, ith, nth, t0, t1);
    const int64_t r_end = std::min(t1 * 4, ff);
    for (int64_t r0 = t0 * 4; r0 < r_end; r0 += CHUNK) {
        const int64_t r1 = std::min(r0 + CHUNK, r_end);
        gemm_rows(gate, in, 0, n, r0, r1, g.data(), CHUNK);
        gemm_rows(up, in, 0, n, r0, r1, u.data(), CHUNK);
        for (int64_t c = 0; c < n; c++) {
            gate.kernel->silu_mul(g.data() + c * CHUNK, u.data() + c * CHUNK, (float *) dst->data + c * stride + r0, r1 - r0);
        }
    }
}

// dst = elu(src), userdata = the kernel; the threads take contiguous ranges of whole 16-value chunks.
void elu_op(ggml_tensor * dst, const ggml_tensor * src, int ith, int nth, void * userdata) {
    const csm_kernel & k = *(const csm_kernel *) userdata;
    const int64_t n = ggml_nelements(src), chunks = (n + 15) / 16;
    const int64_t i0 = std::min(chunks * ith / nth * 16, n), i1 = std::min(chunks * (ith + 1) / nth * 16, n);
    if (i0 < i1) k.elu((const float *) src->data + i0, (float *) dst->data + i0, i1 - i0);
}

// Keys a query row of the mask sees: the causal masks (csm_runner.cpp) give 0 to rows [0, p] and
// -inf to the rest.
int32_t keys_seen(const float * row, int64_t n_kv) {
    int64_t n = n_kv;
    while (n > 0 && row[n - 1] == -INFINITY) n--;
    return (int32_t) n;
}

// dst [hd, nh, T, B] = attention of q [hd, nh, T, B] over K [hd, nkv, n_kv, B] and V [n_kv, hd, nkv, B]
// (views of the caches, V's rows transposed) with mask [n_kv, T, 1, B]; userdata = the kernel. Head
// h reads KV head h / (nh / nkv). The threads take the (sequence, KV head, block of 16 queries)
// tasks in turn (the later blocks of a causal prompt see more keys).
void attention_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_kernel & kern = *(const csm_kernel *) userdata;
    const ggml_tensor * q = dst->src[0], * K = dst->src[1], * V = dst->src[2], * mask = dst->src[3];
    const int64_t hd = q->ne[0], nh = q->ne[1], T = q->ne[2], B = q->ne[3], nkv = K->ne[1], n_kv = K->ne[2];
    const int64_t group = nh / nkv, per_kv = T * group, n_blk = (per_kv + CSM_ATTN_QUERIES - 1) / CSM_ATTN_QUERIES;
    thread_local std::vector<float> scratch;
    const size_t need = (size_t) csm_attn_scratch(hd, n_kv) + 16;
    if (scratch.size() < need) scratch.resize(need);
    csm_attn_block a;
    a.hd = hd;
    a.scale = 1.0f / std::sqrt((float) hd);
    a.k_stride = (int64_t) (K->nb[2] / sizeof(float));
    a.vt_stride = (int64_t) (V->nb[1] / sizeof(float));
    a.scratch = (float *) (((uintptr_t) scratch.data() + 63) & ~(uintptr_t) 63);
    for (int64_t task = ith; task < B * nkv * n_blk; task += nth) {
        const int64_t b = task / (nkv * n_blk), g = task / n_blk % nkv, blk = task % n_blk;
        a.k = (const float *) ((const char *) K->data + b * K->nb[3] + g * K->nb[1]);
        a.vt = (const float *) ((const char *) V->data + b * V->nb[3] + g * V->nb[2]);
        a.n_q = (int) std::min<int64_t>(CSM_ATTN_QUERIES, per_kv - blk * CSM_ATTN_QUERIES);
        int64_t t_seen = -1;
        int32_t seen = 0;
        for (int i = 0; i < a.n_q; i++) {
            const int64_t qi = blk * CSM_ATTN_QUERIES + i, t = qi / group, h = g * group + qi % group;
            a.q[i] = (const float *) ((const char *) q->data + b * q->nb[3] + t * q->nb[2] + h * q->nb[1]);
            a.out[i] = (float *) ((char *) dst->data + b * dst->nb[3] + t * dst->nb[2] + h * dst->nb[1]);
            if (t != t_seen) {
                seen = keys_seen((const float *) ((const char *) mask->data + b * mask->nb[3] + t * mask->nb[1]), n_kv);
                t_seen = t;
            }
            a.n_keys[i] = seen;
        }
        kern.attend(a);
    }
}

// Row id of table as f32 (ids come from the runner, which checks the codes and tokens; clamped here
// all the same).
void embedding_row(const ggml_tensor * table, int32_t id, float * out) {
    const int64_t rows = table->ne[1], r = id < 0 ? 0 : id >= rows ? rows - 1 : id;
    const char * src = (const char *) table->data + r * table->nb[1];
    if (table->type == GGML_TYPE_F32) {
        memcpy(out, src, (size_t) table->ne[0] * sizeof(float));
    } else {
        ggml_get_type_traits(table->type)->to_float(src, out, table->ne[0]);
    }
}

// dst [d, n_tok] = the sum of the masked embeddings of a position's columns (embed_rows in
// csm_graph.cpp): per value, the n_cb audio rows times their mask summed in a double in codebook
// order (as ggml's get_rows, mul and sum_rows do, so the same bits), rounded to float, plus the text
// row times its mask when src[2] (text ids) is given. userdata = the model; the threads take
// positions in turn.
void embed_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_model & m = *(const csm_model *) userdata;
    const int32_t * audio_ids = (const int32_t *) dst->src[0]->data;
    const float * audio_mask = (const float *) dst->src[1]->data;
    const bool with_text = dst->src[2] != nullptr;
    const int64_t d = dst->ne[0], n_tok = dst->ne[1], ncb = m.hp.n_codebooks;
    thread_local std::vector<float> row;
    thread_local std::vector<double> acc;
    if ((int64_t) row.size() < d) { row.resize((size_t) d); acc.resize((size_t) d); }
    for (int64_t t = ith; t < n_tok; t += nth) {
        std::fill(acc.begin(), acc.begin() + d, 0.0);
        for (int64_t cb = 0; cb < ncb; cb++) {
            embedding_row(m.audio_embd, audio_ids[t * ncb + cb], row.data());
            const float mk = audio_mask[t * ncb + cb];
            for (int64_t i = 0; i < d; i++) acc[(size_t) i] += (double) (row[(size_t) i] * mk);
        }
        float * out = (float *) ((char *) dst->data + t * dst->nb[1]);
        for (int64_t i = 0; i < d; i++) out[i] = (float) acc[(size_t) i];
        if (!with_text) continue;
        embedding_row(m.text_embd, ((const int32_t *) dst->src[2]->data)[t], row.data());
        const float mk = ((const float *) dst->src[3]->data)[t];
        for (int64_t i = 0; i < d; i++) out[i] = out[i] + row[(size_t) i] * mk;
    }
}

const csm_packed_group * find_group(const csm_model & m, const ggml_tensor * first) {
    auto it = m.packed_groups.find(first);
    return it == m.packed_groups.end() ? nullptr : it->second.get();
}

void check_input(const csm_packed_matrix & W, const ggml_tensor * x, const char * what) {
    if (x->type != GGML_TYPE_F32 || x->ne[0] != W.cols || x->ne[2] != 1 || x->ne[3] != 1 || x->nb[0] != sizeof(float)) {
        csm_fail("internal: '%s' is packed but its input is not f32 rows of %lld", what, (long long) W.cols);
    }
}

} // namespace

void csm_mul_mat_qkv(ggml_context * ctx, const csm_model & m, ggml_tensor * wq, ggml_tensor * wk, ggml_tensor * wv,
                     ggml_tensor * x, ggml_tensor ** q, ggml_tensor ** k, ggml_tensor ** v) {
    const csm_packed_group * G = find_group(m, wq);
    if (!G) {
        *q = csm_mul_mat(ctx, m, wq, x);
        *k = csm_mul_mat(ctx, m, wk, x);
        *v = csm_mul_mat(ctx, m, wv, x);
        return;
    }
    check_input(*G->mats[0], x, wq->name);
    const int64_t n = x->ne[1];
    int64_t rows = 0;
    for (const csm_packed_matrix * W : G->mats) rows += W->rows;
    ggml_tensor * args[1] = {x};
    ggml_tensor * all = ggml_custom_4d(ctx, GGML_TYPE_F32, rows * n, 1, 1, 1, args, 1, group_op, GGML_N_TASKS_MAX, (void *) G);
    ggml_tensor ** outs[3] = {q, k, v};
    size_t offset = 0;
    for (int i = 0; i < 3; i++) {
        const int64_t r = G->mats[i]->rows;
        *outs[i] = ggml_view_2d(ctx, all, r, n, r * sizeof(float), offset);
        offset += (size_t) (r * n) * sizeof(float);
    }
}

ggml_tensor * csm_ffn_gate_up(ggml_context * ctx, const csm_model & m, ggml_tensor * w_gate, ggml_tensor * w_up,
                              ggml_tensor * x) {
    const csm_packed_group * G = find_group(m, w_gate);
    if (!G) return ggml_mul(ctx, ggml_silu(ctx, csm_mul_mat(ctx, m, w_gate, x)), csm_mul_mat(ctx, m, w_up, x));
    check_input(*G->mats[0], x, w_gate->name);
    ggml_tensor * args[1] = {x};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, G->mats[0]->rows, x->ne[1], 1, 1, args, 1, gate_up_op, GGML_N_TASKS_MAX,
                          (void *) G);
}

ggml_tensor * csm_mul_mat(ggml_context * ctx, const csm_model & m, ggml_tensor * w, ggml_tensor * x) {
    auto it = m.packed.find(w);
    if (it == m.packed.end()) return ggml_mul_mat(ctx, w, x);
    const csm_packed_matrix * W = it->second.get();
    check_input(*W, x, w->name);
    ggml_tensor * args[1] = {x};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, W->rows, x->ne[1], 1, 1, args, 1, mul_mat_op, GGML_N_TASKS_MAX, (void *) W);
}

ggml_tensor * csm_mul_mat_add(ggml_context * ctx, const csm_model & m, ggml_tensor * w, ggml_tensor * x, ggml_tensor * res) {
    auto it = m.packed.find(w);
    if (it == m.packed.end() || res->type != GGML_TYPE_F32 || res->nb[0] != sizeof(float) || res->ne[0] != w->ne[1] ||
        res->ne[1] != x->ne[1] || res->ne[2] != 1 || res->ne[3] != 1) {
        return ggml_add(ctx, res, csm_mul_mat(ctx, m, w, x));
    }
    const csm_packed_matrix * W = it->second.get();
    check_input(*W, x, w->name);
    ggml_tensor * args[2] = {x, res};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, W->rows, x->ne[1], 1, 1, args, 2, mul_mat_op, GGML_N_TASKS_MAX, (void *) W);
}

ggml_tensor * csm_mul_mat_packed(ggml_context * ctx, const csm_packed_matrix * W, ggml_tensor * x) {
    if (x->type != GGML_TYPE_F32 || x->ne[0] != W->cols || x->ne[3] != 1 || x->nb[0] != sizeof(float) ||
        x->nb[1] % sizeof(float) != 0) {
        csm_fail("internal: a packed product's input is not f32 columns of %lld", (long long) W->cols);
    }
    if (!csm_wformat_get(W->fmt).int8_input) {  // the kernel reads the f32 columns as they lie
        ggml_tensor * args[1] = {x};
        return ggml_custom_4d(ctx, GGML_TYPE_F32, W->rows, x->ne[1], x->ne[2], 1, args, 1, mul_mat_lanes_op,
                              GGML_N_TASKS_MAX, (void *) W);
    }
    if (!ggml_is_contiguous(x)) csm_fail("internal: a packed %s product's input is not contiguous", csm_wformat_get(W->fmt).name);
    ggml_tensor * args[1] = {ggml_reshape_2d(ctx, x, x->ne[0], x->ne[1] * x->ne[2])};
    ggml_tensor * y = ggml_custom_4d(ctx, GGML_TYPE_F32, W->rows, x->ne[1] * x->ne[2], 1, 1, args, 1, mul_mat_op,
                                     GGML_N_TASKS_MAX, (void *) W);
    return ggml_reshape_3d(ctx, y, W->rows, x->ne[1], x->ne[2]);
}

ggml_tensor * csm_depth_heads(ggml_context * ctx, const csm_model & m, ggml_tensor * x, ggml_tensor * ids) {
    const int64_t V = m.hp.audio_vocab_size, B = x->ne[1];
    if (m.packed_heads.empty()) {
        ggml_tensor * l = ggml_mul_mat_id(ctx, m.depth_heads, ggml_reshape_3d(ctx, x, x->ne[0], 1, B), ids);
        return ggml_reshape_2d(ctx, l, V, B);
    }
    if (x->type != GGML_TYPE_F32 || x->nb[0] != sizeof(float) || x->ne[2] != 1 || x->ne[3] != 1) {
        csm_fail("internal: depth heads need f32 rows of hidden states");
    }
    ggml_tensor * args[2] = {x, ids};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, V, B, 1, 1, args, 2, heads_op, GGML_N_TASKS_MAX, (void *) &m);
}

ggml_tensor * csm_attention(ggml_context * ctx, const csm_model & m, ggml_tensor * q, ggml_tensor * K, ggml_tensor * V,
                           ggml_tensor * mask) {
    const csm_kernel * k = m.kernel;
    if (!k || !k->attend || q->ne[0] <= 0 || q->ne[0] % 8 != 0 || K->ne[1] <= 0 || q->ne[1] % K->ne[1] != 0) return nullptr;
    if (q->type != GGML_TYPE_F32 || K->type != GGML_TYPE_F32 || V->type != GGML_TYPE_F32 || mask->type != GGML_TYPE_F32 ||
        q->nb[0] != sizeof(float) || K->nb[0] != sizeof(float) || V->nb[0] != sizeof(float) || mask->nb[0] != sizeof(float)) {
        return nullptr;
    }
    ggml_tensor * args[4] = {q, K, V, mask};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, q->ne[0], q->ne[1], q->ne[2], q->ne[3], args, 4, attention_op,
                          GGML_N_TASKS_MAX, (void *) k);
}

ggml_tensor * csm_embed(ggml_context * ctx, const csm_model & m, ggml_tensor * audio_ids, ggml_tensor * audio_mask,
                       ggml_tensor * text_ids, ggml_tensor * text_mask) {
    // a table ggml cannot turn into f32 rows here (no to_float) stays with ggml's get_rows
    for (const ggml_tensor * t : {m.audio_embd, m.text_embd}) {
        if (t->type != GGML_TYPE_F32 && !ggml_get_type_traits(t->type)->to_float) return nullptr;
    }
    if (!m.kernel) return nullptr;
    const int64_t n_tok = audio_ids->ne[0] / m.hp.n_codebooks;
    ggml_tensor * args[4] = {audio_ids, audio_mask, text_ids, text_mask};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, m.hp.bb_d_model, n_tok, 1, 1, args, text_ids ? 4 : 2, embed_op,
                          GGML_N_TASKS_MAX, (void *) &m);
}

ggml_tensor * csm_elu(ggml_context * ctx, ggml_tensor * x, bool cpu) {
    const csm_kernel * k = cpu ? csm_kernel_pick() : nullptr;
    if (!k || !k->elu || x->type != GGML_TYPE_F32 || !ggml_is_contiguous(x)) return ggml_elu(ctx, x);
    return ggml_map_custom1(ctx, x, elu_op, GGML_N_TASKS_MAX, (void *) k);
}
