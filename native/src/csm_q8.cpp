// csm_q8.cpp - packing Q8_0 matrices for the AVX512-VNNI kernel and running it as a ggml custom op.
#include "csm_q8.h"

#include "csm_log.h"
#include "csm_q8_kernel.h"

#include <algorithm>
#include <cstdlib>
#include <vector>

#include <sys/mman.h>

csm_q8_matrix::~csm_q8_matrix() { free(mem); }

bool csm_q8_available() {
    static const bool ok = csm_q8_kernel_available();
    return ok;
}

// Bytes per row of a packed matrix (csm_q8_kernel.h).
static int64_t row_bytes(const csm_q8_matrix & W) {
    if (W.type == GGML_TYPE_F16) return W.cols * 2;
    return W.type == GGML_TYPE_Q4_K ? W.nbp / 8 * 148 : W.nbp * 34;
}

static std::unique_ptr<csm_q8_matrix> alloc_packed(ggml_type type, int64_t rows, int64_t cols) {
    auto m = std::make_unique<csm_q8_matrix>();
    m->type = type;
    m->rows = rows;
    m->cols = cols;
    m->nbp = (cols / 32 + 7) / 8 * 8;
    const size_t bytes = (size_t) (rows * row_bytes(*m));
    const size_t align = 2u << 20; // 2 MiB: lets the kernel use transparent huge pages
    m->mem_size = (bytes + align - 1) / align * align;
    m->mem = aligned_alloc(align, m->mem_size);
    if (!m->mem) csm_fail("out of memory packing a %lld x %lld matrix", (long long) rows, (long long) cols);
#ifdef MADV_HUGEPAGE
    madvise(m->mem, m->mem_size, MADV_HUGEPAGE);
#endif
    m->w = (uint8_t *) m->mem;
    return m;
}

bool csm_q8_packable(const ggml_tensor * w) {
    if (w->ne[2] != 1 || w->ne[3] != 1) return false;
    if (w->type == GGML_TYPE_Q8_0) return w->ne[0] % 32 == 0;
    if (w->type == GGML_TYPE_Q4_K) return w->ne[0] % 256 == 0;
    if (w->type == GGML_TYPE_F16) return w->ne[0] % 16 == 0;
    return false;
}

std::unique_ptr<csm_q8_matrix> csm_q8_pack(const ggml_tensor * w) {
    if (!csm_q8_packable(w)) csm_fail("internal: cannot pack tensor '%s' for the int8 kernel", w->name);
    auto m = alloc_packed(w->type, w->ne[1], w->ne[0]);
    if (w->type == GGML_TYPE_Q4_K) csm_q4k_pack_rows((const uint8_t *) w->data, w->nb[1], m->rows, m->cols, m->w);
    else if (w->type == GGML_TYPE_F16) csm_f16_pack_rows((const uint8_t *) w->data, w->nb[1], m->rows, m->cols, m->w);
    else csm_q8_pack_rows((const uint8_t *) w->data, w->nb[1], m->rows, m->cols, m->w);
    return m;
}

std::unique_ptr<csm_q8_matrix> csm_q8_pack_f32(const float * data, int64_t rows, int64_t cols) {
    if (cols % 32 != 0) csm_fail("internal: cannot pack a matrix of %lld columns", (long long) cols);
    const size_t row_bytes = ggml_row_size(GGML_TYPE_Q8_0, cols);
    std::vector<uint8_t> q8((size_t) rows * row_bytes);
    ggml_quantize_chunk(GGML_TYPE_Q8_0, data, q8.data(), 0, rows, cols, nullptr);
    auto m = alloc_packed(GGML_TYPE_Q8_0, rows, cols);
    csm_q8_pack_rows(q8.data(), row_bytes, rows, cols, m->w);
    return m;
}

std::unique_ptr<csm_q8_matrix> csm_q8_pack_f16(const uint16_t * data, int64_t rows, int64_t cols) {
    if (cols % 16 != 0) csm_fail("internal: cannot pack a matrix of %lld columns", (long long) cols);
    auto m = alloc_packed(GGML_TYPE_F16, rows, cols);
    csm_f16_pack_rows((const uint8_t *) data, (size_t) cols * 2, rows, cols, m->w);
    return m;
}

