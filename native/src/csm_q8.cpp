// csm_q8.cpp - packing Q8_0 matrices for the AVX512-VNNI kernel and running it as a ggml custom op.
#include "csm_q8.h"

#include "csm_log.h"
#include "csm_q8_kernel.h"

#include <cstdlib>
#include <vector>

#include <sys/mman.h>

csm_q8_matrix::~csm_q8_matrix() { free(mem); }

bool csm_q8_available() {
    static const bool ok = csm_q8_kernel_available();
    return ok;
}

static std::unique_ptr<csm_q8_matrix> alloc_packed(ggml_type type, int64_t rows, int64_t cols) {
    auto m = std::make_unique<csm_q8_matrix>();
    m->type = type;
    m->rows = rows;
    m->cols = cols;
    m->nbp = (cols / 32 + 7) / 8 * 8;
    const size_t bytes = type == GGML_TYPE_Q4_K ? (size_t) (rows * (cols / 256) * 148) : (size_t) (rows * m->nbp * 34);
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
    return false;
}

std::unique_ptr<csm_q8_matrix> csm_q8_pack(const ggml_tensor * w) {
    if (!csm_q8_packable(w)) csm_fail("internal: cannot pack tensor '%s' for the int8 kernel", w->name);
    auto m = alloc_packed(w->type, w->ne[1], w->ne[0]);
    if (w->type == GGML_TYPE_Q4_K) csm_q4k_pack_rows((const uint8_t *) w->data, w->nb[1], m->rows, m->cols, m->w);
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

// This thread's share of W times columns [c0, c0 + n) of the quantised input: a contiguous range of
// 4-row tiles, so each thread streams its own part of W once.
void gemm_share(const csm_q8_matrix & W, const q8_scratch & s, int64_t n_total, int64_t c0, int64_t n, float * out,
                int64_t out_stride, int ith, int nth) {
    const int64_t tiles = (W.rows + 3) / 4;
    const int64_t t0 = tiles * ith / nth, t1 = tiles * (ith + 1) / nth;
    const int64_t r0 = t0 * 4, r1 = t1 * 4 < W.rows ? t1 * 4 : W.rows;
    if (r0 >= r1) return;
    auto gemm = W.type == GGML_TYPE_Q4_K ? csm_q4k_gemm : csm_q8_gemm;
    gemm(W.w, W.rows, W.nbp, r0, r1, s.y.data() + c0 * 256, s.dy.data() + c0 * 8, s.sb.data() + c0 * 8, n_total, n, out,
         out_stride);
}

// dst = W x, W = userdata; every thread quantises x itself (cheap next to its share of W).
void q8_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_q8_matrix & W = *(const csm_q8_matrix *) userdata;
    const ggml_tensor * x = dst->src[0];
    const q8_scratch & s = quantize_input(x, W.nbp);
    gemm_share(W, s, x->ne[1], 0, x->ne[1], (float *) dst->data, (int64_t) (dst->nb[1] / sizeof(float)), ith, nth);
}

// dst[:, b] = heads[ids[b]] x[:, b]; userdata = the model. Runs of columns with the same head are
// one product (the frame loop gives all sequences the same head).
void heads_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const csm_model & m = *(const csm_model *) userdata;
    const ggml_tensor * x = dst->src[0];
    const int32_t * ids = (const int32_t *) dst->src[1]->data;
    const int64_t n = x->ne[1], n_heads = (int64_t) m.q8_heads.size();
    const q8_scratch & s = quantize_input(x, m.q8_heads[0]->nbp);
    const int64_t stride = (int64_t) (dst->nb[1] / sizeof(float));
    for (int64_t c0 = 0; c0 < n;) {
        int64_t c1 = c0 + 1;
        while (c1 < n && ids[c1] == ids[c0]) c1++;
        const int64_t h = ids[c0] < 0 ? 0 : ids[c0] >= n_heads ? n_heads - 1 : ids[c0]; // ids come from csm_generate
        gemm_share(*m.q8_heads[h], s, n, c0, c1 - c0, (float *) dst->data + c0 * stride, stride, ith, nth);
        c0 = c1;
    }
}

} // namespace

ggml_tensor * csm_mul_mat(ggml_context * ctx, const csm_model & m, ggml_tensor * w, ggml_tensor * x) {
    auto it = m.q8.find(w);
    if (it == m.q8.end()) return ggml_mul_mat(ctx, w, x);
    const csm_q8_matrix * W = it->second.get();
    if (x->type != GGML_TYPE_F32 || x->ne[0] != W->cols || x->ne[2] != 1 || x->ne[3] != 1 || x->nb[0] != sizeof(float)) {
        csm_fail("internal: '%s' is packed but its input is not f32 rows of %lld", w->name, (long long) W->cols);
    }
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