namespace {

struct q8_scratch {
    std::vector<int8_t> y;
    std::vector<float> dy;
    std::vector<int32_t> sb;
};

// Quantises the n columns of x [K, n] into this thread's scratch.
q8_scratch & quantize_input(const ggml_tensor * x, int64_t nbp) {
    thread_local q8_scratch s;
    const int64_t n = x->ne[1];
    const size_t nblk = (size_t) (n * nbp);
    if (s.y.size() < nblk * 32) s.y.resize(nblk * 32);
    if (s.dy.size() < nblk) { s.dy.resize(nblk); s.sb.resize(nblk); }
    csm_q8_quantize((const float *) x->data, (int64_t) (x->nb[1] / sizeof(float)), n, x->ne[0], nbp,
                    s.y.data(), s.dy.data(), s.sb.data());
    return s;
}

// An op's input as its kernel reads it: quantised for Q8_0 / Q4_K weights, the f32 columns for F16.
struct op_input {
    const q8_scratch * s = nullptr;
    const float * x = nullptr;
    int64_t x_stride = 0;
};

op_input prepare_input(const ggml_tensor * x, const csm_q8_matrix & W) {
    op_input in;
    if (W.type == GGML_TYPE_F16) {
        in.x = (const float *) x->data;
        in.x_stride = (int64_t) (x->nb[1] / sizeof(float));
    } else {
        in.s = &quantize_input(x, W.nbp);
    }
    return in;
}

// Rows [r0, r1) of W (r0 % 4 == 0; r1 % 4 == 0 or W.rows) times columns [c0, c0 + n) of the
// input (n_total columns), written to out[c * out_stride + r - r0]: the rows from r0 on are
// themselves a packed matrix of W.rows - r0 rows.
void gemm_rows(const csm_q8_matrix & W, const op_input & in, int64_t n_total, int64_t c0, int64_t n, int64_t r0,
               int64_t r1, float * out, int64_t out_stride) {
    if (r0 >= r1) return;
    const uint8_t * w = W.w + r0 * row_bytes(W);
    if (W.type == GGML_TYPE_F16) {
        csm_f16_gemm(w, W.rows - r0, W.cols, 0, r1 - r0, in.x + c0 * in.x_stride, in.x_stride, n, out, out_stride);
        return;
    }
    auto gemm = W.type == GGML_TYPE_Q4_K ? csm_q4k_gemm : csm_q8_gemm;
    gemm(w, W.rows - r0, W.nbp, 0, r1 - r0, in.s->y.data() + c0 * 256, in.s->dy.data() + c0 * 8,
         in.s->sb.data() + c0 * 8, n_total, n, out, out_stride);
}

// Thread ith's share [t0, t1) of n_tiles 4-row tiles: contiguous, so each thread streams its part once.
void tile_share(int64_t n_tiles, int ith, int nth, int64_t & t0, int64_t & t1) {
    t0 = n_tiles * ith / nth;
    t1 = n_tiles * (ith + 1) / nth;
}

// This thread's share of W times columns [c0, c0 + n) of the input.
void gemm_share(const csm_q8_matrix & W, const op_input & s, int64_t n_total, int64_t c0, int64_t n, float * out,
                int64_t out_stride, int ith, int nth) {
    int64_t t0, t1;
    tile_share((W.rows + 3) / 4, ith, nth, t0, t1);
    gemm_rows(W, s, n_total, c0, n, t0 * 4, std::min(t1 * 4, W.rows), out + t0 * 4, out_stride);
}

// dst = W x, W = userdata; every thread quantises x itself (cheap next to its share of W).
void q8_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_q8_matrix & W = *(const csm_q8_matrix *) userdata;
    const ggml_tensor * x = dst->src[0];
    const op_input s = prepare_input(x, W);
    gemm_share(W, s, x->ne[1], 0, x->ne[1], (float *) dst->data, (int64_t) (dst->nb[1] / sizeof(float)), ith, nth);
}

// dst[:, b] = heads[ids[b]] x[:, b]; userdata = the model. Runs of columns with the same head are
// one product (the frame loop gives all sequences the same head).
void heads_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_model & m = *(const csm_model *) userdata;
    const ggml_tensor * x = dst->src[0];
    const int32_t * ids = (const int32_t *) dst->src[1]->data;
    const int64_t n = x->ne[1], n_heads = (int64_t) m.q8_heads.size();
    const op_input s = prepare_input(x, *m.q8_heads[0]);
    const int64_t stride = (int64_t) (dst->nb[1] / sizeof(float));
    for (int64_t c0 = 0; c0 < n;) {
        int64_t c1 = c0 + 1;
        while (c1 < n && ids[c1] == ids[c0]) c1++;
        const int64_t h = ids[c0] < 0 ? 0 : ids[c0] >= n_heads ? n_heads - 1 : ids[c0]; // ids come from csm_generate
        gemm_share(*m.q8_heads[h], s, n, c0, c1 - c0, (float *) dst->data + c0 * stride, stride, ith, nth);
        c0 = c1;
    }
}

// The group's products one after another in dst: matrix i's [rows_i, n] at the sum of the earlier
// rows_i * n. The threads split the tiles of all matrices together.
void group_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_q8_group & G = *(const csm_q8_group *) userdata;
    const ggml_tensor * x = dst->src[0];
    const int64_t n = x->ne[1];
    const op_input s = prepare_input(x, *G.mats[0]);
    int64_t n_tiles = 0;
    for (const csm_q8_matrix * W : G.mats) n_tiles += (W->rows + 3) / 4;
    int64_t t0, t1;
    tile_share(n_tiles, ith, nth, t0, t1);
    float * out = (float *) dst->data;
    int64_t first = 0; // the current matrix's first tile in the common numbering
    for (const csm_q8_matrix * W : G.mats) {
        const int64_t nt = (W->rows + 3) / 4, a = std::max(t0 - first, (int64_t) 0), b = std::min(t1 - first, nt);
        if (a < b) gemm_rows(*W, s, n, 0, n, a * 4, std::min(b * 4, W->rows), out + a * 4, W->rows);
        out += W->rows * n;
        first += nt;
    }
}

// dst [ff, n] = silu(gate x) * (up x) for the group {gate, up}: this thread's tiles in chunks of
// rows, both products of a chunk into scratch, then combined.
void gate_up_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_q8_group & G = *(const csm_q8_group *) userdata;
    const csm_q8_matrix & gate = *G.mats[0], & up = *G.mats[1];
    const ggml_tensor * x = dst->src[0];
    const int64_t n = x->ne[1], ff = gate.rows, stride = (int64_t) (dst->nb[1] / sizeof(float));
    const op_input s = prepare_input(x, gate);
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
        gemm_rows(gate, s, n, 0, n, r0, r1, g.data(), CHUNK);
        gemm_rows(up, s, n, 0, n, r0, r1, u.data(), CHUNK);
        for (int64_t c = 0; c < n; c++) {
            csm_silu_mul(g.data() + c * CHUNK, u.data() + c * CHUNK, (float *) dst->data + c * stride + r0, r1 - r0);
        }
    }
}

const csm_q8_group * find_group(const csm_model & m, const ggml_tensor * first) {
    auto it = m.q8_groups.find(first);
    return it == m.q8_groups.end() ? nullptr : it->second.get();
}

void check_input(const csm_q8_matrix & W, const ggml_tensor * x, const char * what) {
    if (x->type != GGML_TYPE_F32 || x->ne[0] != W.cols || x->ne[2] != 1 || x->ne[3] != 1 || x->nb[0] != sizeof(float)) {
        csm_fail("internal: '%s' is packed but its input is not f32 rows of %lld", what, (long long) W.cols);
    }
}

} // namespace

void csm_q8_make_groups(csm_model & m) {
    auto packed = [&](const ggml_tensor * t) -> const csm_q8_matrix * {
        auto it = m.q8.find(t);
        return it == m.q8.end() ? nullptr : it->second.get();
    };
    // one op prepares one input for all its matrices: the same quantisation (Q8_0 / Q4_K) or f32 (F16)
    auto same_input = [](const csm_q8_matrix * a, const csm_q8_matrix * b) {
        return a->cols == b->cols && a->nbp == b->nbp && (a->type == GGML_TYPE_F16) == (b->type == GGML_TYPE_F16);
    };
    for (const csm_llama * L : {&m.backbone, &m.depth}) {
        for (const csm_layer & l : L->layers) {
            const csm_q8_matrix * q = packed(l.wq), * k = packed(l.wk), * v = packed(l.wv);
            if (q && k && v && same_input(q, k) && same_input(q, v)) {
                m.q8_groups[l.wq] = std::make_unique<csm_q8_group>(csm_q8_group{{q, k, v}});
            }
            const csm_q8_matrix * g = packed(l.w_gate), * u = packed(l.w_up);
            if (g && u && g->rows == u->rows && same_input(g, u)) {
                m.q8_groups[l.w_gate] = std::make_unique<csm_q8_group>(csm_q8_group{{g, u}});
            }
        }
    }
}

void csm_mul_mat_qkv(ggml_context * ctx, const csm_model & m, ggml_tensor * wq, ggml_tensor * wk, ggml_tensor * wv,
                     ggml_tensor * x, ggml_tensor ** q, ggml_tensor ** k, ggml_tensor ** v) {
    const csm_q8_group * G = find_group(m, wq);
    if (!G) {
        *q = csm_mul_mat(ctx, m, wq, x);
        *k = csm_mul_mat(ctx, m, wk, x);
        *v = csm_mul_mat(ctx, m, wv, x);
        return;
    }
    check_input(*G->mats[0], x, wq->name);
    const int64_t n = x->ne[1];
    int64_t rows = 0;
    for (const csm_q8_matrix * W : G->mats) rows += W->rows;
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
    const csm_q8_group * G = find_group(m, w_gate);
    if (!G) return ggml_mul(ctx, ggml_silu(ctx, csm_mul_mat(ctx, m, w_gate, x)), csm_mul_mat(ctx, m, w_up, x));
    check_input(*G->mats[0], x, w_gate->name);
    ggml_tensor * args[1] = {x};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, G->mats[0]->rows, x->ne[1], 1, 1, args, 1, gate_up_op, GGML_N_TASKS_MAX,
                          (void *) G);
}

ggml_tensor * csm_mul_mat(ggml_context * ctx, const csm_model & m, ggml_tensor * w, ggml_tensor * x) {
    auto it = m.q8.find(w);
    if (it == m.q8.end()) return ggml_mul_mat(ctx, w, x);
    const csm_q8_matrix * W = it->second.get();
    check_input(*W, x, w->name);
    ggml_tensor * args[1] = {x};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, W->rows, x->ne[1], 1, 1, args, 1, q8_op, GGML_N_TASKS_MAX, (void *) W);
}

ggml_tensor * csm_depth_heads(ggml_context * ctx, const csm_model & m, ggml_tensor * x, ggml_tensor * ids) {
    const int64_t V = m.hp.audio_vocab_size, B = x->ne[1];
    if (m.q8_heads.empty()) {
        ggml_tensor * l = ggml_mul_mat_id(ctx, m.depth_heads, ggml_reshape_3d(ctx, x, x->ne[0], 1, B), ids);
        return ggml_reshape_2d(ctx, l, V, B);
    }
    if (x->type != GGML_TYPE_F32 || x->nb[0] != sizeof(float) || x->ne[2] != 1 || x->ne[3] != 1) {
        csm_fail("internal: depth heads need f32 rows of hidden states");
    }
    ggml_tensor * args[2] = {x, ids};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, V, B, 1, 1, args, 2, heads_op, GGML_N_TASKS_MAX, (void *) &m);
}
